"""The event loop: readiness callbacks, timers, worker threads, signals, framed servers.

``EventLoop(backend="auto")`` is the reactor kernel (``fastnet._kernels.reactor``:
epoll, poll or select; a timer heap; an eventfd wake-up) plus the policy
around it: logging of callback errors, a bounded worker pool whose results
come back on the loop thread, signal handlers, framed servers and clients,
and the Cookbook's ``EventHandler`` objects (recipe 11.12).

Everything runs on the thread that runs the loop; from other threads use
only ``call_soon_threadsafe`` and ``stop``. Create the loop after ``fork()``:
a loop and its epoll descriptor must not be shared between processes.

A framed protocol is any object with ``message_received(data)``; it may also
have ``connection_made(transport)``, ``connection_lost(exc)``,
``pause_writing()`` and ``resume_writing()`` (see :class:`Protocol`).

With an ``ssl_context``, ``add_stream``, ``create_server`` and ``connect``
run the protocol over TLS (:class:`fastnet.tls.TLSTransport`, the same
interface as FramedTransport): the TLS handshake, and an authkey handshake
inside it when ``authkey`` is given, run on the loop without blocking it,
and the protocol hears of the connection only once both succeeded.
"""
from __future__ import annotations

import concurrent.futures
import errno
import ipaddress
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from fastnet._kernels import reactor as _reactor
from fastnet.address import parse_address, bind as _bind
from fastnet.connection import _LOOP_UNIX_SNDBUF, _tune as _tune_socket
from fastnet.defaults import HANDSHAKE_TIMEOUT as DEFAULT_HANDSHAKE_TIMEOUT
from fastnet.defaults import MAX_MESSAGE_SIZE_CONNECTION as DEFAULT_MAX_MESSAGE_SIZE
from fastnet.errors import TimeoutError
from fastnet.tls import TLSTransport

if TYPE_CHECKING:
    import ssl

    from typing_extensions import TypeAlias

    from fastnet.address import Address

    # what add_stream returns: the kernel's transport, or TLS over the loop
    _Transport: TypeAlias = "_reactor.FramedTransport | TLSTransport"

__all__ = ["EventLoop", "EventHandler", "Protocol", "Server", "Handle", "TimerHandle",
           "FramedTransport", "TLSTransport", "BACKENDS", "DEFAULT_HIGH_WATER"]

logger = logging.getLogger("fastnet.loop")

Handle = _reactor.Handle
TimerHandle = _reactor.TimerHandle
FramedTransport = _reactor.FramedTransport
BACKENDS = _reactor.BACKENDS
#: Queued outgoing bytes above which a transport stops reading its peer.
DEFAULT_HIGH_WATER = _reactor.DEFAULT_HIGH_WATER

# Descriptor shortages at accept(): back off instead of spinning on a
# listening socket that stays readable.
_ACCEPT_BACKOFF = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_ACCEPT_BACKOFF_DELAY = 0.1
_ACCEPT_BATCH = 64


def _tune(sock: socket.socket) -> None:
    try:
        _tune_socket(sock, True, None, _LOOP_UNIX_SNDBUF)
    except OSError:
        pass


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    # The C-level handler already wrote signum to the wake-up descriptor;
    # the loop dispatches it from there.
    pass


class Protocol:
    """Base class for framed-message protocols; override what you need."""

    transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def message_received(self, data: bytes) -> None:
        raise NotImplementedError

    def connection_lost(self, exc: BaseException | None) -> None:
        pass

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


class EventHandler:
    """The Cookbook's event handler (recipe 11.12), run by ``EventLoop.add_handler``.

    The loop asks ``wants_to_receive()`` / ``wants_to_send()`` when the
    handler is added and again after each of its own ``handle_*`` calls,
    and changes the registered interest only when an answer changes. If
    something else changes what a handler wants, call
    ``loop.update_handler(handler)``. ``self.loop`` is the loop it was
    added to.
    """

    loop: EventLoop | None = None

    def fileno(self) -> Any:
        """Return the associated file descriptor."""
        raise NotImplementedError("must implement fileno()")

    def wants_to_receive(self) -> bool:
        """Return True if receiving is allowed."""
        return False

    def handle_receive(self) -> None:
        """Perform the receive operation."""

    def wants_to_send(self) -> bool:
        """Return True if sending is requested."""
        return False

    def handle_send(self) -> None:
        """Send outgoing data."""


class Server:
    """A listening socket on a loop that runs a framed protocol per accepted connection.

    Made by :meth:`EventLoop.create_server`. ``close()`` stops accepting;
    ``shutdown()`` also closes every connection after its queued writes.
    With TLS, connections still in their handshakes are among
    ``transports``; ``handshake_failures`` counts those refused (a bad
    certificate or key, a timeout).
    """

    def __init__(self, loop: EventLoop, sock: socket.socket, protocol_factory: Callable[[], Any], *,
                 max_message_size: int | None, high_water: int | None, low_water: int | None,
                 accept_filter: Callable[[socket.socket, Any], object] | None,
                 unlink_path: str | None = None, tls: dict[str, Any] | None = None) -> None:
        self.loop = loop
        self.socket = sock
        self.protocol_factory = protocol_factory
        self.max_message_size = max_message_size
        self.high_water = high_water
        self.low_water = low_water
        self.accept_filter = accept_filter
        self._unlink_path = unlink_path
        self._transports: set[_Transport] = set()
        self._prune_at = 64
        self._serving = False
        self._backoff: _reactor.TimerHandle | None = None
        self._tls = tls
        self.accepted = 0
        self.refused = 0
        self.handshake_failures = 0

    @property
    def address(self) -> Any:
        """The address the server listens on."""
        return self.socket.getsockname()

    def is_serving(self) -> bool:
        return self._serving

    @property
    def transports(self) -> set[_Transport]:
        """The open connections of this server."""
        self._transports = {t for t in self._transports if not t.closed}
        return set(self._transports)

    def _start(self) -> None:
        self._serving = True
        self.loop.add_reader(self.socket.fileno(), self._on_accept)

    def _resume(self) -> None:
        self._backoff = None
        if self._serving:
            self.loop.add_reader(self.socket.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _ACCEPT_BACKOFF:
                    logger.warning("accept() failed (%s): pausing this listener for %.1f s",
                                   exc, _ACCEPT_BACKOFF_DELAY)
                    self.loop.remove_reader(self.socket.fileno())
                    self._backoff = self.loop.call_later(_ACCEPT_BACKOFF_DELAY, self._resume)
                    return
                raise
            if self.accept_filter is not None:
                try:
                    ok = self.accept_filter(conn, addr)
                except Exception:
                    conn.close()
                    raise
                if not ok:
                    self.refused += 1
                    conn.close()
                    continue
            self.accepted += 1
            try:
                protocol = self.protocol_factory()
            except Exception:
                conn.close()
                raise
            try:
                if self._tls is None:
                    t = self.loop.add_stream(conn, protocol, max_message_size=self.max_message_size,
                                             high_water=self.high_water, low_water=self.low_water)
                else:
                    t = self.loop.add_stream(conn, protocol, max_message_size=self.max_message_size,
                                             high_water=self.high_water, low_water=self.low_water,
                                             server_side=True, on_fail=self._handshake_failed,
                                             **self._tls)
            except Exception:
                # e.g. select's FD_SETSIZE: refuse this one, keep serving
                conn.close()
                raise
            if not t.closed:
                self._transports.add(t)
                if len(self._transports) >= self._prune_at:
                    # forget closed transports; amortised O(1) per accept
                    self._transports = {x for x in self._transports if not x.closed}
                    self._prune_at = max(64, 2 * len(self._transports))

    def _handshake_failed(self, exc: BaseException | None) -> None:
        if exc is not None:
            self.handshake_failures += 1
            logger.info("TLS connection refused: %s", exc)

    def close(self) -> None:
        """Stop accepting and close the listening socket (connections stay)."""
        if not self._serving:
            return
        self._serving = False
        if self._backoff is not None:
            self._backoff.cancel()
        if not self.loop.is_closed():
            self.loop.remove_reader(self.socket.fileno())
        self.socket.close()
        if self._unlink_path:
            try:
                os.unlink(self._unlink_path)
            except OSError:
                pass
        self.loop._servers.discard(self)

    def shutdown(self) -> None:
        """close(), then close every connection once its queued writes are sent."""
        self.close()
        for t in self.transports:
            t.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "serving" if self._serving else "closed"
        return f"<fastnet.loop.Server {state} connections={len(self.transports)}>"


def _connect_error(err: int) -> OSError:
    if err == errno.ECONNREFUSED:
        return ConnectionRefusedError(err, os.strerror(err))
    return OSError(err, os.strerror(err))


def _is_ip_literal(host: Any) -> bool:
    """Whether connecting to ``host`` needs no name lookup."""
    if host in ("", "<broadcast>"):
        return True     # the socket module's own names for INADDR_ANY and the broadcast address
    try:
        ipaddress.ip_address(host.split("%", 1)[0])     # an IPv6 scope may follow '%'
    except (ValueError, TypeError, AttributeError):
        return False
    return True


class EventLoop(_reactor.Reactor):
    """fastnet's event loop: ``EventLoop(backend="auto"|"epoll"|"poll"|"select", max_workers=None, spin=0.0)``.

    Readiness: ``add_reader(fd, cb, *args)``, ``add_writer``, ``remove_reader``,
    ``remove_writer``. Time: ``call_soon``, ``call_later``, ``call_at``,
    ``time()``. Running: ``run_forever()``, ``run_until(predicate or timeout)``,
    ``stop()``, ``close()``. Threads: ``call_soon_threadsafe``,
    ``run_in_thread``. Signals: ``add_signal_handler``. Framed streams:
    ``create_server``, ``connect``, ``add_stream``. Cookbook handlers:
    ``add_handler``. Callback exceptions are logged to ``fastnet.loop``.

    ``spin`` (microseconds, default 0: off) busy-polls before each wait that
    would block: the loop polls its descriptors without sleeping (the GIL
    released, in the compiled kernels) until one is ready or ``spin`` has
    passed, then sleeps as usual. A request that arrives within it skips the
    scheduler's wake-up; the price is a CPU busy for up to ``spin`` per wait,
    idle or not. Timers still fire on time, and ``call_soon_threadsafe`` and
    signals still wake the loop at once. Each turn yields the CPU to any
    task waiting for it first, so a peer sharing this CPU is not held up.
    """

    def __init__(self, backend: str = "auto", *, max_workers: int | None = None, spin: float = 0.0) -> None:
        super().__init__(backend, spin)
        self._max_workers = max_workers
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._signal_handlers: dict[int, _reactor.Handle] = {}
        self._old_signal_handlers: dict[int, Any] = {}
        self._sig_socks: tuple[socket.socket, socket.socket] | None = None
        self._old_wakeup_fd = -1
        self._handlers: dict[EventHandler, list[Any]] = {}
        self._servers: set[Server] = set()
        self._tls_transports: set[TLSTransport] = set()

    def __enter__(self) -> EventLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        """Log an exception a callback raised (logger "fastnet.loop"); the loop goes on."""
        exc = context.get("exception")
        exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
        logger.error("%s: %r", context.get("message", "error in the event loop"),
                     context.get("object"), exc_info=exc_info)

    # -- worker threads ---------------------------------------------------------

    def run_in_thread(self, func: Callable[..., Any], *args: Any,
                      callback: Callable[[concurrent.futures.Future[Any]], object] | None = None,
                      ) -> concurrent.futures.Future[Any]:
        """Run ``func(*args)`` on the loop's worker pool; returns a concurrent.futures.Future.

        With ``callback``, ``callback(future)`` runs on the loop thread once
        the work is done: ``future.result()`` is the return value or raises
        what ``func`` raised. The pool is bounded (``max_workers``); work
        beyond it waits in the pool's queue.
        """
        if self.is_closed():
            raise RuntimeError("the event loop is closed")
        if callback is not None and not callable(callback):
            raise TypeError("callback must be callable")
        with self._executor_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self._max_workers, thread_name_prefix="fastnet-worker")
        fut = self._executor.submit(func, *args)
        if callback is not None:
            def deliver(f: concurrent.futures.Future[Any], callback: Callable[..., object] = callback) -> None:
                try:
                    self.call_soon_threadsafe(callback, f)
                except RuntimeError:
                    # the loop closed before the work finished: nobody to tell
                    pass
            fut.add_done_callback(deliver)
        return fut

    # -- signals ------------------------------------------------------------

    def add_signal_handler(self, sig: int, callback: Callable[..., object], *args: Any) -> None:
        """Run ``callback(*args)`` on the loop when signal ``sig`` arrives (main thread only).

        Uses ``signal.set_wakeup_fd``: the signal handler itself only
        writes the signal number to a socket the loop watches.
        """
        if self.is_closed():
            raise RuntimeError("the event loop is closed")
        if not callable(callback):
            raise TypeError("callback must be callable")
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be added from the main thread")
        sig = signal.Signals(sig)
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"{sig.name} cannot be caught")
        if self._sig_socks is None:
            r, w = socket.socketpair()
            r.setblocking(False)
            w.setblocking(False)
            self._old_wakeup_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
            self._sig_socks = (r, w)
            self.add_reader(r.fileno(), self._read_signals)
        if sig not in self._old_signal_handlers:
            self._old_signal_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, _ignore_signal)
            signal.siginterrupt(sig, False)
        self._signal_handlers[sig] = Handle(callback, args)

    def remove_signal_handler(self, sig: int) -> bool:
        """Restore the signal's previous disposition; True if a handler was removed."""
        sig = signal.Signals(sig)
        if self._signal_handlers.pop(sig, None) is None:
            return False
        old = self._old_signal_handlers.pop(sig, signal.SIG_DFL)
        signal.signal(sig, old if old is not None else signal.SIG_DFL)
        if not self._signal_handlers and self._sig_socks is not None:
            r, w = self._sig_socks
            self._sig_socks = None
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self.remove_reader(r.fileno())
            r.close()
            w.close()
        return True

    def _read_signals(self) -> None:
        if self._sig_socks is None:
            return
        try:
            data = self._sig_socks[0].recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        for signum in data:
            h = self._signal_handlers.get(signum)
            if h is not None and not h.cancelled():
                self.call_soon(h.callback, *h.args)  # type: ignore[arg-type, misc]  # not cancelled

    # -- framed streams -----------------------------------------------------

    def add_stream(  # type: ignore[override]  # a TLS transport when given an ssl_context
            self, sock: socket.socket, protocol: Any, max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
            high_water: int | None = None, low_water: int | None = None, *,
            ssl_context: ssl.SSLContext | None = None, server_side: bool = False,
            server_hostname: str | None = None, authkey: bytes | None = None,
            handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT, strict: bool = False,
            digest: str | None = "sha256", on_fail: Callable[[BaseException | None], object] | None = None,
            on_ready: Callable[[TLSTransport], object] | None = None) -> _Transport:
        """Run a framed ``protocol`` on a connected socket; returns its transport.

        The transport owns the socket. ``max_message_size`` (None: no
        limit) refuses larger frames before allocating them and closes the
        connection with MessageTooLarge.

        With ``ssl_context`` the transport is a :class:`TLSTransport`:
        ``server_side``, ``server_hostname`` (checked when the context has
        ``check_hostname``), ``authkey`` (multiprocessing's handshake inside
        TLS; ``strict`` and ``digest`` as for Listener), and
        ``handshake_timeout`` for both handshakes together.
        ``connection_made`` comes after them; a connection that fails them
        calls ``on_fail(exc)`` instead of ``connection_lost``.
        """
        if ssl_context is None:
            if authkey is not None:
                raise ValueError("authkey on a loop stream needs an ssl_context "
                                 "(fastnet.server runs the plain authkey handshake)")
            _tune(sock)
            return super().add_stream(sock, protocol, max_message_size, high_water, low_water)
        if self.is_closed():
            raise RuntimeError("the event loop is closed")
        _tune(sock)
        return TLSTransport(self, sock, protocol, ssl_context, server_side=server_side,
                            server_hostname=server_hostname, authkey=authkey,
                            handshake_timeout=handshake_timeout, max_message_size=max_message_size,
                            high_water=high_water, low_water=low_water, strict=strict,
                            digest=digest, on_fail=on_fail, on_ready=on_ready)

    def _transport_opened(self, transport: TLSTransport) -> None:
        # fastnet.tls.TransportRegistry: a TLS transport began on this loop
        self._tls_transports.add(transport)

    def _transport_closed(self, transport: TLSTransport) -> None:
        self._tls_transports.discard(transport)

    @property
    def transports(self) -> list[Any]:
        """The open transports of this loop, TLS ones (handshakes included) too (a new list)."""
        return _reactor.Reactor.transports.__get__(self) + list(self._tls_transports)  # type: ignore[no-any-return]

    def create_server(self, sock_or_address: socket.socket | Address, protocol_factory: Callable[[], Any], *,
                      family: str | int | None = None, backlog: int = 128,
                      max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE, high_water: int | None = None,
                      low_water: int | None = None,
                      accept_filter: Callable[[socket.socket, Any], object] | None = None,
                      reuse_address: bool = True, ssl_context: ssl.SSLContext | None = None,
                      authkey: bytes | None = None, handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
                      strict: bool = False, digest: str | None = "sha256") -> Server:
        """Listen and run ``protocol_factory()`` for each accepted connection; returns a Server.

        ``sock_or_address`` is a listening socket or any fastnet address
        (``(host, port)``, an AF_UNIX path, ``tcp://``/``unix://`` URLs).
        ``accept_filter(sock, addr)`` returning False refuses a connection
        (it is closed at once and counted in ``server.refused``).

        ``ssl_context`` (see :func:`fastnet.tls.server_context`) serves TLS;
        ``authkey`` then also requires multiprocessing's authkey handshake
        inside it. Both run on the loop within ``handshake_timeout``; a
        client that fails them is closed and counted in
        ``server.handshake_failures``, and its protocol never hears of it.
        """
        tls = None
        if ssl_context is not None:
            if authkey is not None and not isinstance(authkey, bytes):
                raise TypeError("authkey should be a byte string")
            tls = dict(ssl_context=ssl_context, authkey=authkey, handshake_timeout=handshake_timeout,
                       strict=strict, digest=digest)
        elif authkey is not None:
            raise ValueError("authkey on a loop server needs an ssl_context "
                             "(fastnet.server.TCPServer runs the plain authkey handshake)")
        unlink_path: str | None = None
        if isinstance(sock_or_address, socket.socket):
            sock = sock_or_address
        else:
            fam, addr = parse_address(sock_or_address, family)
            sock = socket.socket(fam, socket.SOCK_STREAM)
            try:
                if fam != socket.AF_UNIX and reuse_address:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                _bind(sock, addr)
                sock.listen(backlog)
            except BaseException:
                sock.close()
                raise
            if fam == socket.AF_UNIX and isinstance(addr, str) and not addr.startswith("\0"):
                unlink_path = addr
        sock.setblocking(False)
        server = Server(self, sock, protocol_factory, max_message_size=max_message_size,
                        high_water=high_water, low_water=low_water, accept_filter=accept_filter,
                        unlink_path=unlink_path, tls=tls)
        server._start()
        self._servers.add(server)
        return server

    def connect(self, address: Address, protocol_factory: Callable[[], Any], *,
                family: str | int | None = None, timeout: float | None = None,
                max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE, high_water: int | None = None,
                low_water: int | None = None, ssl_context: ssl.SSLContext | None = None,
                server_hostname: str | None = None, authkey: bytes | None = None,
                handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT, strict: bool = False,
                digest: str | None = "sha256") -> concurrent.futures.Future[Any]:
        """Connect without blocking the loop; returns a Future of the transport.

        The future is resolved on the loop thread (run the loop to let it
        finish, e.g. ``loop.run_until(fut.done, 5)``). ``protocol_factory()``
        is called once the connection is up. A host name is looked up on the
        loop's worker threads and its addresses are tried in order;
        ``timeout`` covers the lookup and the connect.

        ``ssl_context`` (see :func:`fastnet.tls.client_context`) runs TLS,
        checking the server's certificate for ``server_hostname`` (default:
        the host connected to; over AF_UNIX the context must have
        ``check_hostname`` off), then with ``authkey`` the authkey
        handshake. The future is resolved once they succeeded (after
        ``connection_made``), or fails with AuthenticationError or
        TimeoutError (``handshake_timeout``).
        """
        fam, addr = parse_address(address, family)
        if ssl_context is not None:
            if fam == socket.AF_UNIX and ssl_context.check_hostname and server_hostname is None:
                raise ValueError("TLS over AF_UNIX has no host name to check: "
                                 "use an ssl_context with check_hostname=False")
            if server_hostname is None and fam != socket.AF_UNIX:
                server_hostname = addr[0]
        elif authkey is not None:
            raise ValueError("authkey on a loop connection needs an ssl_context")
        stream_kw: dict[str, Any] = {}
        if ssl_context is not None:
            stream_kw = dict(ssl_context=ssl_context, server_hostname=server_hostname, authkey=authkey,
                             handshake_timeout=handshake_timeout, strict=strict, digest=digest)
        c = _Connector(self, fam, addr, protocol_factory,
                       (max_message_size, high_water, low_water), stream_kw)
        c.start(address, timeout)
        return c.future

    # -- Cookbook event handlers ------------------------------------------------

    def add_handler(self, handler: EventHandler) -> None:
        """Run a Cookbook-style EventHandler on this loop."""
        if handler in self._handlers:
            raise ValueError(f"{handler!r} is already on this loop")
        fd = handler.fileno()
        if not isinstance(fd, int):
            fd = fd.fileno()
        self._handlers[handler] = [fd, False, False]
        try:
            handler.loop = self
        except AttributeError:
            pass
        try:
            self._refresh_handler(handler)
        except BaseException:
            self._handlers.pop(handler, None)
            raise

    def remove_handler(self, handler: EventHandler) -> bool:
        """Stop running a handler; True if it was on this loop."""
        rec = self._handlers.pop(handler, None)
        if rec is None:
            return False
        fd, r, w = rec
        if r:
            self.remove_reader(fd)
        if w:
            self.remove_writer(fd)
        return True

    def update_handler(self, handler: EventHandler) -> None:
        """Ask the handler again what it wants (after a change made from outside it)."""
        self._refresh_handler(handler)

    @property
    def handlers(self) -> list[EventHandler]:
        """The EventHandlers on this loop."""
        return list(self._handlers)

    def _refresh_handler(self, h: EventHandler) -> None:
        rec = self._handlers.get(h)
        if rec is None:
            return
        fd = rec[0]
        r = bool(h.wants_to_receive())
        w = bool(h.wants_to_send())
        if r != rec[1]:
            if r:
                self.add_reader(fd, self._handler_receive, h)
            else:
                self.remove_reader(fd)
            rec[1] = r
        if w != rec[2]:
            if w:
                self.add_writer(fd, self._handler_send, h)
            else:
                self.remove_writer(fd)
            rec[2] = w

    def _handler_receive(self, h: EventHandler) -> None:
        try:
            h.handle_receive()
        finally:
            self._refresh_handler(h)

    def _handler_send(self, h: EventHandler) -> None:
        try:
            h.handle_send()
        finally:
            self._refresh_handler(h)

    # -- closing ------------------------------------------------------------

    def close(self) -> None:
        """Stop servers, signal handlers and the worker pool; abort transports; release the loop."""
        if self.is_running():
            raise RuntimeError("cannot close a running event loop")
        if self.is_closed():
            return
        for sig in list(self._signal_handlers):
            self.remove_signal_handler(sig)
        for server in list(self._servers):
            server.close()
        for h in list(self._handlers):
            self.remove_handler(h)
        for t in list(self._tls_transports):
            t._finalize(None, now=True)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        super().close()


class _Connector:
    """One non-blocking ``EventLoop.connect``: resolve, try each address, hand over a transport.

    Everything runs on the loop thread; ``future`` is resolved exactly once.
    A name is looked up on a worker thread (getaddrinfo blocks on DNS), and
    one timer bounds the lookup and every connect attempt together.
    """

    def __init__(self, loop: EventLoop, fam: int, addr: Any, protocol_factory: Callable[[], Any],
                 limits: tuple[int | None, int | None, int | None], stream_kw: dict[str, Any]) -> None:
        self.loop = loop
        self.fam = fam
        self.addr = addr
        self.protocol_factory = protocol_factory
        self.limits = limits
        self.stream_kw = stream_kw      # TLS (and authkey) settings, empty for a plain stream
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.future.set_running_or_notify_cancel()
        self.timer: Any = None          # the deadline of the whole connect
        self.sock: socket.socket | None = None  # the socket of the address being tried
        self.targets: list[Any] = []    # addresses still to try, the current one first

    def start(self, address: Any, timeout: float | None) -> None:
        if timeout is not None:
            def expired() -> None:
                self.timer = None
                self._fail(TimeoutError(f"connect to {address!r} timed out after {timeout} s"))
            self.timer = self.loop.call_later(timeout, expired)
        if self.fam == socket.AF_UNIX or _is_ip_literal(self.addr[0]):
            self._attempt([self.addr])
        else:
            self.loop.run_in_thread(socket.getaddrinfo, self.addr[0], self.addr[1], self.fam,
                                    socket.SOCK_STREAM, callback=self._resolved)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _drop_sock(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None and sock.fileno() >= 0:
            self.loop.remove_writer(sock.fileno())
            sock.close()

    def _fail(self, exc: BaseException) -> None:
        self._stop_timer()
        self._drop_sock()
        if not self.future.done():
            self.future.set_exception(exc)

    def _resolved(self, f: concurrent.futures.Future[Any]) -> None:
        if self.future.done():
            return      # timed out while the name was being looked up
        try:
            infos = f.result()
        except OSError as exc:
            self._fail(exc)
            return
        targets = [ai[4] for ai in infos if ai[0] == self.fam]
        if not targets:
            self._fail(OSError(errno.EADDRNOTAVAIL,
                               f"{self.addr[0]!r} has no {socket.AddressFamily(self.fam).name} address"))
            return
        self._attempt(targets)

    def _attempt(self, targets: list[Any]) -> None:
        """Connect to targets[0]; when that fails, a name's next address is tried."""
        if self.future.done():
            return
        self.targets = targets
        try:
            sock = socket.socket(self.fam, socket.SOCK_STREAM)
        except OSError as exc:
            self._fail(exc)
            return
        sock.setblocking(False)
        self.sock = sock
        try:
            err = sock.connect_ex(targets[0])
        except OSError as exc:
            self._failed(exc)
            return
        if err == 0:
            self.loop.call_soon(self._done, sock)
        elif err == errno.EINPROGRESS or (self.fam != socket.AF_UNIX and err == errno.EAGAIN):
            self.loop.add_writer(sock.fileno(), self._writable, sock)
        else:
            self._failed(_connect_error(err))

    def _failed(self, exc: BaseException) -> None:
        if len(self.targets) > 1:
            self._drop_sock()
            self._attempt(self.targets[1:])
        else:
            self._fail(exc)

    def _writable(self, sock: socket.socket) -> None:
        if self.future.done() or self.sock is not sock:
            return
        self.loop.remove_writer(sock.fileno())
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._failed(_connect_error(err))
        else:
            self._done(sock)

    def _done(self, sock: socket.socket) -> None:
        fut = self.future
        if fut.done() or self.sock is not sock:
            return
        self._stop_timer()
        self.sock = None
        try:
            if self.stream_kw:
                t = self.loop.add_stream(sock, self.protocol_factory(), *self.limits,
                                         on_fail=self._tls_failed, on_ready=self._tls_ready,
                                         **self.stream_kw)
            else:
                t = self.loop.add_stream(sock, self.protocol_factory(), *self.limits)
        except BaseException as exc:
            sock.close()
            fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        if not self.stream_kw:
            fut.set_result(t)

    def _tls_failed(self, exc: BaseException | None) -> None:
        if not self.future.done():
            self.future.set_exception(exc if exc is not None else
                                      ConnectionAbortedError("closed during the TLS handshake"))

    def _tls_ready(self, t: TLSTransport) -> None:
        if not self.future.done():
            self.future.set_result(t)
