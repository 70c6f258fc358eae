"""Several server processes on one port, each accepting from its own ``SO_REUSEPORT`` socket.

Why not uvicorn's own ``--workers``: its workers share one listening socket, and the first worker to wake
accepts every pending connection in one go (asyncio's accept loop), so keep-alive clients that connect together
mostly land on one process while the others idle. Here each worker has its own listening socket, all bound to
the same port with ``SO_REUSEPORT``, so the kernel hashes each new connection (by its addresses and ports) to one
of them and no process sits between client and worker. Each worker serves its socket with plain
``uvicorn.Server(config).run(sockets=[sock])``. The spread is a hash, not round-robin: a handful of connections
can land unevenly.

The parent binds and listens on every socket before it starts a worker and keeps its copy open until the worker
serves, so a connection that arrives while the workers load their models waits in a backlog instead of being
refused. Then the parent closes its copy: the worker holds the socket's last reference, and when the worker dies
the kernel takes the socket out of the port's group as the process is torn down, so reconnecting clients go to the live
workers instead of queueing on a dead one's socket until the parent notices. A dead worker is restarted on a
fresh socket that is bound but not listening, which uvicorn puts in the kernel's rotation once the new worker is
ready, so no connection waits on a worker that is still loading; if no other worker serves, the parent listens on
it as at start. A worker also stops when the parent dies. Connections that a dying worker's socket had queued
are moved to the live workers by the kernel only with ``net.ipv4.tcp_migrate_req = 1``; the parent says so at
start when it is off.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

log = logging.getLogger("cmpnas.serving")

RESTART_BACKOFF_S = 1.0
STOP_GRACE_S = 10.0
MIGRATE_SYSCTL = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def queued_connections_migrate() -> bool | None:
    """Whether the kernel moves the connections queued on a closing listener to the other listeners of its
    ``SO_REUSEPORT`` group (``net.ipv4.tcp_migrate_req``, Linux 5.14+); None where the setting does not exist.

    Without it, clients that reconnect in the moment a killed worker's process is torn down are hashed to its
    dying socket and reset."""
    try:
        return MIGRATE_SYSCTL.read_text().strip() != "0"
    except OSError:
        return None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _member(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` in the port's ``SO_REUSEPORT`` group; it gets connections once it listens."""
    family = _family(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def bind_group(host: str, port: int, count: int, backlog: int) -> list[socket.socket]:
    """``count`` listening sockets sharing ``host:port`` (port 0: one free port for all of them).

    A plain bind comes first, so a port held by another server, even one that also uses ``SO_REUSEPORT``, is an
    ``EADDRINUSE`` here rather than a silent share of that server's connections."""
    with socket.create_server((host, port), family=_family(host)) as probe:
        port = probe.getsockname()[1]
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(_member(host, port))
            sockets[-1].listen(backlog)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _stop_with_parent(server: Any) -> None:
    """A worker whose parent was killed would serve on with no one to restart it or stop it: stop it too."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns once the parent's end of the spawn pipe is closed, i.e. the parent is gone
        server.should_exit = True

    threading.Thread(target=watch, name="cmpnas-parent-watch", daemon=True).start()


def _report_serving(server: Any, serving: Any) -> None:
    """Set ``serving`` (a multiprocessing Event) once uvicorn has started: the parent may then drop its copy."""

    def watch() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            serving.set()

    threading.Thread(target=watch, name="cmpnas-serving-watch", daemon=True).start()


def _worker_main(
    sock: socket.socket, app_factory: str, log_level: str, env: dict[str, str], serving: Any
) -> None:
    import uvicorn

    os.environ.update(env)
    server = uvicorn.Server(uvicorn.Config(app_factory, factory=True, log_level=log_level))
    _stop_with_parent(server)
    _report_serving(server, serving)
    server.run(sockets=[sock])


class _Slot:
    """One worker process and the parent's copy of its socket (None once the worker serves on it)."""

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock: socket.socket | None = sock
        self.process: Any = None
        self.serving: Any = None
        self.started_at = 0.0

    def release(self) -> None:
        """Close the parent's copy of the socket (the worker keeps its own)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def serves(self) -> bool:
        return self.process is not None and self.process.is_alive() and self.serving.is_set()


def serve_reuseport(
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
    group = bind_group(host, port, workers, backlog)
    port = group[0].getsockname()[1]
    slots = [_Slot(i, sock) for i, sock in enumerate(group)]

    def spawn(slot: _Slot) -> None:
        slot.serving = ctx.Event()
        slot.process = ctx.Process(
            target=_worker_main, args=(slot.sock, app_factory, log_level, env, slot.serving), daemon=True
        )
        slot.process.start()
        slot.started_at = time.monotonic()

    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for slot in slots:
            spawn(slot)
        print(
            f"cmpnas serve: http://{host}:{port} ({workers} worker processes on SO_REUSEPORT sockets, "
            f"pid {os.getpid()})",
            flush=True,
        )
        if workers > 1 and queued_connections_migrate() is False:
            print(
                "cmpnas serve: net.ipv4.tcp_migrate_req is 0, so connections queued on a worker that dies are "
                "reset; set it to 1 (sysctl -w net.ipv4.tcp_migrate_req=1) to have the kernel move them to the "
                "live workers",
                flush=True,
            )
        while not stopping:
            live = [slot.process.sentinel for slot in slots if slot.process.is_alive()]
            if live:
                wait(live, timeout=0.5)
            else:
                time.sleep(0.5)
            for slot in slots:
                if stopping:
                    break
                if slot.process.is_alive():
                    if slot.sock is not None and slot.serving.is_set():
                        slot.release()
                    continue
                if time.monotonic() - slot.started_at <= RESTART_BACKOFF_S:
                    continue
                log.warning("worker %d exited (code %s); restarting", slot.index, slot.process.exitcode)
                others_serve = any(o is not slot and o.serves() for o in slots)
                if others_serve or slot.sock is None:
                    slot.release()  # the parent's copy, if the worker died before it served
                    slot.sock = _member(host, port)  # uvicorn listens on it once the new worker is ready
                    if not others_serve:
                        slot.sock.listen(backlog)  # no one else serves: queue for the new worker, as at start
                # else: the parent's listening copy keeps queueing for the new worker, as at start
                spawn(slot)
    finally:
        for slot in slots:
            slot.release()
        for slot in slots:
            if slot.process is not None and slot.process.is_alive():
                slot.process.terminate()  # uvicorn finishes in-flight requests, then exits
        deadline = time.monotonic() + STOP_GRACE_S
        for slot in slots:
            if slot.process is None:
                continue
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
        for s, handler in previous.items():
            signal.signal(s, handler)
