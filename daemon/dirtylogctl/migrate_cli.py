"""dirtylogctl migrate / migrate-receive: progress display, summary, exit codes.

A migration's product is the image (and an s390 guest's storage keys beside it), its exit code
says how it went (0, 1, 3 no such VM, 5 verified but pages or keys differ, 130 interrupted);
its standard output is a report. So a closed stdout (``| head``) drops the report and lets the
migration finish: aborting would cost the work done for the sake of lines nobody reads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from typing import Any

from qemu.qmp import QMPClient
from rich.console import Console
from rich.live import Live
from rich.table import Table

from dirtylogctl import output
from dirtylogctl.argtypes import (
    channel_count,
    int_in,
    non_negative_float,
    non_negative_int,
    positive_float,
)
from dirtylogctl.keyfile import key_path
from dirtylogctl.migrate import (
    DESTINATION_FORM,
    Migration,
    MigrationError,
    Options,
    Round,
    Stats,
    VmUnavailable,
    tcp_address,
)
from dirtylogctl.receive import DEFAULT_MAX_CHANNELS, IDLE_TIMEOUT, serve_once
from dirtylogctl.skeys import KeyStats
from dirtylogctl.throttling import ConvergenceError, Mode, Params
from dirtylogctl.wireformat import PAGE_SIZE, StreamError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED, EXIT_DIFFERENT = 0, 1, 2, 3, 5
EXIT_INTERRUPTED = 128 + 2  # 128 + SIGINT, what a shell reports for a tool Ctrl-C killed
MiB = 1 << 20


class PlainProgress:
    """One line per round, for logs and pipes; once nobody reads them, none."""

    def round_done(self, stats: Stats, last: Round) -> None:
        keys = ""
        if last.key_bytes:
            keys = f"; storage keys {_kib(last.key_bytes)} in {last.key_seconds * 1e3:.0f} ms"
        self.note(
            f"round {last.number}: {last.dirty_pages} pages ({last.bytes / MiB:.1f} MiB) in "
            f"{last.copy_seconds * 1e3:.0f} ms, {last.bandwidth * 8 / 1e6:.0f} Mbit/s; "
            f"harvest {last.harvest_seconds * 1e3:.1f} ms; remaining "
            f"{stats.remaining // PAGE_SIZE} pages{keys}"
        )

    def note(self, text: str) -> None:
        with contextlib.suppress(output.StdoutClosed):
            output.write(text)


class LiveProgress:
    """A table that grows round by round, redrawn in place on a terminal."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.rows: list[tuple[str, ...]] = []
        self.live = Live(self._table(), console=console, refresh_per_second=8, transient=False)
        self.live.start()

    def _table(self) -> Table:
        table = Table(title="pre-copy", expand=False)
        columns = ("round", "pages", "MiB", "copy ms", "Mbit/s", "harvest ms", "remaining", "keys")
        for column in columns:
            table.add_column(column, justify="right")
        for row in self.rows:
            table.add_row(*row)
        return table

    def round_done(self, stats: Stats, last: Round) -> None:
        self.rows.append(
            (
                str(last.number),
                str(last.dirty_pages),
                f"{last.bytes / MiB:.1f}",
                f"{last.copy_seconds * 1e3:.0f}",
                f"{last.bandwidth * 8 / 1e6:.0f}",
                f"{last.harvest_seconds * 1e3:.1f}",
                str(stats.remaining // PAGE_SIZE),
                _kib(last.key_bytes) if last.key_bytes else "",
            )
        )
        self.live.update(self._table())

    def note(self, text: str) -> None:
        self.console.print(text)

    def stop(self) -> None:
        self.live.stop()


class SilentProgress:
    """--json: notes go into the final document instead of the terminal."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def round_done(self, stats: Stats, last: Round) -> None:
        pass

    def note(self, text: str) -> None:
        self.notes.append(text)


def summary(vm: str, stats: Stats, limit: float) -> str:
    ram = stats.to_json()["ram"]
    lines = [
        f"migration of {vm} {stats.status} in {stats.total_time * 1e3:.0f} ms "
        f"(setup {stats.setup_time * 1e3:.0f} ms): {stats.dirty_sync_count} rounds, "
        f"{stats.pages_sent} pages sent ({stats.transferred / MiB:.1f} MiB, "
        f"{ram['pages-resent']} resent), {ram['mbps']:.0f} Mbit/s"
        + (f" over {stats.channels} TCP channels" if stats.channels > 1 else ""),
        f"downtime {stats.downtime * 1e3:.0f} ms (expected {stats.expected_downtime * 1e3:.0f} ms, "
        f"limit {limit * 1e3:.0f} ms), "
        + ("converged" if stats.converged else "did not converge: switched over at --max-rounds"),
        _keys_line(stats.storage_keys),
    ]
    if stats.convergence is not None:
        lines.append(_convergence_line(stats.convergence))
    if stats.differing_pages is not None:
        if stats.differing_pages:
            first = ", ".join(hex(g) for g in stats.differing_pages[:8])
            lines.append(
                f"verify: {len(stats.differing_pages)} pages differ from the paused "
                f"source, first at {first}"
            )
        else:
            lines.append(
                f"verify: the destination equals the paused source "
                f"({stats.total_bytes // PAGE_SIZE} pages)"
            )
        lines.append(_verify_keys_line(stats.storage_keys))
    return "\n".join(lines)


def _convergence_line(c: dict[str, Any]) -> str:
    """What slowing the guest did, and what it cost it in stores per second."""
    if c["mode"] == Mode.AUTO_CONVERGE:
        steps = c["cpu-throttle-steps"]
        did = f"cpu throttle {' → '.join(f'{p} %' for p in steps)}" if steps else "never fired"
    elif c["dirty-limit-round"] is not None:
        limit, since = c["vcpu-dirty-limit"], c["dirty-limit-round"]
        did = f"every vCPU limited to {limit} MiB/s from round {since}"
    else:
        did = "never fired"
    rates = c["guest-stores-per-second"]
    shown = [f"{k} {_per_second(v)}" for k, v in rates.items() if v is not None]
    cost = f"; guest stores/s: {', '.join(shown)}" if shown else ""
    return f"{c['mode']}: {did}{cost}"


def _per_second(rate: float) -> str:
    return f"{rate:,.0f}"


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def _keys_line(keys: KeyStats) -> str:
    """What became of the storage keys: sent inside the downtime, or why not."""
    if not keys.carried:
        return f"storage keys: none sent: {keys.why_not}"
    line = (
        f"storage keys: {keys.keys} ({_kib(keys.keys)}) sent in {keys.seconds * 1e3:.0f} ms, "
        "inside the downtime"
    )
    if not keys.guest_uses_keys:
        line += " (the guest uses none: every key is 0)"
    return line


def _verify_keys_line(keys: KeyStats) -> str:
    if not keys.carried or keys.differing is None:
        return f"verify: storage keys not compared: {keys.why_not}"
    if keys.differing:
        first = ", ".join(hex(g) for g in keys.differing[:8])
        return (
            f"verify: {len(keys.differing)} storage keys differ from the paused source, "
            f"first at {first}"
        )
    return f"verify: the destination's storage keys equal the paused source's ({keys.keys})"


def convergence_params(args: argparse.Namespace) -> Params:
    """QEMU's capabilities and parameters from the flags; ConvergenceError in QEMU's words."""
    if args.auto_converge and args.dirty_limit is not None:
        raise ConvergenceError(  # migrate_caps_check's text, "then" included
            "dirty-limit conflicts with auto-converge either of then available currently"
        )
    mode = Mode.OFF
    if args.auto_converge:
        mode = Mode.AUTO_CONVERGE
    elif args.dirty_limit is not None:
        mode = Mode.DIRTY_LIMIT
    return Params(
        mode=mode,
        throttle_trigger_threshold=args.throttle_trigger_threshold,
        cpu_throttle_initial=args.cpu_throttle_initial,
        cpu_throttle_increment=args.cpu_throttle_increment,
        cpu_throttle_tailslow=args.cpu_throttle_tailslow,
        max_cpu_throttle=args.max_cpu_throttle,
        vcpu_dirty_limit=1 if args.dirty_limit is None else args.dirty_limit,
        vcpu_dirty_limit_period=args.vcpu_dirty_limit_period,
    )


async def run_migrate(client: QMPClient, args: argparse.Namespace) -> int:
    try:
        convergence = convergence_params(args)
    except ConvergenceError as exc:
        print(f"dirtylogctl migrate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    options = Options(
        vm=args.vm,
        destination=args.destination,
        downtime_limit=args.downtime_limit / 1e3,
        max_bandwidth=args.max_bandwidth,
        max_rounds=args.max_rounds,
        verify=args.verify,
        resume=args.resume,
        reconnect_timeout=args.reconnect_timeout,
        channels=args.channels,
        convergence=convergence,
    )

    async def connect() -> QMPClient:
        fresh = QMPClient("dirtylogctl")
        await fresh.connect(args.socket)
        return fresh

    progress: Any
    if args.json:
        progress = SilentProgress()
    elif sys.stdout.isatty():
        progress = LiveProgress(Console())
    else:
        progress = PlainProgress()
    migration = Migration(client, options, progress, connect)
    try:
        stats = await migration.run()
    except (VmUnavailable, ConvergenceError) as exc:  # refused before anything happened
        print(f"dirtylogctl: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except (MigrationError, StreamError) as exc:
        print(f"dirtylogctl: migration failed: {exc}; {_source(migration)}", file=sys.stderr)
        return EXIT_FAILED
    except asyncio.CancelledError:  # Ctrl-C: the driver has resumed the source and tidied up
        print(
            f"dirtylogctl: migration of {args.vm} interrupted; {_source(migration)}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    finally:
        if isinstance(progress, LiveProgress):
            progress.stop()
        if migration.qmp is not client:  # reconnected after a daemon restart
            await migration.qmp.disconnect()
    if args.json:
        doc = stats.to_json()
        doc["notes"] = progress.notes
        report = json.dumps(doc, indent=2)
    else:
        report = summary(args.vm, stats, options.downtime_limit)
    with contextlib.suppress(output.StdoutClosed):
        output.write(report)
    return EXIT_DIFFERENT if stats.differs else EXIT_OK


def _source(migration: Migration) -> str:
    """What became of the source, for the line that says the migration did not finish."""
    if migration.source_stopped:
        return f"the source VM is still stopped (resume it: dirtylogctl cont {migration.o.vm})"
    return "the source VM is running"


def destination(text: str) -> str:
    """argparse type: tcp:HOST:PORT or a file path, checked before the daemon is asked."""
    try:
        tcp_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {DESTINATION_FORM}, not {text!r}") from None
    return text


def listen_address(text: str) -> tuple[str, int]:
    """--listen HOST:PORT ([::1]:PORT for IPv6; an empty HOST is every address)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port 0-65535, not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def run_receive(args: argparse.Namespace) -> int:
    host, port = args.listen

    def ready(bound: int) -> None:
        print(f"listening on {host}:{bound}", flush=True)

    def dropped(peer: str, reason: StreamError) -> None:
        line = f"dirtylogctl: dropped {peer}: {reason}; still listening"
        print(line, file=sys.stderr, flush=True)

    try:
        got = serve_once(
            host,
            port,
            args.output,
            ready,
            idle_timeout=args.idle_timeout,
            max_image_bytes=args.max_image_size,
            dropped=dropped,
            max_channels=args.max_channels,
        )
    except (StreamError, OSError) as exc:
        print(f"dirtylogctl: receive failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:  # the partial image is removed on the way out; --output stays
        print(f"dirtylogctl: interrupted; {args.output} was not changed", file=sys.stderr)
        return EXIT_INTERRUPTED
    keys = f" and {got.keys} storage keys (into {key_path(args.output)})" if got.keys else ""
    verified = ""
    if got.verified_pages:
        verified = f"; verified {got.verified_pages} ({got.differing} differ)"
    if got.verified_keys:
        verified += f"; verified {got.verified_keys} keys ({got.differing_keys} differ)"
    print(f"received {got.pages} pages into {args.output}{keys}{verified}", flush=True)
    return EXIT_OK


def add_parsers(sub: Any, cmd: Any, size: Any) -> None:
    q = cmd(
        sub,
        "migrate",
        "migrate",
        "pre-copy a VM's memory to a file or a migrate-receive; an s390 model's storage keys "
        "go at switch-over, into IMAGE.skeys beside the image",
    )
    q.add_argument("vm")
    q.add_argument(
        "destination", type=destination, help="a file, or tcp:HOST:PORT of a migrate-receive"
    )
    q.add_argument(
        "--downtime-limit",
        type=positive_float,
        default=300.0,
        metavar="MS",
        help="switch over once the rest fits this much time (default 300 ms)",
    )
    q.add_argument(
        "--max-bandwidth",
        type=size,
        metavar="BYTES/S",
        help="throttle the copy, e.g. 100M (default unlimited)",
    )
    q.add_argument(
        "--max-rounds",
        type=non_negative_int,
        default=30,
        help="switch over after this many rounds even without converging (default 30)",
    )
    q.add_argument(
        "--verify",
        action="store_true",
        help="compare the destination with the paused source, pages and storage keys; "
        "exit 5 if they differ",
    )
    q.add_argument(
        "--resume",
        action="store_true",
        help="resume the source after a successful migration (default: stay stopped)",
    )
    q.add_argument(
        "--channels",
        type=channel_count,
        default=1,
        metavar="N",
        help="TCP connections to offer a migrate-receive, 1-16 (default 1); it may accept "
        "fewer; the JSON report's 'channels' says how many were used. A file destination "
        "ignores this",
    )
    add_convergence_flags(q)
    q.add_argument(
        "--reconnect-timeout",
        type=non_negative_float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for a restarted daemon (default 30)",
    )
    q = cmd(
        sub,
        "migrate-receive",
        "migrate_receive",
        "receive one migration over TCP (storage keys, if sent, into OUTPUT.skeys)",
    )
    q.add_argument("--listen", required=True, type=listen_address, metavar="HOST:PORT")
    q.add_argument(
        "--output",
        required=True,
        metavar="FILE",
        help="the image; replaced only once a migration's pages are all synced",
    )
    q.add_argument(
        "--idle-timeout",
        type=positive_float,
        default=IDLE_TIMEOUT,
        metavar="SECONDS",
        help=f"drop a peer silent this long, or without a complete header by then "
        f"(default {IDLE_TIMEOUT:g})",
    )
    q.add_argument(
        "--max-image-size",
        type=size,
        metavar="BYTES",
        help="refuse a migration whose slots need more, e.g. 64G (default: the free space)",
    )
    q.add_argument(
        "--max-channels",
        type=channel_count,
        default=DEFAULT_MAX_CHANNELS,
        metavar="N",
        help=f"accept at most this many TCP connections per migration, 1-16 "
        f"(default {DEFAULT_MAX_CHANNELS}); a sender offering more gets this many",
    )


def add_convergence_flags(q: argparse.ArgumentParser) -> None:
    """QEMU's auto-converge and dirty-limit capabilities with its parameters and defaults."""
    d = Params()
    g = q.add_argument_group(
        "convergence",
        "QEMU's auto-converge and dirty-limit: the second period (a round or more, over 1 s) "
        "that dirties more than --throttle-trigger-threshold % of what it sent slows the "
        "guest, and each second one after that slows it more; the guest is sped up again "
        "when the migration ends, also when it fails or this client dies",
    )
    g.add_argument(
        "--auto-converge",
        action="store_true",
        help="throttle every vCPU: --cpu-throttle-initial %%, then more each time it fires",
    )
    g.add_argument(
        "--dirty-limit",
        type=int_in(1, 1 << 32),
        metavar="MIB/S",
        help="limit every vCPU to newly dirtying this many MiB/s (QEMU's vcpu-dirty-limit; "
        "needs the vcpu-dirty-ring capability: softmmu, not kvm)",
    )
    g.add_argument(
        "--throttle-trigger-threshold",
        type=int_in(1, 100),
        default=d.throttle_trigger_threshold,
        metavar="PCT",
        help=f"a round is too dirty above this share of its sent bytes "
        f"(default {d.throttle_trigger_threshold})",
    )
    g.add_argument(
        "--cpu-throttle-initial",
        type=int_in(1, 99),
        default=d.cpu_throttle_initial,
        metavar="PCT",
        help=f"the first throttle (default {d.cpu_throttle_initial})",
    )
    g.add_argument(
        "--cpu-throttle-increment",
        type=int_in(1, 99),
        default=d.cpu_throttle_increment,
        metavar="PCT",
        help=f"added each later time (default {d.cpu_throttle_increment})",
    )
    g.add_argument(
        "--cpu-throttle-tailslow",
        action="store_true",
        help="late steps no larger than the dirty share asks (default off)",
    )
    g.add_argument(
        "--max-cpu-throttle",
        type=int_in(1, 99),
        default=d.max_cpu_throttle,
        metavar="PCT",
        help=f"never throttle more (default {d.max_cpu_throttle})",
    )
    g.add_argument(
        "--vcpu-dirty-limit-period",
        type=int_in(1, 1000),
        default=d.vcpu_dirty_limit_period,
        metavar="MS",
        help=f"the window a vCPU's dirty rate is measured over (QEMU's "
        f"x-vcpu-dirty-limit-period; default {d.vcpu_dirty_limit_period}; the model measures "
        "no shorter than 100)",
    )
