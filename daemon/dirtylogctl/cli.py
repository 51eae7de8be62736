"""dirtylogctl: the command-line client, built on QEMU's own qemu.qmp library.

Exit codes: 0 success, 2 usage error, 3 the daemon refused the command (QMP error),
4 no connection to the daemon, 130 interrupted (Ctrl-C), 141 standard output closed (see
dirtylogctl.output), 1 anything else; migrate adds 5 (verified but different).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import errno
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from dirtylogctl import __version__, connection, convergence, migrate_cli, output
from dirtylogctl.argtypes import finite_float, positive_float
from dirtylogctl.convergence import ReplyError
from dirtylogctl.paths import SOCKET_ENV, default_socket, socket_path
from kvmshim.s390.generations import DEFAULT_KERNEL, KERNELS

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_QMP, EXIT_CONNECT = 0, 1, 2, 3, 4
EXIT_INTERRUPTED, EXIT_STDOUT_CLOSED = migrate_cli.EXIT_INTERRUPTED, output.EXIT_STDOUT_CLOSED
_SIZE = re.compile(r"(?i)^(0x[0-9a-f]+|\d+)\s*([kmgt]i?b?)?$")
_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def size(text: str) -> int:
    """'4096', '0x1000', '64M', '1GiB' -> bytes."""
    m = _SIZE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4096, 0x1000, 64M, 1G)")
    value = int(m.group(1), 0)
    return value * _UNITS[m.group(2)[0].lower()] if m.group(2) else value


def slot_spec(text: str) -> dict[str, Any]:
    """SLOT:GPA:SIZE[:nolog] for vm create."""
    parts = text.split(":")
    form = f"memslot must be SLOT:GPA:SIZE[:nolog], not {text!r}"
    if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "nolog"):
        raise argparse.ArgumentTypeError(form)
    if not parts[0].isascii() or not parts[0].isdigit():
        raise argparse.ArgumentTypeError(f"{form}: SLOT is a number")
    return {
        "slot": int(parts[0]),
        "guest-phys-addr": size(parts[1]),
        "size": size(parts[2]),
        "log-dirty-pages": len(parts) == 3,
    }


def io_range(text: str) -> dict[str, int]:
    gpa, sep, length = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"range must be GPA:LENGTH, not {text!r}")
    return {"guest-phys-addr": size(gpa), "length": size(length)}


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
        for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _backend(vm: Mapping[str, Any]) -> str:
    """'softmmu 3.16' for a model (its kernel generation; ' 1M' with 1 MiB pages), else the kind."""
    kernel = vm.get("kernel")
    if not kernel:
        return str(vm["backend"])
    return f"{vm['backend']} {kernel}" + (" 1M" if vm.get("hugepages") else "")


class Ctl:
    """One connection and the commands that use it."""

    def __init__(self, client: QMPClient, as_json: bool) -> None:
        self.qmp = client
        self.as_json = as_json

    async def run(self, args: argparse.Namespace) -> int:
        code = await getattr(self, "cmd_" + args.handler)(args)
        return code if isinstance(code, int) else EXIT_OK

    def show(self, value: Any, human: str | None = None) -> None:
        output.write(json.dumps(value, indent=2) if self.as_json or human is None else human)

    async def _object(
        self, command: str, arguments: Mapping[str, object] | None = None
    ) -> dict[str, Any]:
        """Run a command whose return value is a JSON object."""
        reply = await self.qmp.execute(command, arguments)
        if not isinstance(reply, dict):
            raise ReplyError(f"{command} returned {type(reply).__name__}, not a JSON object")
        return reply

    async def _vms(self) -> list[dict[str, Any]]:
        """query-vms: a JSON array of objects."""
        reply = await self.qmp.execute("query-vms")
        if not isinstance(reply, list) or not all(isinstance(vm, dict) for vm in reply):
            raise ReplyError("query-vms returned something other than a JSON array of objects")
        return reply

    async def cmd_version(self, a: argparse.Namespace) -> None:
        """The daemon's version: QEMU's VersionInfo, whose ``qemu`` member holds dirtylogd's
        own numbers (as in the greeting); a person reads its package line."""
        v = await self._object("query-version")
        numbers, package = v.get("qemu"), v.get("package")
        if (
            not isinstance(package, str)
            or not isinstance(numbers, dict)
            or set(numbers) != {"major", "minor", "micro"}
        ):
            raise ReplyError(
                'query-version returned no VersionInfo ({"qemu": {"major", "minor", "micro"}, '
                f'"package"}}): {json.dumps(v)}'
            )
        self.show(v, package)

    async def cmd_vm_list(self, a: argparse.Namespace) -> None:
        vms = await self._vms()
        rows = [
            {
                "name": v["name"],
                "backend": v["backend"],
                "kernel": v.get("kernel", "-") + (" 1M" if v.get("hugepages") else ""),
                "slots": len(v["memslots"]),
                "consumers": len(v["consumers"]),
                "paused": v["paused"],
                "generation": v["generation"],
                "workload": "running" if v.get("workload", {}).get("running") else "-",
            }
            if v.get("status", "ok") == "ok"
            else {"name": v["name"], "backend": v.get("status"), "workload": v.get("reason")}
            for v in vms
        ]
        self.show(
            vms,
            table(
                rows,
                [
                    "name",
                    "backend",
                    "kernel",
                    "slots",
                    "consumers",
                    "paused",
                    "generation",
                    "workload",
                ],
            ),
        )

    async def cmd_vm_show(self, a: argparse.Namespace) -> None:
        vm = await self._vm(a.vm)
        slots = table(
            vm["memslots"],
            ["slot", "as-id", "guest-phys-addr", "size", "npages", "log-dirty-pages", "ram-offset"],
        )
        consumers = table(
            vm["consumers"], ["name", "manual-protect", "initially-set", "pending-pages"]
        )
        self.show(
            vm,
            f"{vm['name']} ({_backend(vm)}, ram {vm.get('ram-path', '-')})\n\n"
            f"{slots}\n\n{consumers}",
        )

    async def _vm(self, name: str) -> dict[str, Any]:
        for vm in await self._vms():
            if vm["name"] == name and vm.get("status", "ok") != "ok":
                raise NotFoundError(f"vm '{name}' cannot be used: {vm.get('reason')}")
            if vm["name"] == name:
                return vm
        raise NotFoundError(f"DeviceNotFound: no VM named '{name}'")

    async def cmd_vm_create(self, a: argparse.Namespace) -> None:
        args = {"name": a.name, "memslots": a.slot or [], "backend": a.backend, "esop": a.esop}
        if a.kernel is not None:
            args["kernel"] = a.kernel
        if a.hugepages:
            args["hugepages"] = True
        self.show(await self.qmp.execute("vm-create", args), f"created vm {a.name}")

    async def cmd_vm_remove(self, a: argparse.Namespace) -> None:
        self.show(await self.qmp.execute("vm-remove", {"vm": a.vm}), f"removed vm {a.vm}")

    async def cmd_memslot(self, a: argparse.Namespace) -> None:
        args = {
            "vm": a.vm,
            "slot": a.slot,
            "as-id": a.as_id,
            "guest-phys-addr": a.gpa,
            "size": a.size,
            "log-dirty-pages": not a.no_log,
        }
        self.show(await self.qmp.execute("memslot-set", args), "ok")

    async def cmd_consumer_add(self, a: argparse.Namespace) -> None:
        args = {
            "vm": a.vm,
            "name": a.name,
            "manual-protect": a.manual_protect,
            "initially-set": not a.not_initially_set,
        }
        self.show(await self.qmp.execute("consumer-add", args), f"added consumer {a.name}")

    async def cmd_consumer_remove(self, a: argparse.Namespace) -> None:
        args = {"vm": a.vm, "name": a.name}
        self.show(await self.qmp.execute("consumer-remove", args), f"removed consumer {a.name}")

    async def cmd_get(self, a: argparse.Namespace) -> None:
        base = {"vm": a.vm, "slot": a.slot, "as-id": a.as_id, "consumer": a.consumer}
        if a.out:
            result = await self._get_to_file(base, a.out)
            human = (
                f"slot {a.slot}: {result['dirty-pages']} of {result['npages']} pages dirty "
                f"(generation {result['generation']}) -> {a.out}"
            )
            self.show(result, human)
            return
        if output.stdout_gone():  # the GET takes the pages: only for output someone will read
            raise output.StdoutClosed
        result = await self._object("dirty-log-get", {**base, "encoding": "ranges"})
        spans = [f"{f}" if n == 1 else f"{f}-{f + n - 1}" for f, n in result["ranges"]]
        shown = ", ".join(spans[:32]) + (
            f", ... ({len(spans) - 32} more)" if len(spans) > 32 else ""
        )
        human = (
            f"slot {a.slot}: {result['dirty-pages']} of {result['npages']} pages dirty "
            f"(generation {result['generation']})" + (f"\n  {shown}" if spans else "")
        )
        self.show(result, human)

    async def _get_to_file(self, base: dict[str, Any], path: str) -> dict[str, Any]:
        """The bitmap travels through a memfd (no size limit, no JSON) into ``path``.

        A GET hands the pages over, so the file must be able to take them before it is asked:
        the output is a new file beside ``path`` whose space is reserved first — a full disk is
        an error while the consumer still has every page — then filled, checked, synced and
        renamed over ``path``."""
        npages = await self._npages(base["vm"], base["slot"], base["as-id"])
        with _Reserved(path, (npages + 63) // 64 * 8 if npages is not None else 0) as out:
            fd = os.memfd_create("dirtylogctl-bitmap", os.MFD_CLOEXEC)
            name = f"dirtylogctl-{os.getpid()}"
            try:
                self.qmp.send_fd_scm(fd)
                await self.qmp.execute("getfd", {"fdname": name})
                args = {**base, "encoding": "fd", "fdname": name}
                result = await self._object("dirty-log-get", args)
                await self.qmp.execute("closefd", {"fdname": name})
                nbytes = (result["npages"] + 63) // 64 * 8
                data = os.pread(fd, nbytes, 0)
            finally:
                os.close(fd)
            if len(data) != nbytes:
                raise ReplyError(
                    f"the daemon's bitmap of {result['npages']} pages is {len(data)} bytes, "
                    f"not {nbytes}"
                )
            out.write(data)
        return result

    async def _npages(self, vm: str, slot: int, as_id: int) -> int | None:
        """Pages of a memslot, or None if the VM has no such slot (the GET will say why)."""
        for m in (await self._vm(vm))["memslots"]:
            if m.get("slot") == slot and m.get("as-id") == as_id:
                return int(m["npages"])
        return None

    async def cmd_clear(self, a: argparse.Namespace) -> None:
        nbytes = (a.num_pages + 63) // 64 * 8
        if a.all:
            raw = bytearray(b"\xff" * nbytes)
            if a.num_pages % 64:
                raw[-8:] = ((1 << (a.num_pages % 64)) - 1).to_bytes(8, "little")
            data = bytes(raw)
        else:
            with open(a.bitmap_file, "rb") as f:
                data = f.read()
        args = {
            "vm": a.vm,
            "slot": a.slot,
            "as-id": a.as_id,
            "first-page": a.first_page,
            "num-pages": a.num_pages,
            "bitmap": base64.b64encode(data).decode(),
            "consumer": a.consumer,
        }
        self.show(await self.qmp.execute("dirty-log-clear", args), "cleared")

    async def cmd_io_mark(self, a: argparse.Namespace) -> None:
        r = await self._object("io-dirty-mark", {"vm": a.vm, "ranges": a.ranges})
        self.show(r, f"marked {r['pages']} pages")

    async def cmd_rate(self, a: argparse.Namespace) -> None:
        self.show(*await convergence.rate(self.qmp, a))

    async def cmd_calc_dirty_rate(self, a: argparse.Namespace) -> None:
        self.show(*await convergence.calc_dirty_rate(self.qmp, a))

    async def cmd_dirty_limit(self, a: argparse.Namespace) -> None:
        self.show(*await convergence.dirty_limit(self.qmp, a))

    async def cmd_stop(self, a: argparse.Namespace) -> None:
        self.show(await self.qmp.execute("stop", {"vm": a.vm}), f"{a.vm} stopped")

    async def cmd_cont(self, a: argparse.Namespace) -> None:
        self.show(await self.qmp.execute("cont", {"vm": a.vm}), f"{a.vm} running")

    async def cmd_workload_start(self, a: argparse.Namespace) -> None:
        args: dict[str, Any] = {
            "vm": a.vm,
            "pages-per-second": a.pps,
            "vcpus": a.vcpus,
            "pattern": a.pattern,
            "dma-share": a.dma_share,
            "dma-report": not a.dma_unreported,
        }
        if a.seed is not None:
            args["seed"] = a.seed
        self.show(await self.qmp.execute("sim-workload-start", args), "workload started")

    async def cmd_workload_stop(self, a: argparse.Namespace) -> None:
        self.show(await self.qmp.execute("sim-workload-stop", {"vm": a.vm}), "workload stopped")

    async def cmd_migrate(self, a: argparse.Namespace) -> int:
        return await migrate_cli.run_migrate(self.qmp, a)

    async def cmd_qmp(self, a: argparse.Namespace) -> None:
        try:
            arguments = _strict_json(a.arguments) if a.arguments else {}
        except ValueError as exc:
            raise UsageError(f"arguments are not JSON: {exc}") from None
        output.write(json.dumps(await self.qmp.execute(a.command, arguments), indent=2))


def _strict_json(text: str) -> Any:
    """JSON as the daemon parses it: Python's json also takes NaN, Infinity and 1e400 (as inf),
    which would go out as NaN/Infinity — not JSON — and cost the connection."""

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON value")

    def number(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"{text} is beyond the range of a double")
        return value

    return json.loads(text, parse_constant=constant, parse_float=number)


class UsageError(Exception):
    """Bad command-line input found after parsing (exit 2)."""


class NotFoundError(Exception):
    """Something the daemon does not have, found out client-side (exit 3)."""


class OutputError(Exception):
    """A file the command writes cannot be written (exit 1); the text says what and why."""


class _Reserved:
    """A new file that replaces ``path`` only once all of it is written and synced.

    Its ``size`` bytes are reserved on entry (posix_fallocate), so a full file system is an
    error before anything else happens; on any failure the new file is removed and ``path``
    is left as it was."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self.tmp = os.path.join(
            os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp"
        )
        self.fd = -1

    def __enter__(self) -> _Reserved:
        try:
            self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            if self.size:
                os.posix_fallocate(self.fd, 0, self.size)
        except OSError as exc:
            self._discard()
            raise OutputError(
                f"cannot write {self.path}: {exc.strerror} (nothing was asked of the daemon)"
            ) from None
        return self

    def write(self, data: bytes) -> None:
        try:
            done = 0
            while done < len(data):  # os.write may write less than asked
                written = os.write(self.fd, data[done:])
                if written <= 0:
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                done += written
            os.ftruncate(self.fd, len(data))
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.replace(self.tmp, self.path)
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror}") from None

    def __exit__(self, *exc: object) -> None:
        self._discard()

    def _discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def build_parser(fallback: str | None = None) -> argparse.ArgumentParser:
    """The whole command line. ``fallback`` is the socket -s's help names when
    $DIRTYLOGD_SOCKET is unset: this user's by default; the man page passes the rule for all
    users (:data:`dirtylogctl.paths.DEFAULT_SOCKET_RULE`), so what it says is not whoever
    generated it."""
    fallback = fallback or default_socket(os.geteuid(), os.environ)
    p = argparse.ArgumentParser(prog="dirtylogctl", description="Talk to dirtylogd over QMP.")
    p.add_argument(
        "-s",
        "--socket",
        metavar="PATH",
        default=socket_path(os.geteuid(), os.environ),
        help=f"daemon socket (default ${SOCKET_ENV}, else {fallback})",
    )
    p.add_argument("--json", action="store_true", help="print the daemon's JSON answers")
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="seconds to wait for a connection (default 30)",
    )
    # Parsed before any connection: the client's own version, with or without a daemon.
    p.add_argument(
        "--version",
        action="version",
        version=f"dirtylogctl {__version__}",
        help="show this client's version and exit ('dirtylogctl version' asks the daemon)",
    )
    sub = p.add_subparsers(dest="family", required=True, metavar="COMMAND")

    def cmd(
        parent: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        handler: str,
        help_: str,
    ) -> argparse.ArgumentParser:
        q = parent.add_parser(name, help=help_, description=help_)
        q.set_defaults(handler=handler)
        return q

    cmd(sub, "version", "version", "show the daemon's version")
    vm = sub.add_parser("vm", help="list, show, create and remove VMs").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    cmd(vm, "list", "vm_list", "list VMs")
    cmd(vm, "show", "vm_show", "memslots and consumers of a VM").add_argument("vm")
    q = cmd(vm, "create", "vm_create", "create a VM")
    q.add_argument("name")
    q.add_argument(
        "--slot",
        action="append",
        type=slot_spec,
        metavar="SLOT:GPA:SIZE[:nolog]",
        help="a memslot, e.g. 0:0:1G; repeatable",
    )
    q.add_argument("--backend", choices=("auto", "softmmu", "kvm"), default="auto")
    q.add_argument(
        "--no-esop", dest="esop", action="store_false", help="softmmu: model a machine without ESOP"
    )
    q.add_argument(
        "--kernel",
        choices=KERNELS,
        help=f"softmmu: the Linux generation the model follows (default {DEFAULT_KERNEL}, the "
        "seed's tree; 3.15: the hardware change bit the seed removed; 4.19: 1 MiB pages "
        "possible)",
    )
    q.add_argument(
        "--hugepages",
        action="store_true",
        help="softmmu with --kernel 4.19: back guest memory with 1 MiB pages, tracked per "
        "segment (a one-page store reports 256 pages)",
    )
    cmd(vm, "remove", "vm_remove", "remove a VM").add_argument("vm")

    q = cmd(sub, "memslot", "memslot", "create, move, re-flag or (size 0) delete a memslot")
    q.add_argument("vm")
    q.add_argument("slot", type=int)
    q.add_argument("gpa", type=size)
    q.add_argument("size", type=size)
    q.add_argument("--no-log", action="store_true", help="without KVM_MEM_LOG_DIRTY_PAGES")
    q.add_argument("--as-id", type=int, default=0)

    con = sub.add_parser("consumer", help="add and remove consumers").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    q = cmd(con, "add", "consumer_add", "add a consumer")
    q.add_argument("vm")
    q.add_argument("name")
    q.add_argument("--manual-protect", action="store_true", help="get does not clear")
    q.add_argument("--not-initially-set", action="store_true", help="start with no page dirty")
    q = cmd(con, "remove", "consumer_remove", "remove a consumer")
    q.add_argument("vm")
    q.add_argument("name")

    q = cmd(sub, "get", "get", "take a consumer's dirty pages of a memslot")
    q.add_argument("vm")
    q.add_argument("slot", type=int)
    q.add_argument("--as-id", type=int, default=0)
    q.add_argument("--consumer", default="default")
    q.add_argument("--out", metavar="FILE", help="write the KVM-layout bitmap to FILE (via fd)")

    q = cmd(sub, "clear", "clear", "clear pages of a manual-protect consumer")
    q.add_argument("vm")
    q.add_argument("slot", type=int)
    q.add_argument("first_page", type=int)
    q.add_argument("num_pages", type=int)
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--all", action="store_true", help="clear every page of the range")
    g.add_argument("--bitmap-file", metavar="FILE", help="KVM-layout bitmap of pages to clear")
    q.add_argument("--as-id", type=int, default=0)
    q.add_argument("--consumer", default="default")

    q = cmd(sub, "io-mark", "io_mark", "report pages written by I/O")
    q.add_argument("vm")
    q.add_argument("ranges", nargs="+", type=io_range, metavar="GPA:LENGTH")

    convergence.add_parsers(sub, cmd)
    cmd(sub, "stop", "stop", "pause a VM's vCPUs").add_argument("vm")
    cmd(sub, "cont", "cont", "resume a VM's vCPUs").add_argument("vm")

    wl = sub.add_parser("workload", help="simulated vCPU workload").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    q = cmd(wl, "start", "workload_start", "start storing stamps")
    q.add_argument("vm")
    q.add_argument("--pps", type=int, required=True, help="pages per second, all vCPUs")
    q.add_argument("--vcpus", type=int, default=1)
    q.add_argument("--pattern", choices=("random", "sequential", "hot-set"), default="random")
    q.add_argument("--seed", type=int)
    q.add_argument("--dma-share", type=finite_float, default=0.0, help="share of device writes")
    q.add_argument("--dma-unreported", action="store_true", help="do not report device writes")
    cmd(wl, "stop", "workload_stop", "stop storing").add_argument("vm")

    migrate_cli.add_parsers(sub, cmd, size)

    q = cmd(sub, "qmp", "qmp", "run any QMP command")
    q.add_argument("command")
    q.add_argument("arguments", nargs="?", help="JSON object")
    return p


async def _main(args: argparse.Namespace) -> int:
    """Run one command; Ctrl-C (the cancellation asyncio.run turns SIGINT into) is exit 130."""
    try:
        return await _connected(args)
    except asyncio.CancelledError:
        print("dirtylogctl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


async def _connected(args: argparse.Namespace) -> int:
    client = QMPClient("dirtylogctl")
    try:
        await asyncio.wait_for(client.connect(args.socket), args.timeout)
    except (ConnectError, OSError, TimeoutError) as exc:
        explained = connection.explain(args.socket, exc, args.timeout)
        print(f"dirtylogctl: {explained}", file=sys.stderr)
        return EXIT_CONNECT
    try:
        return await Ctl(client, args.json).run(args)
    except output.StdoutClosed:  # nobody reads: no message, and not a lost daemon
        output.discard_stdout()
        return EXIT_STDOUT_CLOSED
    except ExecuteError as exc:
        print(f"dirtylogctl: {exc.error_class}: {exc.error.error.desc}", file=sys.stderr)
        return EXIT_QMP
    except NotFoundError as exc:
        print(f"dirtylogctl: {exc}", file=sys.stderr)
        return EXIT_QMP
    except UsageError as exc:
        print(f"dirtylogctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (QMPError, EOFError, ConnectionError) as exc:
        print(f"dirtylogctl: lost the connection to dirtylogd: {exc}", file=sys.stderr)
        return EXIT_CONNECT
    except (OSError, ReplyError, OutputError) as exc:
        print(f"dirtylogctl: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        # The outcome is decided; qemu.qmp re-raises a failure of its reader here (a reply it
        # could not match), which would otherwise end the command in a traceback.
        with contextlib.suppress(QMPError, OSError, EOFError):
            await client.disconnect()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.handler == "migrate_receive":  # needs no daemon
        return migrate_cli.run_receive(args)
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:  # a second Ctrl-C while the first was being handled
        print("dirtylogctl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
