"""Several server processes on one port, with connections dealt round-robin.

Why not uvicorn's own ``--workers``: its workers share one listening socket, and the first worker to wake
accepts every pending connection in one go (asyncio's accept loop). Keep-alive clients that connect
together — a load balancer's pool, a benchmark's clients — then mostly land on one process while the
others idle. Here the parent owns the listening socket, accepts, and hands each connection to the next
worker over a Unix socket (``SCM_RIGHTS``); a worker serves it with uvicorn's protocol on its own event loop. Dead workers are restarted; connections queued for
a starting worker wait in its channel, so none is refused.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("cmpnas.serving")

RESTART_BACKOFF_S = 1.0
STOP_GRACE_S = 10.0


def _handoff_server_class() -> type:
    import uvicorn

    class HandoffServer(uvicorn.Server):
        """A uvicorn server whose connections arrive over ``channel`` instead of from a listening socket."""

        def __init__(self, config: uvicorn.Config, channel: socket.socket) -> None:
            super().__init__(config)
            self.channel = channel

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=[])  # lifespan + state, no listener of its own
            if self.should_exit:
                return
            protocol = functools.partial(
                self.config.http_protocol_class,
                config=self.config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
            )
            loop = asyncio.get_running_loop()
            self.channel.setblocking(False)
            loop.add_reader(self.channel.fileno(), self._take, loop, protocol)

        def _take(self, loop: asyncio.AbstractEventLoop, protocol: Callable[[], asyncio.Protocol]) -> None:
            while True:
                try:
                    msg, fds, _, _ = socket.recv_fds(self.channel, 64, 64)
                except (BlockingIOError, InterruptedError):
                    return
                if not msg:  # the parent is gone: finish what is in flight and stop
                    loop.remove_reader(self.channel.fileno())
                    self.should_exit = True
                    return
                for fd in fds:
                    conn = socket.socket(fileno=fd)
                    loop.create_task(loop.connect_accepted_socket(protocol, conn))

    return HandoffServer


def _worker_main(channel: socket.socket, app_factory: str, log_level: str, env: dict[str, str]) -> None:
    import uvicorn

    os.environ.update(env)
    config = uvicorn.Config(app_factory, factory=True, log_level=log_level)
    _handoff_server_class()(config, channel).run()


class _Slot:
    """One worker process and the parent's end of its channel."""

    def __init__(self, index: int, start: Callable[[socket.socket], Any]) -> None:
        self.index = index
        self.start = start
        self.started_at = 0.0
        self.spawn()

    def spawn(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.channel = parent
        self.process = self.start(child)
        child.close()
        self.started_at = time.monotonic()

    def send(self, conn: socket.socket) -> bool:
        try:
            socket.send_fds(self.channel, [b"c"], [conn.fileno()])
            return True
        except OSError:
            return False

    def stop(self) -> None:
        self.channel.close()  # the worker sees EOF and finishes in-flight requests
        if self.process.is_alive():
            self.process.terminate()


def serve_balanced(
    app_factory: str,
    env: dict[str, str],
    host: str,
    port: int,
    workers: int,
    log_level: str = "info",
    backlog: int = 2048,
) -> None:
    """Serve ``app_factory`` (``module:function``) from ``workers`` processes on ``host:port`` until SIGTERM/SIGINT."""
    ctx = multiprocessing.get_context("spawn")
    listener = socket.create_server((host, port), backlog=backlog)
    listener.setblocking(False)

    def start(child: socket.socket) -> Any:
        process = ctx.Process(target=_worker_main, args=(child, app_factory, log_level, env), daemon=True)
        process.start()
        return process

    slots = [_Slot(i, start) for i in range(workers)]
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    print(f"cmpnas serve: http://{host}:{port} ({workers} worker processes, pid {os.getpid()})", flush=True)
    turn = 0
    try:
        while not stopping:
            ready, _, _ = select.select([listener], [], [], 0.5)
            if ready:
                while True:
                    try:
                        conn, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    for _ in range(workers):  # the next live worker takes it
                        slot = slots[turn % workers]
                        turn += 1
                        if slot.send(conn):
                            break
                    conn.close()  # the worker holds its own copy now
            for slot in slots:
                if not slot.process.is_alive() and time.monotonic() - slot.started_at > RESTART_BACKOFF_S:
                    log.warning("worker %d exited (code %s); restarting", slot.index, slot.process.exitcode)
                    slot.channel.close()
                    slot.spawn()
    finally:
        listener.close()
        for slot in slots:
            slot.stop()
        deadline = time.monotonic() + STOP_GRACE_S
        for slot in slots:
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                slot.process.kill()
        for s, handler in previous.items():
            signal.signal(s, handler)
