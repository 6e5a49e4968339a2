"""Concurrency modes as strategy objects: where a server's requests run.

A server holds one strategy, made from its ``concurrency``: it hands a
verified (and authenticated) stream connection or datagram to where it is
served, serves a request of handle_request() outside the loop, starts and
stops what serving needs, and counts its own figures in stats(). What a
mode refuses is known before there is a server (classmethods): an
overridden hook when the class is made, a datagram server at construction.

The loop and thread modes serve in the server process (here); the fork and
prefork modes in processes forked by the fork server (fastnet.server._fork
and fastnet.server._prefork).
"""
from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING, Any

from fastnet.server._engine import _Engine
from fastnet.server._pool import _Pool

if TYPE_CHECKING:
    from fastnet.loop import EventLoop
    from fastnet.server._base import BaseServer


class _Strategy:
    """A concurrency mode of one server; see the module docstring."""

    #: Whether serving needs the fork server (forked when serving starts).
    forks = False
    #: Whether a blocking handler is served in the process that accepted its
    #: connection, so its TLS handshake can run there: TLS state cannot move
    #: to another process.
    serves_here = True

    @classmethod
    def check_hooks(cls, server_cls: type) -> None:
        """Refuse a class whose get_request() override this mode cannot honour."""

    @classmethod
    def check_datagram(cls) -> None:
        """Refuse a datagram server, where this mode needs connections."""

    @classmethod
    def default_workers(cls, server: BaseServer) -> int:
        """``workers`` when the server is not given it."""
        return 1

    def __init__(self, server: BaseServer) -> None:
        self.server = server
        #: Serves the connections on the server's loop (loop and thread modes, once serving).
        self.engine: _Engine | None = None

    def limit(self) -> int:
        """How many connections (or datagrams) may be open at once."""
        return self.server.max_connections

    def start_forkserver(self) -> None:
        """Before the server has threads: fork what serving will fork from."""

    def begin(self, loop: EventLoop) -> None:
        """Serving starts, on the loop thread, before the first accept."""

    def serve_stream(self, sock: socket.socket, addr: Any) -> None:
        """Serve one connection taken by the serving loop (it releases its slot when done)."""
        raise NotImplementedError

    def serve_datagram(self, request: Any, addr: Any) -> None:
        """Serve one datagram taken by the serving loop (it releases its slot when done)."""
        raise NotImplementedError

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve one request of handle_request(), on a server that is not serving."""
        raise NotImplementedError

    def begin_shutdown(self) -> None:
        """A graceful shutdown begins: tell what serves to finish."""
        if self.engine is not None:
            self.engine.begin_shutdown()

    def busy(self) -> bool:
        """True while processes of this mode are left to wait for."""
        return False

    def teardown(self) -> None:
        """Serving has ended (or failed to start): close what is left."""
        eng = self.engine
        if eng is not None:
            eng.abort_all()
            eng.stop(1.0)

    def close(self) -> None:
        """server_close() on a server that is not serving."""

    def stats(self, out: dict[str, Any]) -> None:
        """Add this mode's own figures to stats()."""

    def worker_pids(self) -> list[int]:
        """The pids of this mode's processes."""
        return []


class _LoopStrategy(_Strategy):
    """concurrency="loop": handlers run on the server's loop thread.

    A blocking stream handler serves one connection at a time, as
    socketserver's plain servers do; a datagram handler runs per datagram.
    """

    threaded = False

    def begin(self, loop: EventLoop) -> None:
        srv = self.server
        if srv.socket_type == socket.SOCK_STREAM:
            # the engine's totals are read by stats(); the server counts only the slot
            self.engine = _Engine(srv, loop, self.threaded, srv.workers,
                                  lambda counters: srv._release(),
                                  on_failed=srv._handshake_failed)

    def serve_stream(self, sock: socket.socket, addr: Any) -> None:
        self.engine.serve(sock, addr)  # type: ignore[union-attr]  # made by begin()

    def serve_datagram(self, request: Any, addr: Any) -> None:
        srv = self.server
        try:
            srv._handle_datagram(request, addr)
        finally:
            srv._release()

    def process_request(self, request: Any, client_address: Any) -> None:
        srv = self.server
        srv._prepare(request)
        srv.finish_request(request, client_address)
        srv.shutdown_request(request)


class _ThreadStrategy(_LoopStrategy):
    """concurrency="thread": handlers run on a pool of ``workers`` threads.

    A MessageHandler's messages are handled one at a time per connection,
    in order. Under handle_request() each request gets a thread of its own,
    as with socketserver's ThreadingMixIn.
    """

    threaded = True

    @classmethod
    def default_workers(cls, server: BaseServer) -> int:
        return 16

    def __init__(self, server: BaseServer) -> None:
        super().__init__(server)
        # a datagram server's pool; a stream server's is its engine's
        self.pool: _Pool | None = None

    def begin(self, loop: EventLoop) -> None:
        super().begin(loop)
        srv = self.server
        if srv.socket_type != socket.SOCK_STREAM:
            self.pool = _Pool(loop, srv.workers, "fastnet-server")

    def serve_datagram(self, request: Any, addr: Any) -> None:
        srv = self.server
        self.pool.submit(srv._handle_datagram, (request, addr),  # type: ignore[union-attr]  # made by begin()
                         lambda exc: srv._release())

    def process_request(self, request: Any, client_address: Any) -> None:
        srv = self.server
        t = threading.Thread(target=srv._serve_request, args=(request, client_address),
                             name="fastnet-request", daemon=srv.daemon_threads)
        if srv.block_on_close:
            srv._threads.append(t)
        t.start()

    def teardown(self) -> None:
        super().teardown()
        if self.pool is not None:
            self.pool.stop(1.0)
