"""`dirtylogd` / `python -m dirtylogd`: wire the rooms together and serve until SIGTERM/SIGINT.

The only place that knows every room: the service gets the event hub's ``publish``, the wire
gets a factory that binds the command table to each new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

from dirtylogd import __version__
from dirtylogd.api.dispatch import BoundCommands
from dirtylogd.ops import instance, logs, ramfs, systemd
from dirtylogd.ops.config import Config, ConfigError, configure_logging, load
from dirtylogd.ops.demo import start_demo
from dirtylogd.ops.metrics import WORKER_PREFIX, make_registry, serve
from dirtylogd.qmp.events import EventHub
from dirtylogd.qmp.fds import FdRegistry
from dirtylogd.qmp.peers import PeerPolicy
from dirtylogd.qmp.scope import ConnectionScope
from dirtylogd.qmp.server import Limits, QmpServer, SocketInUse
from dirtylogd.qmp.session import Session
from dirtylogd.qmp.telemetry import ServerTelemetry
from dirtylogd.service.registry import Service
from dirtylogd.service.store import StateStore
from kvmshim.s390 import harvest_pool

log = logging.getLogger("dirtylogd")


def owned_directories(config: Config) -> list[tuple[str, str]]:
    """The directories one daemon must have to itself: the VM records and the RAM files."""
    owned = [(config.runtime_dir, "runtime directory")]
    if config.state_dir:
        owned.insert(0, (config.state_dir, "state directory"))
    return owned


async def run(config: Config) -> None:
    # asyncio.to_thread's pool, named so that its CPU is exported as one "worker" series.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(thread_name_prefix=WORKER_PREFIX)
    )
    harvest_pool.set_harvest_threads(config.harvest_threads)
    # Before anything is read from them: a second daemon must not restore the same VMs.
    with instance.holding(owned_directories(config)):
        await _serve(config)


async def _serve(config: Config) -> None:
    state = StateStore(config.state_dir) if config.state_dir else None
    events = EventHub()
    service = Service(config.runtime_dir, state, events.publish, config.max_consumers)
    telemetry = ServerTelemetry()

    def new_session(fds: FdRegistry, scope: ConnectionScope) -> Session:
        return Session(BoundCommands(service, fds, config.max_reply_bytes, scope), telemetry)

    server = QmpServer(
        new_session,
        telemetry,
        PeerPolicy(frozenset(config.allow_uid), frozenset(config.allow_gid)),
        Limits(
            config.max_message_bytes,
            config.max_reply_bytes,
            max_clients=config.max_clients,
            negotiation_timeout=config.negotiation_timeout,
            max_clients_per_uid=config.max_clients_per_uid,
            reserved_clients=config.reserved_clients,
        ),
        events,
    )
    # Signals first: a SIGTERM that arrives while VMs are restored, or just after the socket
    # is bound, still ends in the graceful stop that saves every consumer's pending bits.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    background: list[asyncio.Task[None]] = []
    metrics_server = None
    try:
        # Bound before the VMs are restored, so that a live daemon on the socket is found
        # before anything is touched; clients wait in the backlog until start() below, and
        # then find every VM.
        inherited = systemd.listen_socket()
        try:
            server.bind(config.socket, inherited)
        except OSError as exc:
            raise instance.unusable(f"the socket {config.socket}", exc, "--socket PATH") from None
        ramfs.warn_if_disk(config.runtime_dir, log)
        await service.restore()
        if config.demo:
            background.append(await start_demo(service))
        if config.metrics_listen is not None:
            host, port = config.metrics_listen
            try:
                metrics_server = serve(make_registry(service, telemetry), host, port)
            except OSError as exc:
                raise instance.unusable(
                    f"{host}:{port} for metrics", exc, "--metrics-listen HOST:PORT, or 'none'"
                ) from None
            log.info("metrics on http://%s:%d/metrics", host, port)
        server.start()
        where = f"{_name(inherited)} (from systemd)" if inherited else config.socket
        interval = systemd.watchdog_interval()
        if interval:
            background.append(asyncio.create_task(systemd.watchdog(interval)))
        log.info("dirtylogd %s listening on %s", __version__, where)
        systemd.notify("READY=1", f"STATUS=serving QMP on {where}")
        await stopping.wait()
    finally:
        systemd.notify("STOPPING=1", "STATUS=shutting down")
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await server.close()
        await service.shutdown()
        if metrics_server is not None:
            metrics_server.shutdown()
        log.info("stopped")


def _name(sock: socket.socket) -> str:
    """A listening socket's path as STATUS= and the log name it (abstract ones start with @)."""
    name = sock.getsockname()
    if isinstance(name, bytes):
        name = "@" + name[1:].decode(errors="replace")
    return str(name) or "an unnamed socket"


def main(argv: list[str] | None = None) -> int:
    try:
        config = load(argv)
    except ConfigError as exc:
        logs.print_error(str(exc))
        return 2
    configure_logging(config.log_level)
    try:
        asyncio.run(run(config))
    except (OSError, instance.DirectoryInUse, instance.StartupError, SocketInUse) as exc:
        log.error("%s", exc)
        return 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
