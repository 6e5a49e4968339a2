"""Connections on one loop: the engine that serves accepted sockets, framed or blocking."""
from __future__ import annotations

import collections
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fastnet.server._handshake import _Handshake
from fastnet.server._pool import _Pool
from fastnet.server._util import _quiet_close, _shut, logger
from fastnet.tls import TLSTransport

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from fastnet.loop import EventLoop
    from fastnet.loop import TimerHandle as _reactor_TimerHandle
    from fastnet.loop import _Transport
    from fastnet.server._base import BaseServer
    from fastnet.server._handlers import MessageHandler

# A threaded MessageHandler connection stops reading when this many of its
# messages wait for a thread, so a fast sender cannot fill memory.
_QUEUE_PAUSE = 64
_WORK_BATCH = 16


_SETUP = object()
_LOST = object()


class _Blocking:
    """A socket a blocking handler works on."""
    __slots__ = ("sock", "addr")

    def __init__(self, sock: socket.socket, addr: Any) -> None:
        self.sock = sock
        self.addr = addr

    def shutdown(self) -> None:
        # the handler's next read sees end of file; what it writes still goes out
        _shut(self.sock, socket.SHUT_RD)

    def abort(self) -> None:
        _shut(self.sock, socket.SHUT_RDWR)


class _FramedConn:
    """The loop protocol behind one MessageHandler."""

    def __init__(self, engine: _Engine, handler: MessageHandler) -> None:
        self.engine = engine
        self.handler = handler
        self.transport: _Transport | None = None
        self.mark: tuple[int, int] | None = None
        self.idle = 0
        self.busy = False
        self.queue: collections.deque[Any] | None = None
        self.finished = False
        self.lost = False
        self.drain_close = False
        if not engine.threaded:
            # the reactor calls the handler directly: no frame of ours per message
            self.message_received = handler.message_received  # type: ignore[method-assign]

    # loop thread
    def connection_made(self, transport: _Transport) -> None:
        self.transport = transport
        h = self.handler
        if type(transport) is TLSTransport:
            # getpeercert() is {} for a certificate the context did not verify
            h.peercert = transport.get_extra_info("peercert") or None
        if self.engine.threaded:
            h._send = self._send_threadsafe
            h._close = self._close_threadsafe
            self.queue = collections.deque([_SETUP])
            self._kick()
        else:
            h.transport = transport
            h._send = transport.send_bytes
            h._close = transport.close
            h.setup()

    def message_received(self, data: bytes) -> None:
        # threaded only: queue for the pool, one task per connection at a time
        q = self.queue
        q.append(data)  # type: ignore[union-attr]  # made by connection_made
        if not self.busy:
            self._kick()
        elif len(q) >= _QUEUE_PAUSE:  # type: ignore[arg-type]
            self.transport.pause_reading()  # type: ignore[union-attr]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        counters = self.counters()
        if not self.engine.threaded:
            try:
                self.handler.finish()
            except Exception:
                logger.exception("exception in %s.finish()", type(self.handler).__name__)
            self.engine._finish(self, counters)
            return
        self._counters = counters
        # the queue belongs to a pool thread too: only append to it
        self.queue.append(_LOST)  # type: ignore[union-attr]
        if not self.busy:
            self._kick()

    def counters(self) -> tuple[int, int, int, int]:
        t = self.transport
        if t is None:
            return (0, 0, 0, 0)
        return (t.messages_received, t.messages_sent, t.bytes_received, t.bytes_sent)

    def shutdown(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if not self.engine.threaded:
            try:
                keep = self.handler.draining()
            except Exception:
                logger.exception("exception in %s.draining()", type(self.handler).__name__)
                keep = False
            if keep:
                t.pause_reading()
            else:
                t.close()
            return
        # let the pool answer what already arrived, then close after the replies
        t.pause_reading()
        self.drain_close = True
        if not self.busy and not self.queue:
            t.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # threaded mode
    def _kick(self) -> None:
        self.busy = True
        self.engine.pool.submit(self._work, (), self._worked)  # type: ignore[union-attr]  # threaded

    def _work(self) -> None:
        # pool thread
        h = self.handler
        q = self.queue
        for _ in range(_WORK_BATCH):
            try:
                item = q.popleft()  # type: ignore[union-attr]
            except IndexError:
                return
            if item is _LOST:
                try:
                    h.finish()
                except Exception:
                    logger.exception("exception in %s.finish()", type(h).__name__)
                self.finished = True
                return
            if item is _SETUP:
                h.setup()
            elif not self.lost:       # a gone peer's unhandled messages need no answer
                h.message_received(item)

    def _worked(self, exc: BaseException | None) -> None:
        # loop thread, after a pool task of this connection
        self.busy = False
        if exc is not None:
            self.engine.server._report_handler_error(exc, self.handler)
            if not self.lost:
                self.transport.abort()  # type: ignore[union-attr]  # connection_lost queues finish()
                return
        if self.finished:
            self.engine._finish(self, self._counters)
            return
        t = self.transport
        assert t is not None
        if self.queue:
            self._kick()
        elif self.lost:
            return
        elif self.drain_close:
            t.close()
        elif t.reading_paused and not t.is_closing():
            t.resume_reading()

    def _send_threadsafe(self, data: Buffer) -> None:
        if not isinstance(data, bytes):
            data = bytes(memoryview(data).cast("B"))
        self.engine.loop.call_soon_threadsafe(self._send_on_loop, data)

    def _send_on_loop(self, data: bytes) -> None:
        t = self.transport
        assert t is not None
        if not t.is_closing():
            t.send_bytes(data)

    def _close_threadsafe(self) -> None:
        self.engine.loop.call_soon_threadsafe(self._close_on_loop)

    def _close_on_loop(self) -> None:
        self.transport.close()  # type: ignore[union-attr]


class _Engine:
    """Serves accepted sockets on one loop: framed handlers on the loop or a
    thread pool, blocking handlers inline or on the pool. Used by the server
    process (loop and thread), by prefork workers and by forked children.

    With the server's ssl_context, a framed connection's TLS (and authkey)
    handshake runs here, in its TLSTransport; with ``tls_blocking`` (prefork
    workers) so does a blocking one's, before its handler starts. A failed
    handshake goes to ``on_failed(addr, exc)``, every other end of a
    connection to ``on_closed(counters)``."""

    def __init__(self, server: BaseServer, loop: EventLoop, threaded: bool, pool_size: int = 0,
                 on_closed: Callable[[Sequence[int] | None], object] | None = None,
                 on_failed: Callable[[Any, BaseException], object] | None = None,
                 tls_blocking: bool = False) -> None:
        self.server = server
        self.loop = loop
        self.threaded = threaded
        self.framed = server._framed
        self.on_closed = on_closed
        # a forked child or prefork worker tells its parent of idle closes
        self.on_idle: Callable[[], None] | None = None
        self.on_failed = on_failed
        self.tls_blocking = tls_blocking and server.ssl_context is not None
        self.pool = _Pool(loop, pool_size, "fastnet-server") if threaded else None
        self.conns: set[_FramedConn | _Blocking] = set()
        self._handshakes: set[_Handshake] = set()
        self.totals = [0, 0, 0, 0]
        self.closing = False
        self._sweep: _reactor_TimerHandle | None = None

    def serve(self, sock: socket.socket, addr: Any) -> None:
        if self.framed:
            self._serve_framed(sock, addr)
            return
        if self.tls_blocking and not isinstance(sock, ssl.SSLSocket):
            if self.closing:
                _quiet_close(sock)
                self._closed(None)
                return
            _Handshake(self.server, self.loop, sock, addr, owner=self)
            return
        self._serve_blocking(sock, addr)

    def _serve_blocking(self, sock: socket.socket, addr: Any) -> None:
        rec = _Blocking(sock, addr)
        self.conns.add(rec)
        if self.closing:
            rec.shutdown()
        if self.threaded:
            self.pool.submit(self.server._handle_stream, (sock, addr),  # type: ignore[union-attr]
                             lambda exc, rec=rec: self._finish(rec, None))  # type: ignore[misc]
        else:
            try:
                self.server._handle_stream(sock, addr)
            finally:
                self._finish(rec, None)

    def _serve_framed(self, sock: socket.socket, addr: Any) -> None:
        srv = self.server
        handler = srv.RequestHandlerClass(srv, addr)
        conn = _FramedConn(self, handler)
        self.conns.add(conn)
        try:
            if srv.ssl_context is None:
                self.loop.add_stream(sock, conn, max_message_size=srv.max_message_size)
            else:
                conn.transport = self.loop.add_stream(
                    sock, conn, max_message_size=srv.max_message_size, ssl_context=srv.ssl_context,
                    server_side=True, authkey=srv.authkey, handshake_timeout=srv.handshake_timeout,
                    strict=srv.strict, digest=srv.digest,
                    on_fail=lambda exc, conn=conn, addr=addr: self._tls_failed(conn, addr, exc))  # type: ignore[misc]
        except Exception:
            self.conns.discard(conn)
            _quiet_close(sock)
            raise
        if self.closing:
            conn.shutdown()
        self._arm_sweep()

    def _tls_failed(self, conn: _FramedConn, addr: Any, exc: BaseException | None) -> None:
        # a framed connection that never got past its handshakes
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        if exc is None:
            self._closed(None)      # closed by us (shutdown) before it was ready
        else:
            self._handshake_failed(addr, exc)

    # owner of the _Handshakes of blocking connections (prefork workers)
    def _authenticated(self, sock: socket.socket, addr: Any) -> None:
        if self.closing:
            _quiet_close(sock)
            self._closed(None)
            return
        try:
            self._serve_blocking(sock, addr)
        except Exception:
            logger.exception("failed to start serving %r", addr)

    def _handshake_failed(self, addr: Any, exc: BaseException) -> None:
        if self.on_failed is not None:
            self.on_failed(addr, exc)
        else:
            logger.info("handshake with %r failed: %s", addr, exc)
            self._closed(None)

    def _release(self) -> None:
        self._closed(None)

    def _finish(self, conn: _FramedConn | _Blocking, counters: Sequence[int] | None) -> None:
        if conn not in self.conns:
            return
        self.conns.discard(conn)
        if counters is not None:
            tot = self.totals
            for i in range(4):
                tot[i] += counters[i]
        self._closed(counters)

    def _closed(self, counters: Sequence[int] | None) -> None:
        if self.on_closed is not None:
            self.on_closed(counters)

    def live(self) -> list[int]:
        """Counters of finished plus open connections (any thread)."""
        out = list(self.totals)
        for c in list(self.conns):   # list(set) is one C call: safe against the loop thread
            if isinstance(c, _FramedConn) and not c.lost:
                for i, v in enumerate(c.counters()):
                    out[i] += v
        return out

    # idle connections: compare each transport's byte counters every half
    # idle_timeout; two sweeps without change close it (no per-message cost)
    def _arm_sweep(self) -> None:
        idle = self.server.idle_timeout
        if idle is None or self._sweep is not None or self.loop.is_closed():
            return
        self._sweep = self.loop.call_later(idle / 2.0, self._do_sweep)

    def _do_sweep(self) -> None:
        self._sweep = None
        framed = False
        for c in list(self.conns):
            if not isinstance(c, _FramedConn) or c.transport is None:
                continue
            framed = True
            t = c.transport
            mark = (t.bytes_received, t.bytes_sent)
            if mark != c.mark or c.busy:
                c.mark = mark
                c.idle = 0
                continue
            c.idle += 1
            if c.idle >= 2 and not t.is_closing():
                logger.debug("closing idle connection from %r", c.handler.client_address)
                self.server._idle_closed += 1
                if self.on_idle is not None:
                    self.on_idle()
                t.abort()
        if framed:
            self._arm_sweep()

    def begin_shutdown(self) -> None:
        self.closing = True
        for hs in list(self._handshakes):
            hs.abort()
        for c in list(self.conns):
            c.shutdown()

    def abort_all(self) -> None:
        for hs in list(self._handshakes):
            hs.abort()
        for c in list(self.conns):
            c.abort()

    def stop(self, timeout: float) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        if self.pool is not None:
            self.pool.stop(timeout)
