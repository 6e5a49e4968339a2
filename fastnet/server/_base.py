"""BaseServer: socketserver's interface and the accept loop; the concurrency
mode's strategy (fastnet.server._strategy) serves what it accepts."""
from __future__ import annotations

import errno
import os
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from fastnet.address import parse_address, bind as _bind
from fastnet import defaults as _defaults
from fastnet.connection import _spin_us
from fastnet.loop import EventLoop
from fastnet.server._allow import allowed, parse_allow
from fastnet.server._fork import _ForkStrategy
from fastnet.server._handlers import MessageHandler
from fastnet.server._handshake import _Handshake
from fastnet.server._pool import _Threads, _local
from fastnet.server._prefork import _PreforkStrategy
from fastnet.server._signals import _StopSignals
from fastnet.server._single import take_request, wait_for_request
from fastnet.server._strategy import _LoopStrategy, _Strategy, _ThreadStrategy
from fastnet.server._util import _DEFERRING, _quiet_close, _shut, _tls_goodbye, logger

if TYPE_CHECKING:
    from typing_extensions import Self

    from fastnet.address import Address
    from fastnet.loop import TimerHandle as _reactor_TimerHandle
    from fastnet.server._engine import _Engine

_STRATEGIES: dict[str, type[_Strategy]] = {
    "loop": _LoopStrategy, "thread": _ThreadStrategy, "fork": _ForkStrategy, "prefork": _PreforkStrategy,
}
CONCURRENCY = tuple(_STRATEGIES)
# the public names of fastnet.defaults' server limits (see there)
DEFAULT_MAX_CONNECTIONS = _defaults.MAX_CONNECTIONS_SERVER
DEFAULT_MAX_MESSAGE_SIZE = _defaults.MAX_MESSAGE_SIZE_SERVER
DEFAULT_IDLE_TIMEOUT = _defaults.IDLE_TIMEOUT_SERVER
DEFAULT_HANDSHAKE_TIMEOUT = _defaults.HANDSHAKE_TIMEOUT
DEFAULT_SHUTDOWN_TIMEOUT = _defaults.SHUTDOWN_TIMEOUT_SERVER
DEFAULT_WORKER_THREADS = _defaults.WORKER_THREADS_SERVER

_ACCEPT_BATCH = 64
_ACCEPT_BACKOFF = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_ACCEPT_BACKOFF_DELAY = 0.1


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
                 digest: str | None = "sha256", backend: str = "auto", spin: float = 0.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        concurrency = concurrency or type(self).concurrency
        if concurrency not in CONCURRENCY:
            raise ValueError(f"concurrency must be one of {CONCURRENCY}, not {concurrency!r}")
        mode = _STRATEGIES[concurrency]
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
            mode.check_datagram()
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
            workers = mode.default_workers(self)
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
        self.spin = _spin_us(spin)
        self._allow = self._parse_allow(allow)
        self._mode = mode(self)
        self._limit = self._mode.limit()
        self._unlink: str | None = None
        self._loop = None  # type: ignore[assignment]
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
        self._in_child = False
        self._open = 0
        self._total = 0
        self._refused = 0
        self._auth_failed = 0
        self._stop_requested: float | None = None
        self._stop_signals: _StopSignals | None = None
        self._idle_closed = 0
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
        mode = _STRATEGIES.get(concurrency)
        if mode is not None:     # an unknown mode is refused when a server is made
            mode.check_hooks(cls)
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
        self._mode.process_request(request, client_address)

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
        wait_for_request(self)

    def _handle_request_noblock(self) -> None:
        take_request(self)

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
        eng = self._mode.engine
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
        self._mode.stats(out)
        return out

    @property
    def worker_pids(self) -> list[int]:
        """The pids of the live prefork workers (or forked children)."""
        return self._mode.worker_pids()

    @property
    def _engine(self) -> _Engine | None:
        """The engine serving connections on the loop (loop and thread modes, once serving)."""
        return self._mode.engine

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
            loop = EventLoop(self.backend, spin=self.spin)
            with self._lock:
                self._loop = loop
                stop = self._stop_requested
            if threading.current_thread() is threading.main_thread() and stop_signals:
                self._stop_signals = _StopSignals(loop, stop_signals, self._interrupt_blocking,
                                                  self._on_stop_wake)
            if type(self).service_actions not in (BaseServer.service_actions, *_DEFERRING) and poll_interval:
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
        if self._state != "serving":
            self._mode.close()
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

    def _on_stop_wake(self) -> None:
        if self._shutting_down:
            self._force()        # a second signal: stop waiting for connections
        else:
            self._begin_shutdown(None)

    def _remove_stop_signals(self) -> None:
        if self._stop_signals is not None:
            self._stop_signals.remove()
            self._stop_signals = None

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
        self._mode.begin(loop)
        self._resume()

    def _done(self) -> bool:
        return self._shutting_down and (self._forced or (
            self._open == 0 and not self._mode.busy() and not self._handshakes))

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
        self._mode.begin_shutdown()
        loop.call_later(timeout, self._force)

    def _force(self) -> None:
        self._forced = True

    def _teardown(self) -> None:
        loop = self._loop
        try:
            for hs in list(self._handshakes):
                hs.abort()
            self._mode.teardown()
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

    # fastnet.aio's server screens its peers with these two as well
    _parse_allow = staticmethod(parse_allow)

    def _allowed(self, addr: Any) -> bool:
        return allowed(self._allow, addr)

    def _on_accept(self) -> None:
        accept = self.socket.accept if type(self).get_request is BaseServer.get_request else self.get_request
        self._take_requests(accept, True)

    def _take_requests(self, receive: Callable[[], tuple[Any, Any]], stream: bool) -> None:
        """Take up to _ACCEPT_BATCH ready requests (connections or datagrams):
        refuse or verify each, then start serving it."""
        for _ in range(_ACCEPT_BATCH):
            if self._shutting_down or (stream and self._stop_requested is not None):
                return
            if self._open >= self._limit and (self.overflow == "wait" or not stream):
                self._pause()
                return
            try:
                request, addr = receive()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if not stream:
                    # e.g. ECONNREFUSED left by an ICMP error for an earlier reply
                    logger.debug("recvfrom failed: %s", exc)
                elif self._accept_failed(exc):
                    return
                continue
            if isinstance(addr, bytes):
                addr = addr.decode("utf-8", "surrogateescape")
            if self._open >= self._limit or not self._allowed(addr):
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
            self._open += 1
            self._total += 1
            if stream:
                self._accepted(request, addr)
            else:
                self._counters[0] += 1
                self._counters[2] += len(request[0])
                self._process(request, addr)

    def _accept_failed(self, exc: OSError) -> bool:
        """Deal with a failed accept() (or get_request()); True stops this batch."""
        if isinstance(exc, ConnectionAbortedError):
            return False
        if exc.errno in _ACCEPT_BACKOFF:
            logger.warning("accept() failed (%s): pausing for %.1f s", exc, _ACCEPT_BACKOFF_DELAY)
            self._pause()
            self._backoff = self._loop.call_later(_ACCEPT_BACKOFF_DELAY, self._resume)
            return True
        # an overriding get_request() failed on this connection (a TLS
        # handshake, say): socketserver drops the request and goes on
        logger.info("get_request() failed: %s", exc)
        return False

    def _accepted(self, sock: socket.socket, addr: Any) -> None:
        """Start serving a verified connection, after its handshakes where they run here.

        The handshakes run where the connection will be served: framed TLS
        in its TLSTransport, prefork TLS in the worker, the rest here.
        """
        if self.ssl_context is not None:
            # TLS state cannot move to another process
            here = not self._framed and self._mode.serves_here
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
            self._mode.serve_datagram(sock, addr)
            return
        try:
            self._mode.serve_stream(sock, addr)
        except Exception:
            logger.exception("failed to start serving %r", addr)
            _quiet_close(sock)
            self._release()

    def _handle_stream(self, sock: socket.socket, addr: Any) -> None:
        """Run a blocking handler on one connection (any thread or process)."""
        self._serve_request(sock, addr)

    # -- datagrams --------------------------------------------------------------

    def _on_datagram(self) -> None:
        self._take_requests(self.get_request, False)

    def _handle_datagram(self, request: Any, addr: Any) -> None:
        self._serve_request(request, addr)

    # -- processes ---------------------------------------------------------------

    def _start_forkserver(self) -> None:
        """Fork the fork server (fork and prefork modes), once, before the server has threads."""
        self._mode.start_forkserver()

    def worker_started(self, slot: int) -> None:
        """Called in each prefork worker process as it starts, before it serves.

        ``slot`` is the worker's number, 0 to ``workers - 1``; a worker that
        replaces a dead one gets the dead one's slot. Does nothing by
        default: override it (or assign a callable on the instance) to set
        up per-worker state, such as counters in memory shared with the
        parent.
        """

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
