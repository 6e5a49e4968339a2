"""The fork mode, and what it shares with prefork: the fork server, the
processes it forks and the channels on which they report.

The server never forks from the serving process (its loop thread and pools
would leave a child locks no thread releases): when serving starts, before
any thread of the server exists, it forks a fork server
(fastnet._forkserver), which forks every child on request. Each child gets
a SEQPACKET report channel, the other end of its _Child's ``chan``: one
``_REPORT`` record per finished connection, read by the parent on its loop.
"""
from __future__ import annotations

import os
import signal
import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fastnet._forkserver import ForkServer, read_records
from fastnet.loop import EventLoop
from fastnet.server._engine import _Engine
from fastnet.server._single import handshake_now
from fastnet.server._strategy import _Strategy
from fastnet.server._util import _quiet_close, _shut, logger

if TYPE_CHECKING:
    from fastnet.server._base import BaseServer

# child -> parent: one finished connection and its counters
_REPORT = struct.Struct("!c4Q")
_REPORT_TIMEOUT = 5.0


class _Child:
    """A forked child (fork mode) or a prefork worker, as its parent sees it."""
    __slots__ = ("pid", "chan", "inflight", "assigned", "alive", "status", "started", "slot")

    def __init__(self, pid: int, chan: socket.socket) -> None:
        self.pid = pid
        self.chan = chan
        self.slot = -1          # a prefork worker's slot (see worker_started)
        self.started = time.monotonic()
        self.inflight = 0
        self.assigned = 0
        self.alive = True
        self.status: int | None = None


class _Forking(_Strategy):
    """The fork server of a fork or prefork server, and the children it forks.

    A child runs ``run_child()`` (a subclass's) and leaves with os._exit,
    never returning into the parent's loop; its exit comes back from the
    fork server to the ``on_exit`` given to ``fork()``.
    """

    forks = True
    # the children serve: TLS state cannot move to them, so their handshakes run there
    serves_here = False

    def __init__(self, server: BaseServer) -> None:
        super().__init__(server)
        self.forksrv: ForkServer | None = None
        self.watched: dict[int, tuple[_Child, Callable[[_Child], object]]] = {}  # pid -> child, on_exit

    def start_forkserver(self) -> None:
        srv = self.server
        if self.forksrv is None and not srv._in_child and srv._state != "closed":
            self.forksrv = ForkServer(self._run_forked, self._forkserver_init)

    def _forkserver_init(self) -> None:
        """In the fork server, once: what every child it forks inherits."""
        srv = self.server
        srv._in_child = True
        try:
            signal.set_wakeup_fd(-1)
        except (ValueError, OSError):
            pass
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent shuts down and tells us
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # the parent accepts; a datagram server's socket comes with each request
        srv.socket.close()
        srv._counters = [0, 0, 0, 0]    # a child reports only its own

    def fork(self, request: tuple[Any, ...], on_exit: Callable[[_Child], object],
             sock: socket.socket | None = None) -> _Child:
        """Have the fork server fork a child serving ``request``; returns its _Child.

        ``request`` is ``("conn", addr)`` with the connection ``sock``,
        ``("datagram", data, addr)`` with the server's ``sock``, or
        ``("worker", slot)``. The child reports its counters on a SEQPACKET
        channel, whose other end is the _Child's ``chan``.
        """
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            fds = [theirs.fileno()] if sock is None else [theirs.fileno(), sock.fileno()]
            pid = self.forksrv.fork(request, fds)  # type: ignore[union-attr]  # started with serving
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        mine.setblocking(False)
        child = _Child(pid, mine)
        self.watched[pid] = (child, on_exit)
        return child

    def _run_forked(self, request: tuple[Any, ...], fds: list[int]) -> int:
        """In a child of the fork server: serve ``request``, report, return the exit status."""
        status = 1
        try:
            srv = self.server
            chan = socket.socket(fileno=fds[0])
            idle_before = srv._idle_closed
            counters = self.run_child(request, chan, fds)
            if counters is not None:
                chan.settimeout(_REPORT_TIMEOUT)
                for _ in range(srv._idle_closed - idle_before):
                    chan.send(_REPORT.pack(b"I", 0, 0, 0, 0))
                chan.send(_REPORT.pack(b"F" if srv._child_failed else b"D", *counters))
            status = 0
        except BaseException:
            try:
                logger.exception("server child process failed")
            except BaseException:
                pass
        return status

    def run_child(self, request: tuple[Any, ...], chan: socket.socket,
                  fds: list[int]) -> Sequence[int] | None:
        """In a child: serve ``request``; the counters to report, or None if it reported itself."""
        raise NotImplementedError

    def begin(self, loop: EventLoop) -> None:
        if self.forksrv is not None:
            loop.add_reader(self.forksrv.events, self._forkserver_exits)

    def _forkserver_exits(self) -> None:
        fs = self.forksrv
        assert fs is not None
        exits, gone = fs.exits()
        for pid, status in exits:
            entry = self.watched.pop(pid, None)
            if entry is not None:
                child, on_exit = entry
                child.status = status
                child.alive = False
                on_exit(child)
        if gone:
            # killed: no child can be forked or reaped any more, so the server
            # stops, as a prefork master without its arbiter would
            srv = self.server
            srv._loop.remove_reader(fs.events)
            logger.error("the fork server %d exited; shutting down", fs.pid)
            srv._begin_shutdown(None)
            # nobody will report the children: write them off, closing their channels
            watched, self.watched = self.watched, {}
            for child, on_exit in watched.values():
                child.alive = False
                on_exit(child)

    def signal(self, child: _Child, sig: int) -> None:
        if child.status is None and self.forksrv is not None:
            self.forksrv.kill(child.pid, sig)

    @staticmethod
    def read_reports(child: _Child) -> tuple[list[tuple[bytes, tuple[int, ...]]], bool]:
        """(reports, eof): (kind, counters) a child sent, one per finished connection.

        kind is b"D" for a connection served, b"F" for one that failed its handshake,
        b"I" (no counters) for a connection closed for being idle.
        """
        records, eof = read_records(child.chan, _REPORT)
        return [(r[0], r[1:]) for r in records], eof

    def process_request(self, request: Any, client_address: Any) -> None:
        # handle_request() serves on the caller's thread, outside serving: it
        # forks the child itself, as socketserver's ForkingMixIn, bounded by workers
        srv = self.server
        srv._collect_children(blocking=False)
        while len(srv._forked) >= srv.workers:
            srv._collect_children(blocking=True, one=True)
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                srv._in_child = True
                srv._serve_request(request, client_address)
                status = 0
            finally:
                os._exit(status)
        srv._forked.add(pid)
        srv.close_request(request)

    def teardown(self) -> None:
        super().teardown()
        self.watched.clear()
        fs = self.forksrv
        if fs is not None:
            loop = self.server._loop
            if loop is not None and not loop.is_closed():
                loop.remove_reader(fs.events)
            fs.close()    # kills and reaps what is left

    def close(self) -> None:
        if self.forksrv is not None:
            self.forksrv.close()


class _ForkStrategy(_Forking):
    """concurrency="fork": a child process per connection (per datagram for
    UDP), at most ``workers`` at a time."""

    @classmethod
    def default_workers(cls, server: BaseServer) -> int:
        # ForkingMixIn's bound on children, socketserver's name for it
        workers: int = getattr(server, "max_children", 40)
        return workers

    def __init__(self, server: BaseServer) -> None:
        super().__init__(server)
        self.children: dict[int, _Child] = {}    # pid -> _Child

    def limit(self) -> int:
        # a connection in flight is a child
        return min(super().limit(), self.server.workers)

    def serve_stream(self, sock: socket.socket, addr: Any) -> None:
        try:
            if isinstance(sock, ssl.SSLSocket):
                raise TypeError("a TLS socket wrapped by get_request() cannot be served under 'fork' "
                                "with serve_forever(): its TLS state lives in this process and the "
                                "children are forked by the fork server; use ssl_context=")
            child = self.fork(("conn", addr), self._child_exited, sock)
        finally:
            sock.close()   # the child has its copy
        self.children[child.pid] = child

    def serve_datagram(self, request: Any, addr: Any) -> None:
        try:
            child = self.fork(("datagram", request[0], addr), self._child_exited, request[1])
        except Exception:
            logger.exception("failed to fork for a datagram from %r", addr)
            self.server._release()
        else:
            self.children[child.pid] = child

    def run_child(self, request: tuple[Any, ...], chan: socket.socket,
                  fds: list[int]) -> Sequence[int] | None:
        srv = self.server
        if request[0] == "conn":
            return self._child_serve(socket.socket(fileno=fds[1]), request[1])
        srv.socket = socket.socket(fileno=fds[1])
        srv._handle_datagram((request[1], srv.socket), request[2])
        return srv._counters

    def _child_serve(self, sock: socket.socket, addr: Any) -> Sequence[int]:
        srv = self.server
        if not srv._framed:
            if srv.ssl_context is not None:
                # the handshakes run here: TLS state cannot move between processes
                tls = handshake_now(srv, sock, addr)
                if tls is None:
                    srv._child_failed = True
                    return srv._counters
                sock = tls
            # SIGTERM from a shutting-down parent: the handler reads end of file
            signal.signal(signal.SIGTERM, lambda s, f: _shut(sock, socket.SHUT_RD))
            srv._handle_stream(sock, addr)
            return srv._counters
        loop = EventLoop(srv.backend, spin=srv.spin)

        def failed(addr: Any, exc: BaseException) -> None:
            logger.info("handshake with %r failed: %s", addr, exc)
            srv._child_failed = True

        engine = _Engine(srv, loop, threaded=False, on_failed=failed)
        loop.add_signal_handler(signal.SIGTERM, engine.begin_shutdown)
        engine.serve(sock, addr)
        loop.run_until(lambda: not engine.conns)
        engine.stop(0)
        return engine.totals

    def _child_exited(self, child: _Child) -> None:
        srv = self.server
        for kind, counters in self.read_reports(child)[0]:
            if kind == b"I":
                srv._idle_closed += 1
                continue
            if kind == b"F":
                srv._auth_failed += 1
            srv._add(counters)
        child.chan.close()
        self.children.pop(child.pid, None)
        srv._release()

    def begin_shutdown(self) -> None:
        for child in list(self.children.values()):
            self.signal(child, signal.SIGTERM)

    def busy(self) -> bool:
        return bool(self.children)

    def teardown(self) -> None:
        for child in list(self.children.values()):
            _quiet_close(child.chan)
        self.children.clear()
        super().teardown()

    def stats(self, out: dict[str, Any]) -> None:
        out["children"] = len(self.children)

    def worker_pids(self) -> list[int]:
        return list(self.children)
