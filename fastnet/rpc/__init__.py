"""Remote procedure calls: :class:`RPCServer` on the event loop, :class:`RPCProxy` to call it.

A server exposes functions and an object's methods::

    server = fastnet.RPCServer(("127.0.0.1", 17000), authkey=b"secret")

    @server.register
    def add(x, y):
        "Add two numbers."
        return x + y

    server.register_instance(KeyValueStore(), prefix="kv")
    server.serve_forever()

and a proxy calls them as if they were local::

    with fastnet.RPCProxy(("127.0.0.1", 17000), authkey=b"secret") as proxy:
        proxy.add(2, 3)                       # 5
        proxy.kv.set("a", 1)                  # dotted names
        fut = proxy.call_async("add", 2, 3)   # a concurrent.futures.Future
        proxy.notify("log", "hello")          # one-way, no reply

Wire protocol. After the transport's own handshakes (TLS, then the authkey
challenge if a key is set) the client sends a *hello* frame, the JSON text
``{"fastnet-rpc": 1, "codec": "msgpack"}``; the server answers with the same
shape, or ``{"fastnet-rpc": 1, "error": "..."}`` and closes the connection
when it refuses the codec or the version. Every later message is one codec
payload (the msgpack-rpc shapes, with keyword arguments)::

    request       [0, msgid, method, args, kwargs]
    reply         [1, msgid, error, result]       error: None or [type, message, traceback]
    notification  [2, method, args, kwargs]

A payload whose codec produced out-of-band buffers (pickle protocol 5:
numpy arrays) is preceded by a marker frame ``b"\\xc1"`` + the number of
buffers as a 4-byte big-endian integer, and followed by the buffers, each as
a frame of its own. ``0xc1`` starts no msgpack, JSON or pickle payload.

With the pickle codec an error reply carries the exception object itself as
a fourth element when it pickles, and the proxy raises the original type
with the remote traceback as its ``__cause__``. Other codecs raise
:class:`fastnet.RemoteError` (or :class:`MethodNotFound`).

Security: unpickling runs code, so the pickle codec is accepted only on an
authenticated connection (an ``authkey``, or a TLS client certificate the
server verified). A server configured for pickle without either refuses to
start unless ``allow_insecure_pickle=True``.
"""
from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import inspect
import json
import logging
import mmap
import os
import socket
import ssl
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from fastnet.address import parse_address
from fastnet.codecs import DEFAULT_CODEC, get_codec
from fastnet.connection import DEFAULT_HANDSHAKE_TIMEOUT
from fastnet.errors import FastnetError, MethodNotFound, ProtocolError, RemoteError
from fastnet import server as _server
from fastnet.rpc import _wire
from fastnet._kernels import rpcwire
from fastnet.rpc._wire import _MAX_HELLO, _NOTIFY, _OOB, _REQUEST, _oob_count, _type_name
from fastnet.rpc.proxy import RPCProxy

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from fastnet.monitor import Monitor

_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")

__all__ = [
    "RPCServer", "RPCProxy", "blocking", "PROTOCOL_VERSION", "DEFAULT_RPC_MAX_MESSAGE_SIZE",
    "LATENCY_BUCKETS",
]

logger = logging.getLogger("fastnet.rpc")

#: The RPC protocol version spoken in the hello frame.
PROTOCOL_VERSION = _wire.PROTOCOL_VERSION
#: Largest frame an RPC server or proxy accepts by default (256 MiB): room
#: for large arrays, checked before anything is allocated.
DEFAULT_RPC_MAX_MESSAGE_SIZE = _wire.DEFAULT_RPC_MAX_MESSAGE_SIZE
#: Upper bounds (seconds) of the per-method latency histogram in ``stats()``.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_DEFAULT_WORKER_THREADS = 16


def blocking(func: _F) -> _F:
    """Mark a function or method as blocking: the server runs it on its worker threads."""
    func._fastnet_blocking_ = True  # type: ignore[attr-defined]
    return func


# the error kinds a server counts; prefork workers share these counts with the parent
_ERROR_KINDS = ("protocol", "version", "codec", "method_not_found")


class _Method:
    __slots__ = ("func", "blocking", "calls", "errors", "lat_sum", "lat_counts", "shared", "base")

    def __init__(self, func: Callable[..., Any], blocking: bool) -> None:
        self.func = func
        # an ``async def`` runs on the server's asyncio loop, off the event loop as a blocking one does
        self.blocking = blocking or inspect.iscoroutinefunction(func)
        self.calls = 0
        self.errors = 0
        self.lat_sum = 0.0
        self.lat_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        # in a prefork worker: its counters in _WorkerStats memory, from ``base``
        self.shared: memoryview[float] | None = None
        self.base = 0

    def record(self, seconds: float, failed: bool) -> None:
        v = self.shared
        if v is not None:
            o = self.base
            v[o] += 1.0
            if failed:
                v[o + 1] += 1.0
            v[o + 2] += seconds
            v[o + 3 + bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1.0
            return
        self.calls += 1
        if failed:
            self.errors += 1
        self.lat_sum += seconds
        self.lat_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def stats(self, workers: Sequence[float] | None = None) -> dict[str, Any]:
        """Calls, errors and the latency histogram; ``workers`` adds the prefork workers' totals."""
        calls, errors, lat_sum, counts = self.calls, self.errors, self.lat_sum, self.lat_counts
        if workers is not None:
            calls += int(workers[0])
            errors += int(workers[1])
            lat_sum += workers[2]
            counts = [a + int(b) for a, b in zip(counts, workers[3:])]
        buckets: list[list[Any]] = []
        acc = 0
        for le, n in zip(LATENCY_BUCKETS, counts):
            acc += n
            buckets.append([le, acc])
        buckets.append(["+Inf", acc + counts[-1]])
        return {"calls": calls, "errors": errors,
                "latency_seconds": {"buckets": buckets, "sum": lat_sum, "count": calls}}


class _WorkerStats:
    """Per-method counters and error counts of prefork workers, in memory shared with the parent.

    Every worker slot has a region of its own, so no two processes write
    the same word and no lock is needed; a replacement worker goes on from
    its slot's totals, so the figures only grow, as Prometheus counters
    must. The parent sums the slots. The layout is fixed when serving
    starts: methods registered later are counted only in the process that
    runs them.
    """

    _PER_METHOD = 3 + len(LATENCY_BUCKETS) + 1     # calls, errors, latency sum, buckets

    def __init__(self, names: Iterable[str], slots: int) -> None:
        self.index = {n: i for i, n in enumerate(names)}
        self.slots = slots
        self.per_slot = len(self.index) * self._PER_METHOD + len(_ERROR_KINDS)
        # an anonymous MAP_SHARED mapping: the forked workers write the parent's pages
        self._mem = mmap.mmap(-1, max(8, 8 * self.per_slot * slots))
        self.view = memoryview(self._mem).cast("d")

    def bind(self, slot: int, methods: dict[str, _Method]) -> int:
        """In a worker: point its methods' counters at ``slot``; returns the slot's error-count offset.

        A slot outside the layout (-1) leaves the worker counting locally.
        """
        if not 0 <= slot < self.slots:
            return -1
        base = slot * self.per_slot
        for name, m in methods.items():
            i = self.index.get(name)
            if i is not None:
                m.shared = self.view
                m.base = base + i * self._PER_METHOD
        return base + len(self.index) * self._PER_METHOD

    def method(self, name: str) -> list[float] | None:
        """One method's counters summed over the slots, or None if it is not in the layout."""
        i = self.index.get(name)
        if i is None:
            return None
        n = self._PER_METHOD
        out = [0.0] * n
        for slot in range(self.slots):
            o = slot * self.per_slot + i * n
            for j, x in enumerate(self.view[o:o + n]):
                out[j] += x
        return out

    def errors(self) -> dict[str, int]:
        """The error counts by kind, summed over the slots."""
        first = len(self.index) * self._PER_METHOD
        out = dict.fromkeys(_ERROR_KINDS, 0)
        for slot in range(self.slots):
            o = slot * self.per_slot + first
            for kind, x in zip(_ERROR_KINDS, self.view[o:o + len(_ERROR_KINDS)]):
                out[kind] += int(x)
        return {k: v for k, v in out.items() if v}


# -- server -------------------------------------------------------------------------


class _RPCHandler(_server.MessageHandler):
    """One RPC connection on a server's event loop."""

    def setup(self) -> None:
        self.rpc: RPCServer = self.server.rpc
        self.methods = self.rpc._methods
        self.codec: Any = None     # a Codec once the hello is accepted, _CLOSED when closing
        self.wire: Any = _CLOSED_WIRE   # the codec's messages (fastnet._kernels.rpcwire.Wire)
        self.oob = -1          # buffers still expected for the current message, or -1
        self.parts: list[Any] | None = None
        self.out: list[Buffer] = []
        self.flush_armed = False
        self.gone = False
        self.owed = 0           # blocking calls still running for this connection
        self.stopping = False

    def finish(self) -> None:
        self.gone = True

    def draining(self) -> bool:
        # the server shuts down: answer the calls already received, then close
        self.stopping = True
        return bool(self.owed or self.out)

    def _maybe_done(self) -> None:
        if self.stopping and not self.owed and not self.out and not self.gone:
            self.close()

    def message_received(self, data: bytes) -> None:
        parts = self.parts
        if parts is not None:
            parts.append(data)
            self.oob -= 1
            if self.oob:
                return
            self.parts = None
            self.oob = -1
            self._request(parts)
        elif len(data) == 5 and data[0] == _OOB:
            n = _oob_count(data)
            if n < 1:
                self._protocol_error("bad out-of-band marker frame")
                return
            self.oob = n + 1    # the payload, then n buffers
            self.parts = []
        elif self.codec is None:
            self._hello(data)
        else:
            # the kernel answers a well-formed call of a method run on the loop; the rest comes back
            self.wire.serve(self, (data,), self.methods)

    # hello -------------------------------------------------------------
    def _hello(self, data: bytes) -> None:
        rpc = self.rpc
        try:
            if len(data) > _MAX_HELLO:
                raise ValueError("hello frame too large")
            hello = json.loads(bytes(data).decode("utf-8"))
            version = hello["fastnet-rpc"]
            name = hello["codec"]
            if not isinstance(name, str) or not isinstance(version, int):
                raise ValueError("bad field types")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            self._refuse("not a fastnet RPC hello frame", "protocol")
            return
        if version != PROTOCOL_VERSION:
            self._refuse(f"RPC protocol version {version} is not supported "
                         f"(this server speaks version {PROTOCOL_VERSION})", "version")
            return
        if name not in rpc.codecs:
            self._refuse(f"codec {name!r} is not accepted by this server "
                         f"(it accepts: {', '.join(rpc.codecs)})", "codec")
            return
        codec = get_codec(name)
        if codec.requires_auth and not rpc.allow_insecure_pickle and not self._authenticated():
            self._refuse(f"codec {name!r} needs an authenticated connection "
                         "(an authkey or a verified TLS client certificate)", "codec")
            return
        self.codec = codec
        self.wire = rpcwire.Wire(codec)
        self.reply(json.dumps({"fastnet-rpc": PROTOCOL_VERSION, "codec": name}).encode())

    def _authenticated(self) -> bool:
        if self.server.authkey is not None:
            return True
        t = self.transport
        if t is None:
            return False
        try:
            return bool(t.get_extra_info("peercert"))
        except Exception:
            return False

    def _refuse(self, why: str, kind: str) -> None:
        logger.warning("RPC hello from %r refused: %s", self.client_address, why)
        self.rpc._count_error(kind)
        self.reply(json.dumps({"fastnet-rpc": PROTOCOL_VERSION, "error": why}).encode())
        self.close()

    def _protocol_error(self, why: str) -> None:
        logger.warning("closing RPC connection from %r: %s", self.client_address, why)
        self.rpc._count_error("protocol")
        self.codec = _CLOSED
        self.wire = _CLOSED_WIRE
        self.close()

    # requests ----------------------------------------------------------
    def _request(self, frames: Sequence[Any]) -> None:
        self.wire.serve(self, frames, self.methods)

    def _undecodable(self, e: Exception) -> None:
        self._protocol_error(f"undecodable message ({type(e).__name__}: {e})")

    def _unencodable(self, msgid: int, e: Exception) -> None:
        self._send_error(msgid, type(e).__name__,
                         f"the result could not be encoded with {self.codec.name}: {e}")

    def _message(self, msg: Any) -> None:
        """A decoded message the kernel left to this handler (see :meth:`rpcwire.Wire.serve`)."""
        try:
            kind, msgid, method, args, kwargs = msg
            if kind != _REQUEST:
                raise ValueError
        except (TypeError, ValueError):
            self._notification(msg)
            return
        if type(msgid) is not int:
            self._protocol_error("request id is not an integer")
            return
        if type(method) is not str or type(args) is not list or \
                (kwargs is not None and type(kwargs) is not dict):
            if type(args) is tuple:     # a custom codec may produce tuples
                args = list(args)
            else:
                self._send_error(msgid, "ProtocolError",
                                 "malformed request: method must be str, args a list, kwargs a map")
                return
        m = self.rpc._methods.get(method)
        if m is None:
            self.rpc._count_error("method_not_found")
            self._send_error(msgid, "MethodNotFound", self.rpc._not_found(method))
            return
        if m.blocking:
            self.owed += 1
            self.rpc._offload(self, m, msgid, args, kwargs)
            return
        t0 = time.perf_counter()
        try:
            result = m.func(*args, **kwargs) if kwargs else m.func(*args)
        except BaseException as e:      # SystemExit from a method must not stop the server
            m.record(time.perf_counter() - t0, True)
            self._send_exc(msgid, e)
            return
        m.record(time.perf_counter() - t0, False)
        self._send_result(msgid, result)

    def _notification(self, msg: Any) -> None:
        try:
            kind, method, args, kwargs = msg
            if kind != _NOTIFY or type(method) is not str:
                raise ValueError
            if type(args) is tuple:
                args = list(args)
            if type(args) is not list or (kwargs is not None and type(kwargs) is not dict):
                raise ValueError
        except (TypeError, ValueError):
            self._protocol_error("not a request or notification")
            return
        m = self.rpc._methods.get(method)
        if m is None:
            self.rpc._count_error("method_not_found")
            logger.debug("notification of unknown method %r from %r", method, self.client_address)
            return
        if m.blocking:
            self.owed += 1
            self.rpc._offload(self, m, None, args, kwargs)
            return
        t0 = time.perf_counter()
        try:
            m.func(*args, **kwargs) if kwargs else m.func(*args)
        except BaseException as e:
            m.record(time.perf_counter() - t0, True)
            logger.debug("notification %s from %r raised %r", method, self.client_address, e)
            return
        m.record(time.perf_counter() - t0, False)

    def _send_result(self, msgid: int, result: Any) -> None:
        try:
            frames = self.wire.reply(msgid, result)
        except Exception as e:
            self._unencodable(msgid, e)
            return
        self._queue(frames)

    def _send_exc(self, msgid: int, exc: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        name = "MethodNotFound" if isinstance(exc, MethodNotFound) else _type_name(exc)
        err = [name, str(exc) if not isinstance(exc, RemoteError) else exc.message, tb]
        if self.codec.requires_auth and isinstance(exc, Exception):   # pickle: the object itself
            try:
                # only if the client can rebuild it: a failing unpickle there
                # would break the whole connection
                exc.__traceback__ = None
                self.codec.loads(self.codec.dumps(exc))
                frames = self.wire.error_reply(msgid, err + [exc])
            except Exception:
                pass
            else:
                self._queue(frames)
                return
        self._send_error(msgid, err[0], err[1], tb)

    def _send_error(self, msgid: int, type_name: str, message: str, tb: str = "") -> None:
        self._queue(self.wire.error_reply(msgid, [type_name, message, tb]))

    def _queue(self, frames: Iterable[Buffer]) -> None:
        # replies made while one read is dispatched leave together, in one syscall
        if self.gone or self.transport is None or self.transport.is_closing():
            return
        self.out.extend(frames)
        if not self.flush_armed:
            self.flush_armed = True
            self.transport.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_armed = False
        out = self.out
        if not out:
            return
        self.out = []
        t = self.transport
        if t.is_closing():
            return
        if len(out) == 1:
            t.send_bytes(out[0])
        else:
            t.send_many(out)
        if self.stopping:
            self._maybe_done()

    def _blocking_done(self, m: _Method, msgid: int | None, t0: float, ok: bool, value: Any) -> None:
        # loop thread
        self.owed -= 1
        m.record(time.perf_counter() - t0, not ok)
        if msgid is None or self.gone:
            self._maybe_done()
            return
        if ok:
            self._send_result(msgid, value)
        else:
            self._send_exc(msgid, value)
        if self.stopping and not self.flush_armed:
            self._maybe_done()


class _Closed:
    """Stands in for the codec of a connection being closed: drops what still arrives."""
    name = "closed"
    requires_auth = False
    builtin = False

    @staticmethod
    def loads(frames: Sequence[Buffer]) -> Any:
        raise ProtocolError("connection is closing")

    @staticmethod
    def dumps(obj: Any) -> list[Buffer]:
        raise ProtocolError("connection is closing")


_CLOSED = _Closed()
_CLOSED_WIRE = rpcwire.Wire(_CLOSED)  # type: ignore[arg-type]


class RPCServer:
    """An RPC server on fastnet's event loop.

    ``RPCServer(address, authkey=None, codec="msgpack", ssl_context=None,
    workers=1, allow=None)``. ``codec`` is the name of the codec clients
    must speak, or a sequence of accepted names. ``workers=N`` (N > 1) serves
    on N prefork processes; register everything before serving starts.

    Functions run on the event loop unless registered ``blocking=True`` (or
    decorated with :func:`blocking`, or ``blocking=True`` here makes that the
    default): those run on ``worker_threads`` threads so a slow call never
    stalls the others. ``async def`` functions run on an asyncio event loop
    the server keeps on a thread of its own (the loop policy's, so uvloop
    when installed), many at once; a blocking proxy and a
    :class:`fastnet.aio.RPCProxy` call them alike. Other keywords (``max_connections``,
    ``max_message_size``, ``idle_timeout``, ``handshake_timeout``,
    ``shutdown_timeout``, ``strict``, ``backend``, ``overflow``) are the
    :mod:`fastnet.server` limits. ``monitor=("127.0.0.1", 9100)`` serves
    ``/stats`` and ``/metrics`` over HTTP beside the server.

    ``spin=`` microseconds (default 0: off) makes the server's event loops
    busy-poll for requests before they sleep, as ``RPCProxy(spin=)`` does
    for replies: a call that arrives within it skips the scheduler's
    wake-up, at the price of a CPU burnt for up to ``spin`` per wait, while
    idle too (each prefork worker's loop spins on its own CPU). A client
    sharing the loop's CPU is not held up: each turn of the spin yields to it.
    """

    def __init__(self, address: Any, authkey: bytes | None = None, codec: str | Iterable[str] = DEFAULT_CODEC,
                 ssl_context: ssl.SSLContext | None = None, workers: int = 1,
                 allow: Any = None, *, blocking: bool = False, worker_threads: int = _DEFAULT_WORKER_THREADS,
                 allow_insecure_pickle: bool = False, max_message_size: int | None = DEFAULT_RPC_MAX_MESSAGE_SIZE,
                 max_connections: int | None = _server.DEFAULT_MAX_CONNECTIONS,
                 idle_timeout: float | None = _server.DEFAULT_IDLE_TIMEOUT,
                 handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
                 shutdown_timeout: float | None = _server.DEFAULT_SHUTDOWN_TIMEOUT,
                 overflow: str = "wait", strict: bool = False, family: str | int | None = None,
                 backend: str = "auto", spin: float = 0.0, monitor: tuple[str, int] | None = None,
                 introspection: bool = True) -> None:
        names = (codec,) if isinstance(codec, str) else tuple(codec)
        if not names:
            raise ValueError("codec: at least one codec name is needed")
        for n in names:
            get_codec(n)     # unknown names fail here, not at the first client
        self.codecs = names
        self.allow_insecure_pickle = allow_insecure_pickle
        authenticated = authkey is not None or (
            ssl_context is not None and ssl_context.verify_mode == ssl.CERT_REQUIRED)
        risky = [n for n in names if get_codec(n).requires_auth]
        if risky and not authenticated and not allow_insecure_pickle:
            raise ValueError(
                f"codec {risky[0]!r} runs code from the peer when decoding, so it needs "
                "authenticated clients: give an authkey, or an ssl_context that requires "
                "client certificates (verify_mode=CERT_REQUIRED), or pass "
                "allow_insecure_pickle=True if every client is trusted")
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.default_blocking = blocking
        self.worker_threads = worker_threads
        self._methods: dict[str, _Method] = {}
        self._errors: dict[str, int] = {}
        self._workers = workers
        self._shared: _WorkerStats | None = None
        self._error_base = -1     # in a prefork worker: its error counts in _shared
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_pid: int | None = None
        self._aio_loop: asyncio.AbstractEventLoop | None = None   # runs the async def methods
        self._aio_pid: int | None = None
        self._aio_thread: threading.Thread | None = None
        self._monitor_address = monitor
        self._monitor: Monitor | None = None
        fam, _ = parse_address(address, family)
        base = _server.UnixServer if fam == socket.AF_UNIX else _server.TCPServer
        kw: dict[str, Any] = dict(concurrency="prefork" if workers > 1 else "loop", authkey=authkey,
                  max_connections=max_connections, overflow=overflow,
                  max_message_size=max_message_size, idle_timeout=idle_timeout,
                  handshake_timeout=handshake_timeout, shutdown_timeout=shutdown_timeout,
                  strict=strict, backend=backend, spin=spin, allow=allow)
        if workers > 1:
            kw["workers"] = workers
        if ssl_context is not None:
            kw["ssl_context"] = ssl_context
        self._server = base(address, _RPCHandler, **kw)
        self._server.rpc = self  # type: ignore[union-attr]
        if introspection:
            self.register_function(self._list_methods, "system.list_methods")
            self.register_function(self._method_help, "system.method_help")
            self.register_function(self._method_signature, "system.method_signature")

    # registration --------------------------------------------------------
    def register_function(self, function: Any = None, name: str | None = None, *,
                          blocking: bool | None = None) -> Any:
        """Expose ``function`` as ``name`` (default: its ``__name__``); usable as a decorator.

        ``blocking=True`` runs it on the worker threads; None takes the
        :func:`blocking` mark or the server's default.
        """
        if function is None:
            return lambda f: self.register_function(f, name, blocking=blocking)
        if isinstance(function, str) and name is None:
            # @server.register_function("name")
            return lambda f: self.register_function(f, function, blocking=blocking)
        if not callable(function):
            raise TypeError(f"{function!r} is not callable")
        if name is None:
            name = function.__name__
        if not isinstance(name, str) or not name:
            raise TypeError("the method name must be a non-empty str")
        if blocking is None:
            blocking = getattr(function, "_fastnet_blocking_", self.default_blocking)
        self._methods[name] = _Method(function, bool(blocking))
        return function

    register = register_function

    def register_instance(self, obj: _T, prefix: str | None = None, *, blocking: bool | None = None) -> _T:
        """Expose ``obj``'s public methods (``prefix.name`` with a prefix).

        If ``obj`` has a ``_rpc_methods_`` list, only those names are
        exposed (the Cookbook's KeyValueServer style); otherwise every
        public callable attribute is. Names starting with ``_`` never are.
        """
        allowed = getattr(obj, "_rpc_methods_", None)
        if allowed is not None:
            names = list(allowed)
            bad = [n for n in names if not isinstance(n, str) or n.startswith("_")]
            if bad:
                raise ValueError(f"_rpc_methods_ may list only public names, not {bad!r}")
        else:
            names = [n for n in dir(obj) if not n.startswith("_")]
        count = 0
        for n in names:
            f = getattr(obj, n, None)
            if not callable(f):
                if allowed is not None:
                    raise AttributeError(f"{type(obj).__name__}.{n} is not a method")
                continue
            self.register_function(f, f"{prefix}.{n}" if prefix else n, blocking=blocking)
            count += 1
        return obj

    def unregister(self, name: str) -> None:
        """Stop exposing ``name``."""
        del self._methods[name]

    @property
    def methods(self) -> list[str]:
        """The exposed method names, sorted."""
        return sorted(self._methods)

    def _list_methods(self) -> list[str]:
        """List the names of the methods this server exposes."""
        return sorted(self._methods)

    def _method_help(self, name: str) -> str:
        """Return the documentation string of the method ``name``."""
        m = self._methods.get(name)
        if m is None:
            raise MethodNotFound("MethodNotFound", self._not_found(name))
        return inspect.getdoc(m.func) or ""

    def _method_signature(self, name: str) -> str:
        """Return the call signature of the method ``name`` as text."""
        m = self._methods.get(name)
        if m is None:
            raise MethodNotFound("MethodNotFound", self._not_found(name))
        try:
            return f"{name}{inspect.signature(m.func)}"
        except (TypeError, ValueError):
            return f"{name}(...)"

    def _not_found(self, name: str) -> str:
        return f"no method {name!r} on this server (system.list_methods lists them)"

    # serving ------------------------------------------------------------
    @property
    def address(self) -> Any:
        """The bound address (the real port when 0 was asked for)."""
        return self._server.address

    @property
    def server(self) -> Any:
        """The underlying :mod:`fastnet.server` stream server."""
        return self._server

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve on the calling thread until :meth:`shutdown` (or SIGINT/SIGTERM in the main thread)."""
        self._share_worker_stats()
        self._start_monitor()
        try:
            self._server.serve_forever(poll_interval)
        finally:
            self._stop_monitor()

    def start(self, timeout: float = 30.0) -> RPCServer:
        """Serve on a background thread; return once the server accepts connections."""
        self._share_worker_stats()
        self._server.start(timeout)
        self._start_monitor()
        return self

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, let the calls in progress answer, close, and join."""
        try:
            self._server.shutdown(timeout)
        finally:
            self._stop_monitor()
            ex = self._executor
            if ex is not None and self._executor_pid == os.getpid():
                ex.shutdown(wait=False, cancel_futures=True)
            self._executor = None
            self._stop_aio_loop()

    def server_close(self) -> None:
        """Close the listening socket (after shutdown)."""
        self._server.server_close()

    def close(self) -> None:
        """Shut down if serving, then close the listening socket."""
        try:
            self.shutdown()
        finally:
            self._server.server_close()

    def __enter__(self) -> RPCServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<fastnet.RPCServer {self._server.address!r} codecs={list(self.codecs)}>"

    @property
    def worker_pids(self) -> list[int]:
        """The pids of the prefork workers (``workers > 1``)."""
        return self._server.worker_pids

    def stats(self) -> dict[str, Any]:
        """Server counters plus ``methods`` (calls, errors, latency histogram per method) and ``errors`` by kind.

        With ``workers > 1`` the figures are the sums over the worker
        processes, a dead worker's included; a call is counted before its
        reply is sent.
        """
        out = self._server.stats()
        errors = dict(self._errors)
        shared = self._shared
        if shared is not None:
            for kind, n in shared.errors().items():
                errors[kind] = errors.get(kind, 0) + n
        out["errors"] = errors
        out["methods"] = {name: m.stats(shared.method(name) if shared is not None else None)
                          for name, m in list(self._methods.items())}
        return out

    def _count_error(self, kind: str) -> None:
        shared = self._shared
        if self._error_base >= 0 and shared is not None and kind in _ERROR_KINDS:
            shared.view[self._error_base + _ERROR_KINDS.index(kind)] += 1.0
            return
        self._errors[kind] = self._errors.get(kind, 0) + 1

    def _share_worker_stats(self) -> None:
        # before the workers fork: they count into memory the parent reads
        if self._workers > 1 and self._shared is None:
            self._shared = _WorkerStats(self._methods, self._workers)
            self._server.worker_started = self._worker_started  # type: ignore[method-assign]
        # the workers' fork server copies the process now: after the mapping, before the monitor's thread
        self._server._start_forkserver()

    def _worker_started(self, slot: int) -> None:
        assert self._shared is not None
        self._error_base = self._shared.bind(slot, self._methods)

    # blocking calls -----------------------------------------------------
    def _offload(self, handler: _RPCHandler, m: _Method, msgid: int | None, args: list[Any],
                 kwargs: dict[str, Any] | None) -> None:
        if inspect.iscoroutinefunction(m.func):
            self._await(handler, m, msgid, args, kwargs)
            return
        ex = self._executor
        if ex is None or self._executor_pid != os.getpid():
            # a prefork worker builds its own pool: threads do not survive fork()
            ex = self._executor = concurrent.futures.ThreadPoolExecutor(
                self.worker_threads, thread_name_prefix="fastnet-rpc")
            self._executor_pid = os.getpid()
        loop = handler.transport.loop
        t0 = time.perf_counter()
        func = m.func

        def run() -> None:
            try:
                value = func(*args, **kwargs) if kwargs else func(*args)
                ok = True
            except BaseException as e:
                value = e
                ok = False
            try:
                loop.call_soon_threadsafe(handler._blocking_done, m, msgid, t0, ok, value)
            except RuntimeError:
                pass     # the loop closed under a forced shutdown
        ex.submit(run)

    # async def methods ---------------------------------------------------
    def _await(self, handler: _RPCHandler, m: _Method, msgid: int | None, args: list[Any],
               kwargs: dict[str, Any] | None) -> None:
        """Run an ``async def`` method on the server's asyncio loop; answer from the event loop."""
        aloop = self._aio_loop
        if aloop is None or self._aio_pid != os.getpid():
            aloop = self._aio_loop = asyncio.new_event_loop()
            self._aio_pid = os.getpid()
            self._aio_thread = threading.Thread(target=aloop.run_forever, name="fastnet-rpc-asyncio",
                                                daemon=True)
            self._aio_thread.start()
        loop = handler.transport.loop
        t0 = time.perf_counter()
        func = m.func

        async def run() -> Any:
            return await (func(*args, **kwargs) if kwargs else func(*args))

        def done(fut: concurrent.futures.Future[Any]) -> None:
            try:
                value, ok = fut.result(), True
            except BaseException as e:
                value, ok = e, False
            try:
                loop.call_soon_threadsafe(handler._blocking_done, m, msgid, t0, ok, value)
            except RuntimeError:
                pass     # the loop closed under a forced shutdown
        asyncio.run_coroutine_threadsafe(run(), aloop).add_done_callback(done)

    def _stop_aio_loop(self) -> None:
        aloop, thread = self._aio_loop, self._aio_thread
        self._aio_loop = self._aio_thread = None
        if aloop is None or thread is None or self._aio_pid != os.getpid():
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            asyncio.get_running_loop().stop()
        asyncio.run_coroutine_threadsafe(cancel_all(), aloop)
        thread.join(5.0)
        if not thread.is_alive():
            aloop.close()

    # monitoring ---------------------------------------------------------
    def _start_monitor(self) -> None:
        if self._monitor_address is None or self._monitor is not None:
            return
        from fastnet import monitor
        self._monitor = monitor.serve(self, self._monitor_address)

    def _stop_monitor(self) -> None:
        mon = self._monitor
        self._monitor = None
        if mon is not None:
            mon.close()

    @property
    def monitor(self) -> Monitor | None:
        """The running monitor HTTP server (``.url``), or None."""
        return self._monitor
