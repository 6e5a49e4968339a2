"""Servers: socketserver's TCP, UDP and AF_UNIX servers on fastnet's event loop.

A socketserver program ports by changing its import::

    from fastnet.server import TCPServer, StreamRequestHandler

    class EchoHandler(StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                self.wfile.write(line)

    TCPServer(("", 20000), EchoHandler).serve_forever()

Handlers come in two styles:

* socketserver's: ``handle()`` with ``self.request`` (the client socket, or
  ``(data, socket)`` for a datagram), ``self.client_address`` and
  ``self.server``; :class:`StreamRequestHandler` adds ``rfile``/``wfile`` and
  :class:`DatagramRequestHandler` does the same for one datagram. These
  handlers block. The stdlib's own handler classes work unchanged.
* framed: a :class:`MessageHandler` gets whole messages in
  ``message_received(data)`` and answers with ``reply(data)``. The frames are
  multiprocessing's, so ``fastnet.Client`` and
  ``multiprocessing.connection.Client`` are its clients.

``concurrency`` says where handlers run:

``"loop"`` (the default)
    On the server's event loop. A MessageHandler must not block there. A
    blocking stream handler serves one connection at a time, exactly as
    socketserver's plain ``TCPServer``; a datagram handler runs per datagram.
``"thread"``
    On a pool of ``workers`` threads (default 16), not a thread per client:
    connections beyond the pool wait for a free thread. A MessageHandler's
    messages are handled one at a time per connection, in order.
``"fork"``
    One child process per connection (per datagram for UDP), at most
    ``workers`` at a time (default 40); children are reaped as they exit.
``"prefork"`` (stream servers)
    ``workers`` processes (default: the CPU count) forked when serving
    starts. The server process accepts, checks and authenticates each
    connection, then passes its socket to the worker with the fewest
    connections in flight (SCM_RIGHTS, the Cookbook's recipe 11.11).
    Workers report every finished connection back; a worker that dies is
    replaced and its connections written off. A worker runs MessageHandlers
    on its own event loop and blocking handlers on ``worker_threads``
    threads (default 8).

Limits, keyword arguments with these defaults:

``max_connections=1000``
    connections open at once, pending handshakes included. Beyond it new
    connections wait in the listen backlog, or with ``overflow="refuse"``
    are accepted and closed at once (and counted as refused).
``max_message_size=64 MiB``
    the largest frame a MessageHandler accepts; a larger one closes that
    connection before anything is allocated for it.
``idle_timeout=300``
    seconds without traffic after which a connection is closed (for
    blocking handlers: the socket timeout). ``None`` disables it.
``handshake_timeout=10``
    with an ``authkey`` or an ``ssl_context``, seconds a client has for its
    handshakes (TLS, then multiprocessing's mutual authkey handshake). They
    run on the loop as non-blocking state machines, so a silent client
    never delays another.
``shutdown_timeout=10``
    seconds ``shutdown()`` waits for connections and workers to finish.

``ssl_context=`` (an ``ssl.SSLContext``, see :func:`fastnet.tls.server_context`)
serves TLS on every stream server; with an ``authkey`` too, the authkey
handshake runs inside TLS, as ``fastnet.Listener`` does. The TLS handshake
counts as part of the handshake: bounded by ``handshake_timeout``, inside
``max_connections``, failures counted in ``stats()["handshake_failures"]``,
and it never blocks the loop. A MessageHandler's TLS runs on the loop that
serves it (``TLSTransport``); a blocking handler gets ``self.request`` as an
``ssl.SSLSocket`` whose handshake the loop finished before the handler
started, so a silent peer holds no handler thread. In prefork mode the
worker does the handshakes, since TLS state cannot move between processes.
With a context that requires client certificates (``verify_mode ==
CERT_REQUIRED``), only verified clients get in; MessageHandler's
``peercert`` and ``verified_client`` say who they are. Datagram servers
refuse ``ssl_context``.

``allow=["127.0.0.0/8", "::1/128"]`` refuses, at accept, every peer outside
the listed networks (``ipaddress``); refused peers are closed at once and
counted. ``verify_request`` is still called for the others.

``handle_request()`` serves one request on the calling thread, as in
socketserver, for a server that is not serving: it honours ``timeout`` and
``handle_timeout()``, and serves in the concurrency mode's way (a thread
per request for "thread", a child per request for "fork" and "prefork").

``serve_forever()`` serves on the calling thread (in the main thread it
turns SIGINT and SIGTERM into a graceful shutdown; a second signal stops
waiting), ``start()`` on a background thread. ``shutdown()`` is graceful:
stop accepting, let connections finish what they were given and send what
is queued, close, then join threads and processes; what is left after the
timeout is closed or killed. ``stats()`` returns simple counters.

``fork`` and ``prefork`` never fork from the serving process, whose loop
thread and pools would leave a child locks no thread will release. When
serving starts (``serve_forever()``, or ``start()`` before its thread),
before any thread of the server exists, the server forks a fork server: a
single-threaded copy of the process that forks every child on request
(connections and report channels travel to it as SCM_RIGHTS), reaps them
and reports their exits, and leaves when the server closes or its parent
dies (if it is killed, the server shuts down). Start forking servers
before the program starts threads of its own:
that one fork copies the process as it is then. Children leave with
``os._exit`` and never touch the parent's event loop. A child inherits the
descriptors the process had when serving started, as with socketserver's
ForkingMixIn: a process that is also a client of its own forking server
should run those clients elsewhere.
"""
from __future__ import annotations

import collections
import errno
import ipaddress
import itertools
import logging
import os
import pickle
import queue
import selectors
import signal
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from fastnet._forkserver import ForkServer, read_records
from fastnet._kernels import framing as _framing
from fastnet.address import parse_address, bind as _bind
from fastnet import defaults as _defaults
from fastnet.errors import AuthenticationError, ProtocolError, TimeoutError
from fastnet.fdpass import recv_fds, send_fds
from fastnet.handshake import Handshake, HandshakeReader
from fastnet.loop import EventLoop
from fastnet.tls import TLSTransport

if TYPE_CHECKING:
    from typing_extensions import Buffer, Self

    from fastnet.address import Address
    from fastnet.loop import TimerHandle as _reactor_TimerHandle
    from fastnet.loop import _Transport

__all__ = [
    "BaseServer", "TCPServer", "UDPServer", "UnixServer", "UnixStreamServer", "UnixDatagramServer",
    "ThreadingMixIn", "ForkingMixIn", "PreforkMixIn",
    "ThreadingTCPServer", "ForkingTCPServer", "PreforkTCPServer",
    "ThreadingUDPServer", "ForkingUDPServer",
    "ThreadingUnixStreamServer", "ThreadingUnixDatagramServer",
    "ForkingUnixStreamServer", "ForkingUnixDatagramServer",
    "BaseRequestHandler", "StreamRequestHandler", "DatagramRequestHandler", "MessageHandler",
    "CONCURRENCY", "DEFAULT_MAX_CONNECTIONS", "DEFAULT_MAX_MESSAGE_SIZE", "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_HANDSHAKE_TIMEOUT", "DEFAULT_SHUTDOWN_TIMEOUT",
]

logger = logging.getLogger("fastnet.server")

CONCURRENCY = ("loop", "thread", "fork", "prefork")
# the public names of fastnet.defaults' server limits (see there)
DEFAULT_MAX_CONNECTIONS = _defaults.MAX_CONNECTIONS_SERVER
DEFAULT_MAX_MESSAGE_SIZE = _defaults.MAX_MESSAGE_SIZE_SERVER
DEFAULT_IDLE_TIMEOUT = _defaults.IDLE_TIMEOUT_SERVER
DEFAULT_HANDSHAKE_TIMEOUT = _defaults.HANDSHAKE_TIMEOUT
DEFAULT_SHUTDOWN_TIMEOUT = _defaults.SHUTDOWN_TIMEOUT_SERVER
_DEFAULT_WORKERS = {"thread": 16, "fork": 40}
DEFAULT_WORKER_THREADS = _defaults.WORKER_THREADS_SERVER

_ACCEPT_BATCH = 64
_ACCEPT_BACKOFF = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_ACCEPT_BACKOFF_DELAY = 0.1
# A threaded MessageHandler connection stops reading when this many of its
# messages wait for a thread, so a fast sender cannot fill memory.
_QUEUE_PAUSE = 64
_WORK_BATCH = 16
# worker -> acceptor: one finished connection and its counters
_REPORT = struct.Struct("!c4Q")
_REPORT_TIMEOUT = 5.0
_QUICK_DEATH = 1.0
_RESPAWN_MAX_DELAY = 5.0

_local = threading.local()


def _quiet_close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _shut(sock: socket.socket, how: int) -> None:
    try:
        # the socket's own shutdown: SSLSocket.shutdown would also drop its TLS
        # state, and a handler reading on another thread must see end of file
        # through TLS, not ciphertext
        socket.socket.shutdown(sock, how)
    except OSError:
        pass


def _tls_goodbye(sock: ssl.SSLSocket) -> None:
    """Send a TLS close_notify on a finished SSLSocket without waiting for the peer's."""
    try:
        if sock.fileno() < 0:
            return
        sock.settimeout(0.0)
        sock.unwrap()
    except (OSError, ValueError):
        pass


# -- handlers -------------------------------------------------------------------


class BaseRequestHandler(socketserver.BaseRequestHandler):
    """socketserver's handler: ``setup()``, ``handle()``, ``finish()`` on one request.

    ``self.request`` is the connected socket (stream servers) or
    ``(data, server_socket)`` (datagram servers).
    """


class StreamRequestHandler(BaseRequestHandler, socketserver.StreamRequestHandler):
    """A stream handler with ``rfile``/``wfile``; ``timeout=None`` keeps the server's idle_timeout."""


class DatagramRequestHandler(BaseRequestHandler, socketserver.DatagramRequestHandler):
    """A datagram handler: ``rfile`` holds the datagram, ``wfile`` is sent back by ``finish()``."""

    def finish(self) -> None:
        count = getattr(self.server, "_count_out", None)
        if count is not None:
            # counted first, so the count is there once the peer has the reply
            count(len(self.wfile.getvalue()))  # type: ignore[attr-defined]  # a BytesIO
        super().finish()


class MessageHandler:
    """A framed-message handler, one instance per connection.

    ``message_received(data)`` is called with each whole message (bytes);
    ``reply(data)`` sends one message back (any bytes-like object) and
    ``close()`` closes the connection once the replies are sent. ``setup()``
    runs when the connection is ready (after the handshake), ``finish()``
    when it is gone. ``self.server`` and ``self.client_address`` are set,
    and ``self.transport`` (the loop's FramedTransport, or TLSTransport)
    wherever the handler runs on a loop: concurrency "loop", "fork" and
    "prefork". With "thread" the handler runs on a pool thread and
    ``reply`` is thread-safe. Override ``setup`` rather than ``__init__``.

    Over TLS, ``peercert`` is the client's certificate as
    ``ssl.SSLSocket.getpeercert()`` gives it, set only when the server's
    context verified it (``CERT_REQUIRED``, or ``CERT_OPTIONAL`` and the
    client sent one); ``verified_client`` says whether it is.
    """

    transport: Any = None
    #: The client's verified certificate (a dict), or None.
    peercert: dict[str, Any] | None = None

    @property
    def verified_client(self) -> bool:
        """True if the client presented a certificate the server's TLS context verified."""
        return bool(self.peercert)

    def __init__(self, server: Any, client_address: Any) -> None:
        self.server = server
        self.client_address = client_address
        self._send: Callable[[Buffer], object] | None = None
        self._close: Callable[[], object] | None = None

    def setup(self) -> None:
        """Called once the connection is ready."""

    def message_received(self, data: bytes) -> None:
        """Handle one message."""
        raise NotImplementedError("MessageHandler subclasses implement message_received(data)")

    def finish(self) -> None:
        """Called once the connection is closed."""

    def draining(self) -> bool:
        """Called when the server shuts down, where the handler runs on a loop.

        Return True to keep the connection open (no more messages arrive)
        until the handler calls ``close()`` itself, for instance while it
        still owes replies to work running elsewhere; the server's
        ``shutdown_timeout`` still bounds the wait. The default, False,
        closes the connection once what was sent is flushed.
        """
        return False

    def reply(self, data: Buffer) -> None:
        """Send one message to the peer."""
        self._send(data)  # type: ignore[misc]  # set once the connection is ready

    def close(self) -> None:
        """Close the connection after the replies already sent."""
        self._close()  # type: ignore[misc]


# -- a bounded thread pool whose completions come back on the loop ---------------


class _Pool:
    def __init__(self, loop: EventLoop, size: int, name: str) -> None:
        self.loop = loop
        self.size = size
        self.name = name
        self.q: queue.SimpleQueue[tuple[Callable[..., object], tuple[Any, ...],
                                        Callable[[BaseException | None], object]] | None] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []

    def submit(self, fn: Callable[..., object], args: tuple[Any, ...],
               done: Callable[[BaseException | None], object]) -> None:
        """Run ``fn(*args)`` on a pool thread, then ``done(exc_or_None)`` on the loop."""
        if len(self.threads) < self.size:
            t = threading.Thread(target=self._run, name=f"{self.name}-{len(self.threads)}", daemon=True)
            self.threads.append(t)
            t.start()
        self.q.put((fn, args, done))

    def _run(self) -> None:
        _local.in_handler = True
        while True:
            item = self.q.get()
            if item is None:
                return
            fn, args, done = item
            exc: BaseException | None = None
            try:
                fn(*args)
            except Exception as e:
                exc = e
            except BaseException as e:
                # SystemExit or KeyboardInterrupt would end a thread of its own
                # (socketserver's thread per request): report it the way such a
                # thread's death is reported, and live on to serve the next task
                exc = e
                _thread_died(e)
            try:
                self.loop.call_soon_threadsafe(done, exc)
            except RuntimeError:
                pass   # the loop closed: a forced shutdown, nobody to tell
            del item, fn, args, done, exc

    def stop(self, timeout: float) -> None:
        for _ in self.threads:
            self.q.put(None)
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))


def _thread_died(exc: BaseException) -> None:
    try:
        threading.excepthook(threading.ExceptHookArgs(
            (type(exc), exc, exc.__traceback__, threading.current_thread())))
    except Exception:
        pass


# -- connections on one loop ---------------------------------------------------


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


# -- the TLS and authkey handshakes as a state machine on the loop --------------------

_HS_TLS, _HS_AUTH, _HS_DONE = range(3)
_SSL_RETRY = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class _Handshake:
    """The accepting side of a connection's handshakes, without blocking.

    With the server's ssl_context, first the TLS handshake on a non-blocking
    ``ssl.SSLSocket``; then, with its authkey, multiprocessing's mutual
    handshake (inside TLS when there is TLS), spoken by the same
    :class:`fastnet.handshake.Handshake` as fastnet.auth.server_authenticate.
    Frames are read exactly (header, then payload), so nothing after the
    last handshake message is consumed and the socket can go to any
    handler. Replies produced in one wake-up go out in one send, so a
    pipelining client costs two round trips.

    ``owner`` (the server, or a prefork worker's engine) keeps the pending
    handshakes in ``owner._handshakes`` and hears how each ended:
    ``_authenticated(sock, addr)``, ``_handshake_failed(addr, exc)`` or,
    for one aborted by a shutdown, ``_release()``.
    """

    def __init__(self, server: BaseServer, loop: EventLoop, sock: socket.socket, addr: Any,
                 owner: BaseServer | _Engine | _OneHandshake | None = None) -> None:
        self.server = server
        self.owner = owner if owner is not None else server
        self.loop = loop
        self.sock = sock
        self.addr = addr
        self.fd = sock.fileno()
        self.auth: Handshake | None = None
        self.reader = HandshakeReader()
        self.out = bytearray()
        self.writing = False
        # ACK each handshake message at once (see fastnet.auth._quickack_socket):
        # a stdlib Client's first message waits on the ACK of its WELCOME
        self.quickack = _QUICKACK is not None and sock.family in (socket.AF_INET, socket.AF_INET6)
        sock.setblocking(False)
        if server.ssl_context is not None:
            # takes the descriptor over; on failure it closes it itself
            self.sock = server.ssl_context.wrap_socket(sock, server_side=True,
                                                       do_handshake_on_connect=False)
            self.state = _HS_TLS
        else:
            self._challenge()
        try:
            self.timer: _reactor_TimerHandle | None = loop.call_later(server.handshake_timeout,  # type: ignore[arg-type]
                                                                      self._expired)
            try:
                loop.add_reader(self.fd, self._readable)
            except BaseException:
                self.timer.cancel()
                raise
        except BaseException:
            _quiet_close(self.sock)
            raise
        self.owner._handshakes.add(self)
        self._writable()

    def _challenge(self) -> None:
        srv = self.server
        self.auth = Handshake(srv.authkey, True, strict=srv.strict, digest=srv.digest)  # type: ignore[arg-type]
        self._queue(self.auth.start())
        self.state = _HS_AUTH

    def _queue(self, payloads: list[bytes]) -> None:
        for p in payloads:
            self.out += _framing.encode_header(len(p))
            self.out += p

    def _tls(self) -> bool:
        """Advance the TLS handshake; True once it is done."""
        try:
            self.sock.do_handshake()  # type: ignore[attr-defined]  # an SSLSocket in state _HS_TLS
        except ssl.SSLWantReadError:
            self._want_write(False)
            return False
        except ssl.SSLWantWriteError:
            self._want_write(True)
            return False
        except (ssl.SSLError, OSError) as exc:
            raise AuthenticationError(f"TLS handshake failed: {exc}") from exc
        self._want_write(False)
        if self.server.authkey is None:
            self.state = _HS_DONE
        else:
            self._challenge()
        return True

    def _want_write(self, on: bool) -> None:
        if on and not self.writing:
            self.loop.add_writer(self.fd, self._writable)
            self.writing = True
        elif not on and self.writing:
            self.loop.remove_writer(self.fd)
            self.writing = False

    def _readable(self) -> None:
        try:
            if self.state == _HS_TLS and not self._tls():
                return
            while self.state != _HS_DONE:
                frame = self._read_frame()
                if frame is None:
                    break
                self._step(frame)
            self._flush()
        except Exception as exc:
            self._fail(exc)
            return
        if self.state == _HS_DONE:
            self._succeed()

    def _read_frame(self) -> bytes | None:
        while True:
            if self.quickack:
                try:
                    self.sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)  # type: ignore[arg-type]  # set when quickack
                except OSError:
                    pass
            try:
                chunk = self.sock.recv(self.reader.want())
            except _SSL_RETRY:
                return None
            if not chunk:
                raise self.reader.eof()
            frame = self.reader.feed(chunk)
            if frame is not None:
                return frame

    def _step(self, frame: bytes) -> None:
        hs = self.auth
        assert hs is not None
        self._queue(hs.receive(frame))
        if hs.error is not None:
            self._flush()   # a FAILURE frame, so the peer learns why
            raise hs.error
        if hs.done:
            self.state = _HS_DONE

    def _flush(self) -> None:
        if self.out:
            try:
                n = self.sock.send(self.out)
            except _SSL_RETRY:
                n = 0
            del self.out[:n]
        self._want_write(bool(self.out))

    def _writable(self) -> None:
        if self.state == _HS_TLS:
            # the TLS handshake wants to write, or has just begun
            try:
                if not self._tls():
                    return
            except Exception as exc:
                self._fail(exc)
                return
            # bytes behind the handshake may already sit decrypted in the SSL object
            self._readable()
            return
        try:
            self._flush()
        except Exception as exc:
            self._fail(exc)
            return
        if self.state == _HS_DONE:
            self._succeed()

    def _expired(self) -> None:
        self.timer = None
        self._fail(TimeoutError(f"handshake not finished in {self.server.handshake_timeout} s"))

    def _detach(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.loop.is_closed():
            self.loop.remove_reader(self.fd)
            if self.writing:
                self.loop.remove_writer(self.fd)
        self.writing = False
        self.owner._handshakes.discard(self)

    def _succeed(self) -> None:
        if self not in self.owner._handshakes:
            return
        if self.out:
            self._fail(ProtocolError("handshake finished with replies unsent"))
            return
        self._detach()
        self.owner._authenticated(self.sock, self.addr)

    def _fail(self, exc: BaseException) -> None:
        if self not in self.owner._handshakes:
            return
        self._detach()
        _quiet_close(self.sock)
        self.owner._handshake_failed(self.addr, exc)

    def abort(self) -> None:
        """Close without counting a failure (shutdown)."""
        if self not in self.owner._handshakes:
            return
        self._detach()
        _quiet_close(self.sock)
        self.owner._release()


# -- process bookkeeping --------------------------------------------------------------


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


class _Threads(list[threading.Thread]):
    """The non-daemon threads of requests in progress; finished ones are dropped as new ones come."""

    def append(self, thread: threading.Thread) -> None:
        self[:] = [t for t in self if t.is_alive()]
        if not thread.daemon:
            super().append(thread)

    def join(self) -> None:
        me = threading.current_thread()
        threads, self[:] = self[:], []
        for t in threads:
            if t is not me:
                t.join()


class _OneHandshake:
    """The owner of the one _Handshake that handle_request() runs."""

    def __init__(self) -> None:
        self._handshakes: set[_Handshake] = set()
        self.done = False
        self.sock: socket.socket | None = None
        self.error: BaseException | None = None

    def _authenticated(self, sock: socket.socket, addr: Any) -> None:
        self.sock = sock
        self.done = True

    def _handshake_failed(self, addr: Any, exc: BaseException) -> None:
        self.error = exc
        self.done = True

    def _release(self) -> None:
        self.done = True


# -- servers ------------------------------------------------------------------------


class BaseServer:
    """The machinery shared by stream and datagram servers; see the module docstring.

    socketserver's hooks keep their meaning: ``server_bind()``,
    ``server_activate()``, ``get_request()``, ``verify_request(request,
    client_address)``, ``process_request``, ``finish_request``,
    ``handle_error``, ``shutdown_request``, ``close_request``,
    ``handle_request()``, ``handle_timeout()``, ``service_actions()``,
    ``server_close()``, ``fileno()``, and the class attributes
    ``address_family``, ``socket_type``, ``allow_reuse_address``,
    ``allow_reuse_port``, ``request_queue_size``, ``timeout``,
    ``daemon_threads`` and ``block_on_close``.

    ``address_family`` is ``AF_INET`` on the TCP and UDP classes, as in
    socketserver; as long as a subclass does not set it, the family
    follows the address (``("::1", 0)`` serves IPv6) and the instance's
    ``address_family`` says which it is. A subclass that sets it gets
    exactly that family.

    An overridden ``get_request()`` is called for every connection (or
    datagram) instead of ``accept()`` (``recvfrom()``); an overridden
    ``process_request()`` is called for every verified, authenticated
    request, and ``super().process_request()`` hands the request to the
    concurrency mode. Where a mode cannot honour an override (a
    ``get_request()`` under prefork, whose workers cannot take over a
    socket's TLS state; or with a MessageHandler, which reads frames off
    the bare socket) the class or the server is refused with a TypeError.
    """

    concurrency = "loop"
    address_family: int | None = None
    socket_type = socket.SOCK_STREAM
    allow_reuse_address = True
    allow_reuse_port = False
    request_queue_size = 128
    #: Seconds handle_request() waits for a request before handle_timeout().
    timeout: float | None = None
    #: Threads handle_request() starts (concurrency="thread") are daemon threads.
    daemon_threads = False
    #: server_close() waits for the requests in progress (threads, children, connections).
    block_on_close = True
    max_packet_size: int      # datagram servers
    # set when serving starts
    _loop: EventLoop

    def __init__(self, server_address: Address, RequestHandlerClass: Callable[..., Any],
                 bind_and_activate: bool = True, *,
                 concurrency: str | None = None, workers: int | None = None,
                 worker_threads: int = DEFAULT_WORKER_THREADS, allow: Any = None,
                 authkey: bytes | None = None, max_connections: int | None = DEFAULT_MAX_CONNECTIONS,
                 overflow: str = "wait", max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
                 idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
                 handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
                 shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT, strict: bool = False,
                 digest: str | None = "sha256", backend: str = "auto",
                 ssl_context: ssl.SSLContext | None = None) -> None:
        concurrency = concurrency or type(self).concurrency
        if concurrency not in CONCURRENCY:
            raise ValueError(f"concurrency must be one of {CONCURRENCY}, not {concurrency!r}")
        if overflow not in ("wait", "refuse"):
            raise ValueError("overflow must be 'wait' or 'refuse'")
        if max_connections is None or max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if authkey is not None and not isinstance(authkey, bytes):
            raise TypeError("authkey should be a byte string")
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise TypeError(f"ssl_context must be an ssl.SSLContext, not {type(ssl_context).__name__}")
        self._framed = isinstance(RequestHandlerClass, type) and issubclass(RequestHandlerClass, MessageHandler)
        stream = self.socket_type == socket.SOCK_STREAM
        if not stream:
            if self._framed:
                raise TypeError("a MessageHandler needs a stream server (TCPServer or UnixServer)")
            if concurrency == "prefork":
                raise ValueError("prefork hands connections to workers; a datagram server has none "
                                 "(use concurrency='thread' or 'fork')")
            if authkey is not None:
                raise ValueError("authkey needs a stream server")
            if ssl_context is not None:
                raise ValueError("ssl_context needs a stream server: TLS runs over a connection "
                                 "and a datagram server has none (DTLS is not supported)")
        self._check_hooks(concurrency, self._framed)
        declared = self._declared_family()
        fam, addr = parse_address(server_address, declared)
        if allow is not None and fam == socket.AF_UNIX:
            raise ValueError("allow= lists IP networks; it does not apply to AF_UNIX servers")
        if declared is None:
            self._check_family(fam)
        self.server_address = server_address
        self.RequestHandlerClass = RequestHandlerClass
        self.address_family = fam
        self._bind_address = addr
        self.concurrency = concurrency
        if workers is None:
            if concurrency == "prefork":
                workers = os.cpu_count() or 2
            elif concurrency == "fork":
                # ForkingMixIn's bound on children, socketserver's name for it
                workers = getattr(self, "max_children", _DEFAULT_WORKERS["fork"])
            else:
                workers = _DEFAULT_WORKERS.get(concurrency, 1)
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.workers = workers
        self.worker_threads = worker_threads
        self.authkey = authkey
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.overflow = overflow
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.shutdown_timeout = shutdown_timeout
        self.strict = strict
        self.digest = digest
        self.backend = backend
        self._allow = self._parse_allow(allow)
        self._limit = min(max_connections, workers) if concurrency == "fork" else max_connections
        self._unlink: str | None = None
        self._loop = None  # type: ignore[assignment]
        self._engine: _Engine | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._serving_thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopped = threading.Event()
        self._start_error: BaseException | None = None
        self._state = "new"          # new -> serving -> closed
        self._shutting_down = False
        self._forced = False
        self._accepting = False
        self._backoff: _reactor_TimerHandle | None = None
        self._handshakes: set[_Handshake] = set()
        self._children: dict[int, _Child] = {}          # fork mode: pid -> _Child
        self._workers: list[_Child] = []           # prefork
        self._watched: dict[int, tuple[_Child, Callable[[_Child], object]]] = {}  # pid -> child, on_exit
        self._forksrv: ForkServer | None = None
        self._in_child = False
        self._open = 0
        self._total = 0
        self._refused = 0
        self._auth_failed = 0
        self._pool: _Pool | None = None
        self._stop_requested: float | None = None
        self._sig_socks: tuple[socket.socket, socket.socket] | None = None
        self._old_signals: dict[int, Any] = {}
        self._idle_closed = 0
        self._restarts = 0
        self._quick_deaths = 0
        self._counters = [0, 0, 0, 0]    # messages in/out, bytes in/out of finished work
        self._child_failed = False       # a fork child's only connection failed its handshake
        self._out_lock = threading.Lock()
        self._via_loop = False           # process_request() called by the serving loop
        self._threads = _Threads()       # handle_request()'s threads, joined by server_close()
        self._forked: set[int] = set()   # handle_request()'s children
        self.socket = socket.socket(fam, self.socket_type)
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                self.server_close()
                raise

    # -- socketserver's surface ------------------------------------------------

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._check_hooks(cls.concurrency, False)

    @classmethod
    def _check_hooks(cls, concurrency: str, framed: bool) -> None:
        """Refuse overridden hooks the concurrency mode or handler style could not honour."""
        if cls.get_request is BaseServer.get_request:
            return
        if concurrency == "prefork":
            raise TypeError(f"{cls.__name__} overrides get_request(), which prefork cannot honour: "
                            "the acceptor passes bare sockets to its workers and cannot move a "
                            "wrapped socket's state (TLS) with them; use concurrency='thread' or "
                            "'fork', or ssl_context= instead of wrapping in get_request()")
        if framed:
            raise TypeError(f"{cls.__name__} overrides get_request(), which a MessageHandler cannot "
                            "honour: its frames are read off the bare socket by the event loop; "
                            "use ssl_context= for TLS, or a blocking handler")

    @classmethod
    def _declared_family(cls) -> int | None:
        """The family a subclass sets; None where fastnet's classes leave it to the address."""
        for klass in cls.__mro__:
            if "address_family" in vars(klass):
                if klass in _FAMILY_FROM_ADDRESS:
                    return None
                fam: int | None = vars(klass)["address_family"]
                return fam
        return None

    def _check_family(self, fam: int) -> None:
        pass

    @staticmethod
    def _parse_allow(allow: Any) -> dict[int, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] | None:
        if allow is None:
            return None
        if isinstance(allow, (str, ipaddress.IPv4Network, ipaddress.IPv6Network)):
            allow = [allow]
        nets: dict[int, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {4: [], 6: []}
        for item in allow:
            net = ipaddress.ip_network(item, strict=False)
            nets[net.version].append(net)
        return nets

    def server_bind(self) -> None:
        """Bind the socket (SO_REUSEADDR when ``allow_reuse_address``)."""
        if self.address_family != socket.AF_UNIX:
            if self.allow_reuse_address:
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.allow_reuse_port and hasattr(socket, "SO_REUSEPORT"):
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        _bind(self.socket, self._bind_address)
        addr = self._bind_address
        if self.address_family == socket.AF_UNIX and isinstance(addr, str) and not addr.startswith("\0"):
            self._unlink = addr
        self.server_address = self.address

    def server_activate(self) -> None:
        """Listen (stream servers)."""
        if self.socket_type == socket.SOCK_STREAM:
            self.socket.listen(self.request_queue_size)

    @property
    def address(self) -> Any:
        """The bound address (the real port when 0 was asked for; AF_UNIX names as str)."""
        name = self.socket.getsockname()
        if isinstance(name, bytes):
            name = name.decode("utf-8", "surrogateescape")
        return name

    def fileno(self) -> int:
        return self.socket.fileno()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Return False to refuse a request (checked after the allow-list)."""
        return True

    def get_request(self) -> tuple[Any, Any]:
        """Take one request from the listening socket: ``accept()``, or for a
        datagram server ``((data, socket), client_address)``.

        Override it to wrap each connection (in TLS, say); it is called on
        the serving thread, where the listening socket is non-blocking.
        """
        if self.socket_type == socket.SOCK_STREAM:
            return self.socket.accept()
        data, addr = self.socket.recvfrom(self.max_packet_size)
        return (data, self.socket), addr

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve one verified (and authenticated) request in the server's concurrency mode.

        Under ``serve_forever()`` the request goes to the loop, the thread
        pool, a forked child or a prefork worker. Under
        ``handle_request()``: "loop" serves it on the calling thread, as
        socketserver's plain servers do, "thread" on a new thread
        (``daemon_threads``), "fork" and "prefork" in a forked child. An
        override that does not call this takes the request over (it must
        end it with ``shutdown_request()``, as in socketserver).
        """
        if self._via_loop:
            self._via_loop = False
            self._dispatch(request, client_address)
            return
        mode = self.concurrency
        if mode == "thread":
            t = threading.Thread(target=self._serve_request, args=(request, client_address),
                                 name="fastnet-request", daemon=self.daemon_threads)
            if self.block_on_close:
                self._threads.append(t)
            t.start()
        elif mode in ("fork", "prefork"):
            self._fork_request(request, client_address)
        else:
            self._prepare(request)
            self.finish_request(request, client_address)
            self.shutdown_request(request)

    def _prepare(self, request: Any) -> None:
        if self.socket_type == socket.SOCK_STREAM:
            request.setblocking(True)
            request.settimeout(self.idle_timeout)

    def _serve_request(self, request: Any, client_address: Any) -> None:
        """finish_request() on one request, errors to handle_error(), then shutdown_request()."""
        try:
            self._prepare(request)
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def _fork_request(self, request: Any, client_address: Any) -> None:
        # handle_request()'s child: socketserver's ForkingMixIn, bounded by workers
        self._collect_children(blocking=False)
        while len(self._forked) >= self.workers:
            self._collect_children(blocking=True, one=True)
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                self._in_child = True
                self._serve_request(request, client_address)
                status = 0
            finally:
                os._exit(status)
        self._forked.add(pid)
        self.close_request(request)

    def _collect_children(self, blocking: bool, one: bool = False) -> None:
        for pid in list(self._forked):
            try:
                done, _ = os.waitpid(pid, 0 if blocking else os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._forked.discard(pid)
                if one:
                    return

    def handle_request(self) -> None:
        """Wait for one request and serve it, as socketserver's ``handle_request()``.

        Waits at most ``timeout`` seconds (or the listening socket's own
        timeout, whichever is shorter; ``None``: no limit), then calls
        ``handle_timeout()``. The request goes through ``get_request()``,
        the allow-list, ``verify_request()``, the handshakes and
        ``process_request()``. For blocking handlers, on a server that is
        not serving (``serve_forever()``/``start()``).
        """
        if self._framed:
            raise TypeError("handle_request() serves blocking handlers; a MessageHandler "
                            "is served by serve_forever() or start()")
        if self._state == "serving":
            raise RuntimeError("handle_request() on a server that is serving")
        timeout = self.socket.gettimeout()
        if timeout is None:
            timeout = self.timeout
        elif self.timeout is not None:
            timeout = min(timeout, self.timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        sel = selectors.PollSelector() if hasattr(selectors, "PollSelector") else selectors.SelectSelector()
        with sel:
            sel.register(self.socket, selectors.EVENT_READ)
            while True:
                if sel.select(timeout):
                    self._handle_request_noblock()
                    return
                if deadline is not None:
                    timeout = deadline - time.monotonic()
                    if timeout < 0:
                        self.handle_timeout()
                        return

    def _handle_request_noblock(self) -> None:
        try:
            request, client_address = self.get_request()
        except OSError:
            return
        if isinstance(client_address, bytes):
            client_address = client_address.decode("utf-8", "surrogateescape")
        if not (self._allowed(client_address) and self.verify_request(request, client_address)):
            self._refuse(request, client_address)
            return
        if self.socket_type == socket.SOCK_STREAM and (self.authkey is not None or self.ssl_context is not None):
            request = self._handshake_now(request, client_address)
            if request is None:
                return
        self._process_request(request, client_address)

    def _process_request(self, request: Any, client_address: Any) -> None:
        """process_request() with socketserver's handling of what it raises."""
        try:
            self.process_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        except BaseException:
            self.shutdown_request(request)
            raise

    def _handshake_now(self, sock: socket.socket, addr: Any) -> socket.socket | None:
        """Run one connection's handshakes to the end on a loop of their own (handle_request)."""
        box = _OneHandshake()
        loop = EventLoop(self.backend)
        try:
            _Handshake(self, loop, sock, addr, owner=box)
            loop.run_until(lambda: box.done)
        finally:
            loop.close()
        if box.sock is None:
            self._auth_failed += 1
            logger.info("handshake with %r failed: %s", addr, box.error)
            return None
        return box.sock

    def handle_timeout(self) -> None:
        """Called when handle_request() waited ``timeout`` seconds for nothing.

        Reaps the children handle_request() forked that have exited.
        """
        self._collect_children(blocking=False)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Run the handler class on one request."""
        self.RequestHandlerClass(request, client_address, self)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Called with the exception a handler (or process_request) raised; the server goes on.

        Logs it; a peer that left or went idle (``ConnectionError``, a
        socket timeout) is logged at debug level only.
        """
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout)):
            logger.debug("connection from %r ended: %r", client_address, exc)
            return
        logger.exception("exception while handling a request from %r", client_address)

    def shutdown_request(self, request: Any) -> None:
        """End a stream request: shut down writing (the peer sees EOF), then close.

        Over TLS a close_notify goes first, so the peer can tell the end
        from a cut connection.
        """
        if self.socket_type == socket.SOCK_STREAM:
            if isinstance(request, ssl.SSLSocket):
                _tls_goodbye(request)
            _shut(request, socket.SHUT_WR)
        self.close_request(request)

    def close_request(self, request: Any) -> None:
        if self.socket_type == socket.SOCK_STREAM:
            request.close()

    def service_actions(self) -> None:
        """Called about every poll_interval seconds while serving, as in socketserver."""

    def _report_handler_error(self, exc: BaseException, handler: object) -> None:
        logger.error("exception in %s from %r", type(handler).__name__,
                     getattr(handler, "client_address", None), exc_info=(type(exc), exc, exc.__traceback__))

    # -- stats ------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters: connections open/total/refused, handshake failures, messages/bytes in/out.

        Messages and bytes count MessageHandler frames (on the wire, headers
        included) and datagrams; in fork and prefork modes a connection's
        figures arrive when it closes. For datagram servers "connections"
        are datagrams being handled / handled.
        """
        c = list(self._counters)
        eng = self._engine
        if eng is not None:
            for i, v in enumerate(eng.live()):
                c[i] += v
        out: dict[str, Any] = {
            "connections_open": self._open,
            "connections_total": self._total,
            "connections_refused": self._refused,
            "handshake_failures": self._auth_failed,
            "idle_closed": self._idle_closed,
            "messages_in": c[0],
            "messages_out": c[1],
            "bytes_in": c[2],
            "bytes_out": c[3],
        }
        if self.concurrency == "prefork":
            out["workers"] = sum(1 for w in list(self._workers) if w.alive)
            out["worker_restarts"] = self._restarts
        elif self.concurrency == "fork":
            out["children"] = len(self._children)
        return out

    @property
    def worker_pids(self) -> list[int]:
        """The pids of the live prefork workers (or forked children)."""
        if self.concurrency == "prefork":
            return [w.pid for w in list(self._workers) if w.alive]
        return list(self._children)

    def _count_out(self, nbytes: int) -> None:
        with self._out_lock:
            self._counters[1] += 1
            self._counters[3] += nbytes

    def _add(self, counters: Sequence[int] | None) -> None:
        if counters:
            c = self._counters
            for i in range(4):
                c[i] += counters[i]

    # -- running ----------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5, *,
                      stop_signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
        """Serve until shutdown(). In the main thread, ``stop_signals`` shut down gracefully.

        A stop signal that is ignored when serving starts (``nohup``, a
        shell's background job) stays ignored: whoever started the process
        asked for that. Stop such a server with another signal or shutdown().
        """
        with self._lock:
            if self._state != "new":
                raise RuntimeError("the server is already serving or closed")
            self._state = "serving"
            self._serving_thread = threading.current_thread()
        try:
            self._start_forkserver()
            loop = EventLoop(self.backend)
            with self._lock:
                self._loop = loop
                stop = self._stop_requested
            if threading.current_thread() is threading.main_thread() and stop_signals:
                self._install_stop_signals(stop_signals)
            if type(self).service_actions not in (BaseServer.service_actions, ForkingMixIn.service_actions) and poll_interval:
                self._schedule_service(poll_interval)
            self._begin()
            if stop is not None:
                self._begin_shutdown(stop)
        except BaseException as exc:
            self._start_error = exc
            self._started.set()
            self._teardown()
            raise
        self._started.set()
        try:
            loop.run_until(self._done)
        finally:
            self._teardown()

    def start(self, timeout: float = 30.0) -> Self:
        """Serve on a background thread; returns self once serving has begun."""
        if self._state == "new":
            self._start_forkserver()      # before the server's thread exists
        t = threading.Thread(target=self._serve_quietly, name="fastnet-server", daemon=True)
        self._thread = t
        t.start()
        if not self._started.wait(timeout):
            raise TimeoutError("the server did not start in time")
        if self._start_error is not None:
            raise self._start_error
        return self

    def _serve_quietly(self) -> None:
        try:
            self.serve_forever(stop_signals=())
        except BaseException:
            if self._start_error is None:
                logger.exception("server thread failed")

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, let connections finish and drain, close, join; then return.

        Whatever is still open after ``timeout`` seconds (default
        ``shutdown_timeout``) is closed, and children are killed. Called
        from a handler or the serving thread it starts the shutdown and
        returns at once.
        """
        self._stop(timeout, wait=True)

    def _stop(self, timeout: float | None, wait: bool) -> None:
        if timeout is None:
            timeout = self.shutdown_timeout
        with self._lock:
            state = self._state
            if state == "new":
                self._state = "closed"
            if self._stop_requested is None:
                self._stop_requested = timeout
            loop = self._loop
        if state == "new":
            self.server_close()
            return
        if loop is not None:
            self._interrupt_blocking()
            try:
                loop.call_soon_threadsafe(self._begin_shutdown, timeout)
            except RuntimeError:
                pass
        me = threading.current_thread()
        if not wait or me is self._serving_thread or getattr(_local, "in_handler", False):
            return
        self._stopped.wait()
        if self._thread is not None and self._thread is not me:
            self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()

    def server_close(self) -> None:
        """Close the listening socket and remove its AF_UNIX path.

        A serving server shuts down first; with ``block_on_close`` (the
        default) this waits for the requests in progress (as shutdown()
        does), and for the threads and children of handle_request(), as
        socketserver's mixins do. With ``block_on_close = False`` it
        returns without waiting for them.
        """
        if (self._state == "serving" and not self._in_child
                and threading.current_thread() is not self._serving_thread):
            self._stop(None, wait=self.block_on_close)
        sock = self.socket
        if sock is not None and sock.fileno() >= 0:
            sock.close()
        if self._in_child:
            return
        if self._forksrv is not None and self._state != "serving":
            self._forksrv.close()
        if self._unlink is not None:
            try:
                os.unlink(self._unlink)
            except OSError:
                pass
            self._unlink = None
        if self.block_on_close:
            self._threads.join()
        self._collect_children(blocking=self.block_on_close)

    def _interrupt_blocking(self) -> None:
        # blocking handlers read end of file; needed from outside the loop,
        # which a serial (concurrency="loop") handler keeps busy
        eng = self._engine
        if eng is not None and not eng.framed:
            for c in list(eng.conns):
                c.shutdown()

    def _install_stop_signals(self, sigs: Iterable[int]) -> None:
        # Our own handlers rather than the loop's: a signal must also reach a
        # blocking handler running on this (main) thread. The handler takes
        # no locks; it wakes the loop through a socket of its own.
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._sig_socks = (r, w)
        self._loop.add_reader(r, self._on_stop_wake)
        for sig in sigs:
            if signal.getsignal(sig) is not signal.SIG_IGN:   # ignored by our starter: stays so
                self._old_signals[sig] = signal.signal(sig, self._on_stop_signal)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self._interrupt_blocking()
        try:
            self._sig_socks[1].send(b"s")  # type: ignore[index]  # errors caught
        except (OSError, AttributeError, TypeError):
            pass

    def _on_stop_wake(self) -> None:
        try:
            self._sig_socks[0].recv(64)  # type: ignore[index]
        except OSError:
            pass
        if self._shutting_down:
            self._force()        # a second signal: stop waiting for connections
        else:
            self._begin_shutdown(None)

    def _remove_stop_signals(self) -> None:
        for sig, old in self._old_signals.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old_signals = {}
        if self._sig_socks is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sig_socks[0])
            for sk in self._sig_socks:
                sk.close()
            self._sig_socks = None

    def _schedule_service(self, interval: float) -> None:
        def tick() -> None:
            if self._shutting_down:
                return
            try:
                self.service_actions()
            except Exception:
                logger.exception("exception in service_actions()")
            self._loop.call_later(interval, tick)
        self._loop.call_later(interval, tick)

    def _begin(self) -> None:
        loop = self._loop
        self.socket.setblocking(False)
        if self.concurrency in ("loop", "thread"):
            threaded = self.concurrency == "thread"
            if self.socket_type == socket.SOCK_STREAM:
                self._engine = _Engine(self, loop, threaded, self.workers,
                                       lambda counters: self._release(),
                                       on_failed=self._handshake_failed)
            elif threaded:
                self._pool = _Pool(loop, self.workers, "fastnet-server")
        if self._forksrv is not None:
            loop.add_reader(self._forksrv.events, self._forkserver_exits)
        if self.concurrency == "prefork":
            for _ in range(self.workers):
                self._spawn_worker()
        self._resume()

    def _done(self) -> bool:
        return self._shutting_down and (self._forced or (
            self._open == 0 and not self._workers and not self._children and not self._handshakes))

    def _begin_shutdown(self, timeout: float | None = None) -> None:
        if self._shutting_down:
            return
        self._shutting_down = True
        if timeout is None:
            timeout = self.shutdown_timeout
        loop = self._loop
        self._pause()
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None
        if self.socket_type == socket.SOCK_STREAM:
            # no new connection waits in a backlog nobody will accept from
            self.server_close()
        for hs in list(self._handshakes):
            hs.abort()
        if self._engine is not None:
            self._engine.begin_shutdown()
        for child in list(self._children.values()):
            self._signal(child, signal.SIGTERM)
        for w in self._workers:
            # end of file on its channel: the worker drains and exits
            _shut(w.chan, socket.SHUT_WR)
        loop.call_later(timeout, self._force)

    def _force(self) -> None:
        self._forced = True

    def _teardown(self) -> None:
        loop = self._loop
        try:
            for hs in list(self._handshakes):
                hs.abort()
            eng = self._engine
            if eng is not None:
                eng.abort_all()
                eng.stop(1.0)
            pool = getattr(self, "_pool", None)
            if pool is not None:
                pool.stop(1.0)
            for child in list(self._children.values()) + list(self._workers):
                _quiet_close(child.chan)
            self._children.clear()
            self._workers = []
            self._watched.clear()
            if self._forksrv is not None:
                if loop is not None and not loop.is_closed():
                    loop.remove_reader(self._forksrv.events)
                self._forksrv.close()    # kills and reaps what is left
            self._remove_stop_signals()
            if loop is not None and not loop.is_closed():
                loop.close()
        finally:
            with self._lock:
                self._state = "closed"
                # a finished thread is not kept alive by a server that outlives it
                self._serving_thread = None
            self.server_close()
            self._started.set()
            self._stopped.set()

    # -- accepting ------------------------------------------------------------

    def _pause(self) -> None:
        if self._accepting:
            self._accepting = False
            if self.socket.fileno() >= 0 and not self._loop.is_closed():
                self._loop.remove_reader(self.socket)

    def _resume(self) -> None:
        self._backoff = None
        if (not self._accepting and not self._shutting_down and self._open < self._limit
                and self.socket.fileno() >= 0):
            self._accepting = True
            cb = self._on_accept if self.socket_type == socket.SOCK_STREAM else self._on_datagram
            self._loop.add_reader(self.socket, cb)

    def _release(self, counters: Sequence[int] | None = None) -> None:
        """One connection (or handshake, or datagram) is done."""
        self._open -= 1
        self._add(counters)
        if not self._accepting and self._open < self._limit:
            self._resume()

    def _allowed(self, addr: Any) -> bool:
        nets = self._allow
        if nets is None:
            return True
        try:
            ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
        except (ValueError, TypeError, IndexError):
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            if any(ip.ipv4_mapped in n for n in nets[4]):
                return True
        return any(ip in n for n in nets[ip.version])

    def _on_accept(self) -> None:
        accept = self.socket.accept if type(self).get_request is BaseServer.get_request else self.get_request
        for _ in range(_ACCEPT_BATCH):
            if self._shutting_down or self._stop_requested is not None:
                return
            if self._open >= self._limit and self.overflow == "wait":
                self._pause()
                return
            try:
                sock, addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _ACCEPT_BACKOFF:
                    logger.warning("accept() failed (%s): pausing for %.1f s", exc, _ACCEPT_BACKOFF_DELAY)
                    self._pause()
                    self._backoff = self._loop.call_later(_ACCEPT_BACKOFF_DELAY, self._resume)
                    return
                if accept is self.socket.accept:
                    raise
                # an overriding get_request() failed on this connection (a TLS
                # handshake, say): socketserver drops the request and goes on
                logger.info("get_request() failed: %s", exc)
                continue
            if isinstance(addr, bytes):
                addr = addr.decode("utf-8", "surrogateescape")
            if self._open >= self._limit or not self._allowed(addr):
                self._refuse(sock, addr)
                continue
            try:
                ok = self.verify_request(sock, addr)
            except Exception:
                logger.exception("exception in verify_request for %r", addr)
                ok = False
            if not ok:
                self._refuse(sock, addr)
                continue
            self._open += 1
            self._total += 1
            # The handshakes run where the connection will be served: framed
            # TLS in its TLSTransport, prefork TLS in the worker, the rest here.
            if self.ssl_context is not None:
                # TLS state cannot move to another process
                here = not self._framed and self.concurrency not in ("fork", "prefork")
            else:
                here = self.authkey is not None
            if here:
                try:
                    _Handshake(self, self._loop, sock, addr)
                except Exception:
                    logger.exception("failed to start a handshake with %r", addr)
                    _quiet_close(sock)
                    self._release()
            else:
                self._process(sock, addr)

    def _refuse(self, request: Any, addr: Any) -> None:
        """A refused request ends, as any other, in shutdown_request()."""
        self._refused += 1
        logger.debug("refused %r", addr)
        try:
            self.shutdown_request(request)
        except Exception:
            logger.exception("exception in shutdown_request for %r", addr)
            if self.socket_type == socket.SOCK_STREAM:
                _quiet_close(request)

    def _process(self, request: Any, addr: Any) -> None:
        """Call process_request() on an open request from the serving loop.

        The base method dispatches it to the concurrency mode, which
        releases its slot when done; an override that serves it itself
        (or fails) has finished with it when it returns.
        """
        if not self._framed:
            self._prepare(request)
        self._via_loop = True
        try:
            self._process_request(request, addr)
        finally:
            if self._via_loop:
                self._via_loop = False
                self._release()

    def _handshake_failed(self, addr: Any, exc: BaseException) -> None:
        self._auth_failed += 1
        logger.info("handshake with %r failed: %s", addr, exc)
        self._release()

    def _authenticated(self, sock: socket.socket, addr: Any) -> None:
        if self._shutting_down:
            sock.close()
            self._release()
            return
        self._process(sock, addr)

    def _dispatch(self, sock: Any, addr: Any) -> None:
        """Hand a verified (and authenticated) request to the concurrency mode."""
        if self.socket_type != socket.SOCK_STREAM:
            self._dispatch_datagram(sock, addr)
            return
        mode = self.concurrency
        try:
            if mode == "prefork":
                self._to_worker(sock, addr)
            elif mode == "fork":
                self._fork_connection(sock, addr)
            else:
                self._engine.serve(sock, addr)  # type: ignore[union-attr]  # loop and thread modes have one
        except Exception:
            logger.exception("failed to start serving %r", addr)
            _quiet_close(sock)
            self._release()

    def _handle_stream(self, sock: socket.socket, addr: Any) -> None:
        """Run a blocking handler on one connection (any thread or process)."""
        self._serve_request(sock, addr)

    # -- datagrams --------------------------------------------------------------

    def _on_datagram(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            if self._shutting_down:
                return
            if self._open >= self._limit:
                self._pause()
                return
            try:
                request, addr = self.get_request()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # e.g. ECONNREFUSED left by an ICMP error for an earlier reply
                logger.debug("recvfrom failed: %s", exc)
                continue
            if isinstance(addr, bytes):
                addr = addr.decode("utf-8", "surrogateescape")
            if not self._allowed(addr):
                self._refuse(request, addr)
                continue
            try:
                ok = self.verify_request(request, addr)
            except Exception:
                logger.exception("exception in verify_request for %r", addr)
                ok = False
            if not ok:
                self._refuse(request, addr)
                continue
            self._total += 1
            self._counters[0] += 1
            self._counters[2] += len(request[0])
            self._open += 1
            self._process(request, addr)

    def _dispatch_datagram(self, request: Any, addr: Any) -> None:
        mode = self.concurrency
        if mode == "loop":
            try:
                self._handle_datagram(request, addr)
            finally:
                self._release()
        elif mode == "thread":
            self._pool.submit(self._handle_datagram, (request, addr),  # type: ignore[union-attr]
                              lambda exc: self._release())
        else:
            try:
                child = self._fork(("datagram", request[0], addr), self._child_exited, request[1])
            except Exception:
                logger.exception("failed to fork for a datagram from %r", addr)
                self._release()
            else:
                self._children[child.pid] = child

    def _child_datagram(self, request: Any, addr: Any) -> list[int]:
        self._handle_datagram(request, addr)
        return self._counters

    def _handle_datagram(self, request: Any, addr: Any) -> None:
        self._serve_request(request, addr)

    # -- processes ---------------------------------------------------------------

    def _start_forkserver(self) -> None:
        """Fork the fork server (fork and prefork modes), once, before the server has threads."""
        if (self.concurrency in ("fork", "prefork") and self._forksrv is None and not self._in_child
                and self._state != "closed"):
            self._forksrv = ForkServer(self._run_forked, self._forkserver_init)

    def _forkserver_init(self) -> None:
        """In the fork server, once: what every child it forks inherits."""
        self._in_child = True
        try:
            signal.set_wakeup_fd(-1)
        except (ValueError, OSError):
            pass
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent shuts down and tells us
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # the parent accepts; a datagram server's socket comes with each request
        self.socket.close()
        self._counters = [0, 0, 0, 0]    # a child reports only its own

    def _fork(self, request: tuple[Any, ...], on_exit: Callable[[_Child], object],
              sock: socket.socket | None = None) -> _Child:
        """Have the fork server fork a child serving ``request``; returns its _Child.

        ``request`` is ``("conn", addr)`` with the connection ``sock``,
        ``("datagram", data, addr)`` with the server's ``sock``, or
        ``("worker", slot)``. The child reports its counters on a SEQPACKET
        channel, whose other end is the _Child's ``chan``, and leaves with
        os._exit, never returning into the parent's loop.
        """
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            fds = [theirs.fileno()] if sock is None else [theirs.fileno(), sock.fileno()]
            pid = self._forksrv.fork(request, fds)  # type: ignore[union-attr]  # fork modes have one
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        mine.setblocking(False)
        child = _Child(pid, mine)
        self._watched[pid] = (child, on_exit)
        return child

    def _run_forked(self, request: tuple[Any, ...], fds: list[int]) -> int:
        """In a child of the fork server: serve ``request``, report, return the exit status."""
        status = 1
        try:
            chan = socket.socket(fileno=fds[0])
            idle_before = self._idle_closed
            kind = request[0]
            counters: Sequence[int] | None = None
            if kind == "worker":
                self._worker_main(chan, request[1])
            elif kind == "conn":
                counters = self._child_serve(socket.socket(fileno=fds[1]), request[1])
            else:
                self.socket = socket.socket(fileno=fds[1])
                counters = self._child_datagram((request[1], self.socket), request[2])
            if counters is not None:
                chan.settimeout(_REPORT_TIMEOUT)
                for _ in range(self._idle_closed - idle_before):
                    chan.send(_REPORT.pack(b"I", 0, 0, 0, 0))
                chan.send(_REPORT.pack(b"F" if self._child_failed else b"D", *counters))
            status = 0
        except BaseException:
            try:
                logger.exception("server child process failed")
            except BaseException:
                pass
        return status

    def _forkserver_exits(self) -> None:
        fs = self._forksrv
        assert fs is not None
        exits, gone = fs.exits()
        for pid, status in exits:
            entry = self._watched.pop(pid, None)
            if entry is not None:
                child, on_exit = entry
                child.status = status
                child.alive = False
                on_exit(child)
        if gone:
            # killed: no child can be forked or reaped any more, so the server
            # stops, as a prefork master without its arbiter would
            self._loop.remove_reader(fs.events)
            logger.error("the fork server %d exited; shutting down", fs.pid)
            self._begin_shutdown(None)
            # nobody will report the children: write them off, closing their channels
            watched, self._watched = self._watched, {}
            for child, on_exit in watched.values():
                child.alive = False
                on_exit(child)

    def _signal(self, child: _Child, sig: int) -> None:
        if child.status is None and self._forksrv is not None:
            self._forksrv.kill(child.pid, sig)

    def _read_reports(self, child: _Child) -> tuple[list[tuple[bytes, tuple[int, ...]]], bool]:
        """(reports, eof): (kind, counters) a child sent, one per finished connection.

        kind is b"D" for a connection served, b"F" for one that failed its handshake,
        b"I" (no counters) for a connection closed for being idle.
        """
        records, eof = read_records(child.chan, _REPORT)
        return [(r[0], r[1:]) for r in records], eof

    # fork mode

    def _fork_connection(self, sock: socket.socket, addr: Any) -> None:
        try:
            if isinstance(sock, ssl.SSLSocket):
                raise TypeError("a TLS socket wrapped by get_request() cannot be served under 'fork' "
                                "with serve_forever(): its TLS state lives in this process and the "
                                "children are forked by the fork server; use ssl_context=")
            child = self._fork(("conn", addr), self._child_exited, sock)
        finally:
            sock.close()   # the child has its copy
        self._children[child.pid] = child

    def _child_serve(self, sock: socket.socket, addr: Any) -> Sequence[int]:
        if not self._framed:
            if self.ssl_context is not None:
                # the handshakes run here: TLS state cannot move between processes
                tls = self._handshake_now(sock, addr)
                if tls is None:
                    self._child_failed = True
                    return self._counters
                sock = tls
            # SIGTERM from a shutting-down parent: the handler reads end of file
            signal.signal(signal.SIGTERM, lambda s, f: _shut(sock, socket.SHUT_RD))
            self._handle_stream(sock, addr)
            return self._counters
        loop = EventLoop(self.backend)

        def failed(addr: Any, exc: BaseException) -> None:
            logger.info("handshake with %r failed: %s", addr, exc)
            self._child_failed = True

        engine = _Engine(self, loop, threaded=False, on_failed=failed)
        loop.add_signal_handler(signal.SIGTERM, engine.begin_shutdown)
        engine.serve(sock, addr)
        loop.run_until(lambda: not engine.conns)
        engine.stop(0)
        return engine.totals

    def _child_exited(self, child: _Child) -> None:
        for kind, counters in self._read_reports(child)[0]:
            if kind == b"I":
                self._idle_closed += 1
                continue
            if kind == b"F":
                self._auth_failed += 1
            self._add(counters)
        child.chan.close()
        self._children.pop(child.pid, None)
        self._release()

    # prefork mode

    def _spawn_worker(self) -> _Child:
        # a replacement takes the slot of the worker it replaces
        taken = {w.slot for w in self._workers}
        slot = next(i for i in itertools.count() if i not in taken)
        w = self._fork(("worker", slot), self._worker_exited)
        w.slot = slot
        self._workers.append(w)
        self._loop.add_reader(w.chan, self._worker_report, w)
        return w

    def _respawn(self) -> None:
        if not self._shutting_down:
            self._spawn_worker()

    def _to_worker(self, sock: socket.socket, addr: Any) -> None:
        data = pickle.dumps(addr)
        fd = sock.fileno()
        for w in sorted((w for w in self._workers if w.alive), key=lambda w: (w.inflight, w.assigned)):
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
        self._refused += 1
        self._release()

    def _worker_report(self, w: _Child) -> None:
        reports, eof = self._read_reports(w)
        for kind, counters in reports:
            if kind == b"I":
                self._idle_closed += 1
                continue
            if w.inflight > 0:
                w.inflight -= 1
                if kind == b"F":
                    self._auth_failed += 1
                self._release(counters)
        if eof:
            # the worker is going; the fork server says when it is gone
            self._loop.remove_reader(w.chan)

    def _worker_exited(self, w: _Child) -> None:
        if w.chan.fileno() >= 0:
            for kind, counters in self._read_reports(w)[0]:
                if kind == b"I":
                    self._idle_closed += 1
                    continue
                if w.inflight > 0:
                    w.inflight -= 1
                    if kind == b"F":
                        self._auth_failed += 1
                    self._release(counters)
            if not self._loop.is_closed():
                self._loop.remove_reader(w.chan)
            w.chan.close()
        lost, w.inflight = w.inflight, 0
        if w in self._workers:
            self._workers.remove(w)
        if not self._shutting_down:
            logger.warning("prefork worker %d exited (status %r) with %d connections; replacing it",
                           w.pid, w.status, lost)
            self._restarts += 1
            # workers that die as soon as they start (a broken handler) are
            # replaced ever more slowly instead of in a tight fork loop
            if time.monotonic() - w.started < _QUICK_DEATH:
                self._quick_deaths += 1
            else:
                self._quick_deaths = 0
            if self._quick_deaths >= 3:
                delay = min(_RESPAWN_MAX_DELAY, 0.1 * 2 ** (self._quick_deaths - 3))
                self._loop.call_later(delay, self._respawn)
            else:
                self._spawn_worker()
        for _ in range(lost):
            self._release()

    def worker_started(self, slot: int) -> None:
        """Called in each prefork worker process as it starts, before it serves.

        ``slot`` is the worker's number, 0 to ``workers - 1``; a worker that
        replaces a dead one gets the dead one's slot. Does nothing by
        default: override it (or assign a callable on the instance) to set
        up per-worker state, such as counters in memory shared with the
        parent.
        """

    def _worker_main(self, chan: socket.socket, slot: int) -> None:
        """A prefork worker: sockets arrive on ``chan``; each finished one is reported."""
        self.worker_started(slot)
        loop = EventLoop(self.backend)
        chan.settimeout(_REPORT_TIMEOUT)

        def report(counters: Sequence[int] | None, kind: bytes = b"D") -> None:
            try:
                chan.send(_REPORT.pack(kind, *(counters or (0, 0, 0, 0))))
            except OSError:
                pass

        def failed(addr: Any, exc: BaseException) -> None:
            logger.info("handshake with %r failed: %s", addr, exc)
            report(None, b"F")

        engine = _Engine(self, loop, threaded=not self._framed, pool_size=self.worker_threads,
                         on_closed=report, on_failed=failed, tls_blocking=True)
        engine.on_idle = lambda: report(None, b"I")
        state = {"stopping": False}

        def stop() -> None:
            if state["stopping"]:
                return
            state["stopping"] = True
            loop.remove_reader(chan)
            engine.begin_shutdown()
            loop.call_later(self.shutdown_timeout, engine.abort_all)

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
        return None

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.address!r} concurrency={self.concurrency} "
                f"{self._state}>" if self.socket.fileno() >= 0 else f"<{type(self).__name__} closed>")


class TCPServer(BaseServer):
    """A TCP server: ``TCPServer(("", port), Handler, concurrency="loop", ...)``.

    ``address_family`` is ``AF_INET``, as in socketserver; unless a
    subclass sets it, an IPv6 address serves IPv6.
    """

    address_family = socket.AF_INET
    socket_type = socket.SOCK_STREAM

    def _check_family(self, fam: int) -> None:
        if fam == socket.AF_UNIX:
            raise ValueError("an AF_UNIX address: use UnixServer")


class UDPServer(BaseServer):
    """A UDP server: each datagram is a request ``(data, socket)``."""

    address_family = socket.AF_INET
    socket_type = socket.SOCK_DGRAM
    allow_reuse_address = False
    #: Largest datagram read; the rest of a longer one is dropped by the kernel.
    max_packet_size = 65536

    def _check_family(self, fam: int) -> None:
        if fam == socket.AF_UNIX:
            raise ValueError("an AF_UNIX address: use UnixDatagramServer")


# where a subclass does not set address_family, the address decides
_FAMILY_FROM_ADDRESS = (BaseServer, TCPServer, UDPServer)


class UnixServer(BaseServer):
    """An AF_UNIX stream server on a path or an abstract ``"\\0name"``."""

    address_family = socket.AF_UNIX
    socket_type = socket.SOCK_STREAM


UnixStreamServer = UnixServer


class UnixDatagramServer(BaseServer):
    """An AF_UNIX datagram server; replies go to the client's bound address."""

    address_family = socket.AF_UNIX
    socket_type = socket.SOCK_DGRAM
    max_packet_size = 65536


def _own_or_stdlib(mixin: type, name: str) -> Callable[..., Any]:
    """A mixin method: on fastnet's servers, the server's own (past ``mixin``
    in the MRO); on a stdlib socketserver server, ``mixin``'s."""
    stdlib = getattr(mixin, name)

    def method(self: Any, *args: Any) -> Any:
        if isinstance(self, BaseServer):
            return getattr(super(mixin, self), name)(*args)
        return stdlib(self, *args)

    method.__name__ = name
    method.__doc__ = stdlib.__doc__
    return method


class ThreadingMixIn(socketserver.ThreadingMixIn):
    """Serve on threads (socketserver's name).

    On fastnet's servers it makes ``concurrency="thread"`` the default.
    Mixed into a stdlib ``socketserver`` server it is socketserver's own
    mixin (a thread per request), so the result serves concurrently too.
    """
    concurrency = "thread"
    process_request = _own_or_stdlib(socketserver.ThreadingMixIn, "process_request")
    server_close = _own_or_stdlib(socketserver.ThreadingMixIn, "server_close")


class ForkingMixIn(socketserver.ForkingMixIn):
    """Serve in child processes (socketserver's name).

    On fastnet's servers it makes ``concurrency="fork"`` the default
    (``max_children`` bounds the children). Mixed into a stdlib
    ``socketserver`` server it is socketserver's own mixin (a process per
    request).
    """
    concurrency = "fork"
    process_request = _own_or_stdlib(socketserver.ForkingMixIn, "process_request")
    server_close = _own_or_stdlib(socketserver.ForkingMixIn, "server_close")
    handle_timeout = _own_or_stdlib(socketserver.ForkingMixIn, "handle_timeout")
    service_actions = _own_or_stdlib(socketserver.ForkingMixIn, "service_actions")


class PreforkMixIn:
    """Make a server class default to ``concurrency="prefork"`` (fastnet's servers only)."""
    concurrency = "prefork"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if issubclass(cls, socketserver.BaseServer):
            raise TypeError(f"{cls.__name__}: PreforkMixIn needs one of fastnet's servers "
                            "(fastnet.server.TCPServer, UnixServer), not a socketserver one")


class ThreadingTCPServer(ThreadingMixIn, TCPServer):
    pass


class ForkingTCPServer(ForkingMixIn, TCPServer):
    pass


class PreforkTCPServer(PreforkMixIn, TCPServer):
    pass


class ThreadingUDPServer(ThreadingMixIn, UDPServer):
    pass


class ForkingUDPServer(ForkingMixIn, UDPServer):
    pass


class ThreadingUnixStreamServer(ThreadingMixIn, UnixServer):
    pass


class ThreadingUnixDatagramServer(ThreadingMixIn, UnixDatagramServer):
    pass


class ForkingUnixStreamServer(ForkingMixIn, UnixServer):
    pass


class ForkingUnixDatagramServer(ForkingMixIn, UnixDatagramServer):
    pass
