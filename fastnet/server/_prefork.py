"""The prefork mode: ``workers`` processes forked when serving starts.

The server process accepts, checks and authenticates each connection, then
passes its socket to the worker with the fewest connections in flight
(SCM_RIGHTS on the worker's channel, with the pickled peer address). A
worker serves on an engine of its own and reports every finished
connection back on the same channel; a worker that dies is replaced and
its connections written off.
"""
from __future__ import annotations

import itertools
import os
import pickle
import signal
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastnet.fdpass import recv_fds, send_fds
from fastnet.loop import EventLoop
from fastnet.server._engine import _Engine
from fastnet.server._fork import _REPORT, _REPORT_TIMEOUT, _Child, _Forking
from fastnet.server._util import _quiet_close, _shut, logger

if TYPE_CHECKING:
    from fastnet.server._base import BaseServer

_QUICK_DEATH = 1.0
_RESPAWN_MAX_DELAY = 5.0


class _PreforkStrategy(_Forking):
    """concurrency="prefork" (stream servers); see the module docstring."""

    @classmethod
    def check_hooks(cls, server_cls: type) -> None:
        raise TypeError(f"{server_cls.__name__} overrides get_request(), which prefork cannot honour: "
                        "the acceptor passes bare sockets to its workers and cannot move a "
                        "wrapped socket's state (TLS) with them; use concurrency='thread' or "
                        "'fork', or ssl_context= instead of wrapping in get_request()")

    @classmethod
    def check_datagram(cls) -> None:
        raise ValueError("prefork hands connections to workers; a datagram server has none "
                         "(use concurrency='thread' or 'fork')")

    @classmethod
    def default_workers(cls, server: BaseServer) -> int:
        return os.cpu_count() or 2

    def __init__(self, server: BaseServer) -> None:
        super().__init__(server)
        self.workers: list[_Child] = []
        self.restarts = 0
        self.quick_deaths = 0

    def begin(self, loop: EventLoop) -> None:
        super().begin(loop)
        for _ in range(self.server.workers):
            self._spawn_worker()

    def _spawn_worker(self) -> _Child:
        # a replacement takes the slot of the worker it replaces
        taken = {w.slot for w in self.workers}
        slot = next(i for i in itertools.count() if i not in taken)
        w = self.fork(("worker", slot), self._worker_exited)
        w.slot = slot
        self.workers.append(w)
        self.server._loop.add_reader(w.chan, self._worker_report, w)
        return w

    def _respawn(self) -> None:
        if not self.server._shutting_down:
            self._spawn_worker()

    def serve_stream(self, sock: socket.socket, addr: Any) -> None:
        srv = self.server
        data = pickle.dumps(addr)
        fd = sock.fileno()
        for w in sorted((w for w in self.workers if w.alive), key=lambda w: (w.inflight, w.assigned)):
            try:
                send_fds(w.chan, [fd], data)
            except (BlockingIOError, InterruptedError, OSError):
                continue   # full or dead: the next least loaded takes it
            w.inflight += 1
            w.assigned += 1
            sock.close()
            return
        logger.warning("no prefork worker could take a connection from %r", addr)
        sock.close()
        srv._refused += 1
        srv._release()

    def _account(self, w: _Child, reports: list[tuple[bytes, tuple[int, ...]]]) -> None:
        """Count what a worker reported; each finished connection frees its slot."""
        srv = self.server
        for kind, counters in reports:
            if kind == b"I":
                srv._idle_closed += 1
                continue
            if w.inflight > 0:
                w.inflight -= 1
                if kind == b"F":
                    srv._auth_failed += 1
                srv._release(counters)

    def _worker_report(self, w: _Child) -> None:
        reports, eof = self.read_reports(w)
        self._account(w, reports)
        if eof:
            # the worker is going; the fork server says when it is gone
            self.server._loop.remove_reader(w.chan)

    def _worker_exited(self, w: _Child) -> None:
        srv = self.server
        if w.chan.fileno() >= 0:
            self._account(w, self.read_reports(w)[0])
            if not srv._loop.is_closed():
                srv._loop.remove_reader(w.chan)
            w.chan.close()
        lost, w.inflight = w.inflight, 0
        if w in self.workers:
            self.workers.remove(w)
        if not srv._shutting_down:
            logger.warning("prefork worker %d exited (status %r) with %d connections; replacing it",
                           w.pid, w.status, lost)
            self.restarts += 1
            # workers that die as soon as they start (a broken handler) are
            # replaced ever more slowly instead of in a tight fork loop
            if time.monotonic() - w.started < _QUICK_DEATH:
                self.quick_deaths += 1
            else:
                self.quick_deaths = 0
            if self.quick_deaths >= 3:
                delay = min(_RESPAWN_MAX_DELAY, 0.1 * 2 ** (self.quick_deaths - 3))
                srv._loop.call_later(delay, self._respawn)
            else:
                self._spawn_worker()
        for _ in range(lost):
            srv._release()

    def run_child(self, request: tuple[Any, ...], chan: socket.socket,
                  fds: list[int]) -> Sequence[int] | None:
        self._worker_main(chan, request[1])
        return None    # a worker reports each connection as it finishes

    def _worker_main(self, chan: socket.socket, slot: int) -> None:
        """A prefork worker: sockets arrive on ``chan``; each finished one is reported."""
        srv = self.server
        srv.worker_started(slot)
        loop = EventLoop(srv.backend, spin=srv.spin)
        chan.settimeout(_REPORT_TIMEOUT)

        def report(counters: Sequence[int] | None, kind: bytes = b"D") -> None:
            try:
                chan.send(_REPORT.pack(kind, *(counters or (0, 0, 0, 0))))
            except OSError:
                pass

        def failed(addr: Any, exc: BaseException) -> None:
            logger.info("handshake with %r failed: %s", addr, exc)
            report(None, b"F")

        # the worker runs the TLS handshakes: TLS state cannot come from the acceptor
        engine = _Engine(srv, loop, threaded=not srv._framed, pool_size=srv.worker_threads,
                         on_closed=report, on_failed=failed, tls_blocking=True)
        engine.on_idle = lambda: report(None, b"I")
        state = {"stopping": False}

        def stop() -> None:
            if state["stopping"]:
                return
            state["stopping"] = True
            loop.remove_reader(chan)
            engine.begin_shutdown()
            loop.call_later(srv.shutdown_timeout, engine.abort_all)

        def incoming() -> None:
            try:
                data, fds = recv_fds(chan, 4, 4096)
            except (BlockingIOError, InterruptedError):
                return
            except (EOFError, OSError):
                stop()
                return
            try:
                addr = pickle.loads(data)
            except Exception:
                addr = None
            for fd in fds:
                sock = socket.socket(fileno=fd)
                if state["stopping"]:
                    sock.close()
                    report(None)
                    continue
                try:
                    engine.serve(sock, addr)
                except Exception:
                    logger.exception("worker failed to serve %r", addr)
                    _quiet_close(sock)
                    report(None)

        loop.add_reader(chan, incoming)
        loop.add_signal_handler(signal.SIGTERM, stop)
        loop.run_until(lambda: state["stopping"] and not engine.conns)
        engine.stop(1.0)

    def begin_shutdown(self) -> None:
        for w in self.workers:
            # end of file on its channel: the worker drains and exits
            _shut(w.chan, socket.SHUT_WR)

    def busy(self) -> bool:
        return bool(self.workers)

    def teardown(self) -> None:
        for w in list(self.workers):
            _quiet_close(w.chan)
        self.workers = []
        super().teardown()

    def stats(self, out: dict[str, Any]) -> None:
        out["workers"] = sum(1 for w in list(self.workers) if w.alive)
        out["worker_restarts"] = self.restarts

    def worker_pids(self) -> list[int]:
        return [w.pid for w in list(self.workers) if w.alive]
