"""`dirtylogd` / `python -m dirtylogd`: run the service until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from dirtylogd import __version__, systemd
from dirtylogd.config import Config, ConfigError, configure_logging, load
from dirtylogd.demo import start_demo
from dirtylogd.metrics import make_registry, serve
from dirtylogd.peers import PeerPolicy
from dirtylogd.server import Limits, QmpServer
from dirtylogd.service import Service
from dirtylogd.state import StateStore
from dirtylogd.telemetry import ServerTelemetry

log = logging.getLogger("dirtylogd")


async def run(config: Config) -> None:
    state = StateStore(config.state_dir) if config.state_dir else None
    service = Service(config.runtime_dir, state)
    telemetry = ServerTelemetry()
    server = QmpServer(
        service,
        telemetry,
        PeerPolicy(frozenset(config.allow_uid), frozenset(config.allow_gid)),
        Limits(config.max_message_bytes, config.max_reply_bytes, max_clients=config.max_clients),
    )
    await service.restore()  # before listening: a client that can connect finds every VM
    background: list[asyncio.Task[None]] = []
    if config.demo:
        background.append(await start_demo(service))
    metrics_server = None
    if config.metrics_listen is not None:
        host, port = config.metrics_listen
        metrics_server = serve(make_registry(service, telemetry), host, port)
        log.info("metrics on http://%s:%d/metrics", host, port)
    inherited = systemd.listen_socket()
    await server.start(config.socket, inherited)
    where = "the socket systemd passed" if inherited else config.socket
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    interval = systemd.watchdog_interval()
    if interval:
        background.append(asyncio.create_task(systemd.watchdog(interval)))
    log.info("dirtylogd %s listening on %s", __version__, where)
    systemd.notify("READY=1", f"STATUS=serving QMP on {where}")
    try:
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


def main(argv: list[str] | None = None) -> int:
    try:
        config = load(argv)
    except ConfigError as exc:
        print(f"dirtylogd: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    try:
        asyncio.run(run(config))
    except OSError as exc:
        log.error("%s", exc)
        return 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
