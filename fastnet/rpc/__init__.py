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
import itertools
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
from fastnet.connection import Client, DEFAULT_HANDSHAKE_TIMEOUT
from fastnet.errors import (
    AuthenticationError, ConnectionLost, FastnetError, MethodNotFound, ProtocolError,
    RemoteError, TimeoutError,
)
from fastnet import server as _server

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from fastnet._c.framing import Channel as _CChannel
    from fastnet.tls import TLSChannel
    from fastnet.codecs import Codec
    from fastnet.connection import Connection
    from fastnet.monitor import Monitor

_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")

__all__ = [
    "RPCServer", "RPCProxy", "blocking", "PROTOCOL_VERSION", "DEFAULT_RPC_MAX_MESSAGE_SIZE",
    "LATENCY_BUCKETS",
]

logger = logging.getLogger("fastnet.rpc")

#: The RPC protocol version spoken in the hello frame.
PROTOCOL_VERSION = 1
#: Largest frame an RPC server or proxy accepts by default (256 MiB): room
#: for large arrays, checked before anything is allocated.
DEFAULT_RPC_MAX_MESSAGE_SIZE = 256 << 20
#: Upper bounds (seconds) of the per-method latency histogram in ``stats()``.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_REQUEST, _REPLY, _NOTIFY = 0, 1, 2
_OOB = 0xC1
_MAX_HELLO = 4096
_DEFAULT_WORKER_THREADS = 16
# how long a reply-less asynchronous call waits for its caller to read before
# the proxy's reader thread takes over, and how often a waiting caller looks
# whether the reader left
_BG_GRACE = 0.002
_BATCH_MAX = 256
# an idle connection is checked for a close by the server before it is reused
_STALE_AFTER = 0.02
_DRIVE_POLL = 0.05


def _oob_marker(n: int) -> bytes:
    return b"\xc1" + n.to_bytes(4, "big")


def _encode(codec: Codec, msg: Any) -> list[Buffer]:
    frames = codec.dumps(msg)
    if len(frames) == 1:
        return frames
    return [_oob_marker(len(frames) - 1)] + frames


def _oob_count(frame: Any) -> int:
    """The buffer count of an out-of-band marker frame, else -1."""
    if len(frame) == 5 and frame[0] == _OOB:
        return int.from_bytes(frame[1:5], "big")
    return -1


def _type_name(exc: BaseException) -> str:
    t = type(exc)
    mod = t.__module__
    return t.__qualname__ if mod in ("builtins", "__main__") else f"{mod}.{t.__qualname__}"


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
        self.codec: Any = None     # a Codec once the hello is accepted, _CLOSED when closing
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
            self._request((data,))

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
        self.encode = codec.dumps
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
        self.close()

    # requests ----------------------------------------------------------
    def _request(self, frames: Sequence[Any]) -> None:
        try:
            msg = self.codec.loads(frames)
        except Exception as e:
            self._protocol_error(f"undecodable message ({type(e).__name__}: {e})")
            return
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
        try:
            frames = _encode(self.codec, [_REPLY, msgid, None, result])
        except Exception as e:
            self._send_error(msgid, type(e).__name__,
                             f"the result could not be encoded with {self.codec.name}: {e}")
            return
        self._queue(frames)

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
            frames = _encode(self.codec, [_REPLY, msgid, None, result])
        except Exception as e:
            self._send_error(msgid, type(e).__name__,
                             f"the result could not be encoded with {self.codec.name}: {e}")
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
                frames = _encode(self.codec, [_REPLY, msgid, err + [exc], None])
            except Exception:
                pass
            else:
                self._queue(frames)
                return
        self._send_error(msgid, err[0], err[1], tb)

    def _send_error(self, msgid: int, type_name: str, message: str, tb: str = "") -> None:
        self._queue(_encode(self.codec, [_REPLY, msgid, [type_name, message, tb], None]))

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

    @staticmethod
    def loads(frames: Sequence[Buffer]) -> Any:
        raise ProtocolError("connection is closing")


_CLOSED = _Closed()


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
                 backend: str = "auto", monitor: tuple[str, int] | None = None,
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
                  strict=strict, backend=backend, allow=allow)
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


# -- client -------------------------------------------------------------------------


class _Slot:
    """Where a synchronous call's reply lands."""
    __slots__ = ("done", "error", "value")
    error: BaseException | None
    value: Any

    def __init__(self) -> None:
        self.done = False

    def set(self, error: BaseException | None, value: Any) -> None:
        self.error = error
        self.value = value
        self.done = True

    def fail(self, exc: BaseException) -> None:
        self.set(exc, None)


class _FutureSlot:
    __slots__ = ("future", "deadline")

    def __init__(self, future: concurrent.futures.Future[Any], deadline: float | None) -> None:
        self.future = future
        self.deadline = deadline

    def set(self, error: BaseException | None, value: Any) -> None:
        f = self.future
        if f.done():
            return
        if error is None:
            f.set_result(value)
        else:
            f.set_exception(error)

    def fail(self, exc: BaseException) -> None:
        self.set(exc, None)


class _CallFuture(concurrent.futures.Future[Any]):
    """The future of an asynchronous call.

    Waiting on it (``result``/``exception``) reads replies on the waiting
    thread when no other thread is reading, so a caller that issues many
    calls and then collects them never hands work to another thread. Futures
    nobody waits on (callbacks, ``concurrent.futures.wait``) complete through
    the proxy's reader thread.
    """

    def __init__(self, proxy: RPCProxy) -> None:
        super().__init__()
        self._proxy = proxy

    def result(self, timeout: float | None = None) -> Any:
        if not self.done():
            self._proxy._drive(self, timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if not self.done():
            self._proxy._drive(self, timeout)
        return super().exception(timeout)


class _BoundMethod:
    """``proxy.name``: call it, or take an attribute for a dotted name."""
    __slots__ = ("_proxy", "_name", "_subs")

    def __init__(self, proxy: RPCProxy | _TimeoutView, name: str) -> None:
        self._proxy = proxy
        self._name = name
        self._subs: dict[str, _BoundMethod] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        p = self._proxy
        return p._call(self._name, args, kwargs, p._timeout)

    def __getattr__(self, attr: str) -> _BoundMethod:
        if attr.startswith("_"):
            raise AttributeError(attr)
        subs = self._subs
        if subs is None:
            subs = self._subs = {}
        m = subs.get(attr)
        if m is None:
            m = subs[attr] = _BoundMethod(self._proxy, f"{self._name}.{attr}")
        return m

    def __repr__(self) -> str:
        return f"<remote method {self._name!r}>"


class _TimeoutView:
    """``proxy.with_timeout(t)``: the same proxy with another per-call timeout."""

    def __init__(self, proxy: RPCProxy, timeout: float | None) -> None:
        self._proxy = proxy
        self._timeout = timeout

    def __getattr__(self, name: str) -> _BoundMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        m = _BoundMethod(self, name)
        return m

    def _call(self, method: str, args: Sequence[Any], kwargs: dict[str, Any] | None,
              timeout: float | None) -> Any:
        return self._proxy._call(method, args, kwargs, timeout)

    def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` with this view's timeout."""
        return self._proxy._call(method, args, kwargs, self._timeout)

    def call_async(self, method: str, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Start a call with this view's timeout; returns a Future."""
        return self._proxy._call_async(method, args, kwargs, self._timeout)


def _remote_exception(error: Any, codec: Codec) -> BaseException:
    """The exception to raise for a reply's error field."""
    if not isinstance(error, (list, tuple)) or len(error) < 2:
        return ProtocolError(f"malformed error in an RPC reply: {error!r}")
    type_name, message = str(error[0]), str(error[1])
    tb = str(error[2]) if len(error) > 2 and error[2] is not None else ""
    cls = MethodNotFound if type_name.rpartition(".")[2] == "MethodNotFound" else RemoteError
    remote = cls(type_name, message, tb)
    if len(error) > 3 and isinstance(error[3], BaseException):
        exc = error[3]
        exc.__cause__ = remote
        return exc
    return remote


#: Why a proxy failed when the server closed the connection during the hello.
HELLO_CLOSED = "the server closed the connection during the RPC hello (is it a fastnet RPCServer?)"


def hello_frame(codec_name: str) -> bytes:
    """The client's hello frame asking for ``codec_name`` (any proxy, blocking or asyncio)."""
    return json.dumps({"fastnet-rpc": PROTOCOL_VERSION, "codec": codec_name}).encode()


def check_hello_reply(data: Any, codec_name: str) -> None:
    """Raise unless ``data`` is a server's hello accepting ``codec_name``."""
    if bytes(data[:11]) == b"#CHALLENGE#":
        raise AuthenticationError("the RPC server requires an authkey and none was given")
    try:
        reply = json.loads(bytes(data).decode("utf-8"))
        version = reply["fastnet-rpc"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ProtocolError("the server's hello reply is not a fastnet RPC hello") from None
    if "error" in reply:
        raise ProtocolError(f"the RPC server refused this client: {reply['error']}")
    if version != PROTOCOL_VERSION or reply.get("codec") != codec_name:
        raise ProtocolError(f"RPC hello mismatch: server speaks version {version} "
                            f"with codec {reply.get('codec')!r}")


class _NotSent(ConnectionLost):
    """A send failed: the request did not leave whole, so it cannot have run."""


class _Batch:
    """``proxy.batch()``: calls and notifications queued, then sent together in one write."""

    def __init__(self, proxy: RPCProxy, timeout: float | None) -> None:
        self._proxy = proxy
        self._timeout = timeout
        self._frames: list[Buffer] = []
        self._count = 0

    def call_async(self, method: str, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Queue a call; returns its Future (sent at the latest when the batch ends)."""
        fut = self._proxy._call_async(method, args, kwargs, self._timeout, self)
        if self._count >= _BATCH_MAX:
            self.flush()
        return fut

    def notify(self, method: str, /, *args: Any, **kwargs: Any) -> None:
        """Queue a one-way call."""
        self._frames.extend(_encode(self._proxy._codec, [_NOTIFY, method, list(args), kwargs or None]))
        self._count += 1
        if self._count >= _BATCH_MAX:
            self.flush()

    def flush(self) -> None:
        """Send what is queued now."""
        frames = self._frames
        if not frames:
            return
        self._frames = []
        self._count = 0
        p = self._proxy
        p._checked()
        p._send(frames, p._gen)

    def __enter__(self) -> _Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


class RPCProxy:
    """A client of an :class:`RPCServer`: ``proxy.method(*args, **kwargs)``.

    ``RPCProxy(address, authkey=None, codec="msgpack", ssl_context=None,
    timeout=None)``. ``timeout`` is the default per-call timeout in seconds
    (None: wait for ever); :meth:`with_timeout` and :meth:`invoke` set it per
    call. A timed-out call raises :class:`fastnet.TimeoutError`; its late
    reply is discarded and the connection stays usable.

    Attribute access names remote methods (``proxy.kv.get``) except for the
    proxy's own attributes; :meth:`call` reaches a method of any name.
    Calls may run concurrently from many threads; :meth:`call_async` keeps
    many calls in flight on the one connection (replies are matched by id).
    If the connection drops, every pending call fails with
    :class:`fastnet.ConnectionLost` (it may or may not have run; it is never
    repeated) and the next call reconnects, retrying with a bounded
    exponential backoff (``backoff=(first, max)`` seconds) for up to
    ``connect_timeout`` seconds. The first connection is made at once
    (``lazy=True``: at the first call) and is not retried. ``keepalive``
    (seconds, TCP) fails the pending calls with ConnectionLost within about
    that long when the server's host vanishes without closing the connection
    (see :func:`fastnet.set_keepalive`); a per-call ``timeout`` bounds a call
    either way.
    """

    # every attribute lives in the instance's __dict__ (see __setattr__)
    _address: Any
    _family: str | int | None
    _authkey: bytes | None
    _codec: Codec
    _ssl_context: ssl.SSLContext | None
    _timeout: float | None
    _connect_timeout: float
    _max_size: int | None
    _strict: bool
    _backoff: tuple[float, float]
    _keepalive: float | None
    _conn: Connection | None
    _ch: _CChannel | TLSChannel | None
    _gen: int
    _closed: bool
    _lock: threading.Lock
    _cv: threading.Condition
    _rlock: threading.Lock
    _send_lock: threading.Lock
    _connect_lock: threading.Lock
    _ids: itertools.count[int]
    _pending: dict[int, _Slot | _FutureSlot]
    _waiters: int
    _async: int
    _timed: int
    _bg: threading.Thread | None
    _bg_parked: bool
    _drivers: int
    _to_close: list[Connection]
    _partial: list[Any] | None
    _partial_left: int
    _last_io: float
    late_replies: int

    def __init__(self, address: Any, authkey: bytes | None = None, codec: str | Codec = DEFAULT_CODEC,
                 ssl_context: ssl.SSLContext | None = None, timeout: float | None = None, *,
                 connect_timeout: float = 10.0, family: str | int | None = None,
                 max_message_size: int | None = DEFAULT_RPC_MAX_MESSAGE_SIZE,
                 strict: bool = False, backoff: tuple[float, float] = (0.02, 1.0), lazy: bool = False,
                 keepalive: float | None = None) -> None:
        d = self.__dict__
        d["_address"] = address
        d["_family"] = family
        d["_authkey"] = authkey
        d["_codec"] = get_codec(codec)
        d["_ssl_context"] = ssl_context
        d["_timeout"] = timeout
        d["_connect_timeout"] = connect_timeout
        d["_max_size"] = max_message_size
        d["_strict"] = strict
        d["_backoff"] = backoff
        d["_keepalive"] = keepalive
        d["_conn"] = None
        d["_ch"] = None
        d["_gen"] = 0
        d["_closed"] = False
        d["_lock"] = lock = threading.Lock()
        d["_cv"] = threading.Condition(lock)
        d["_rlock"] = threading.Lock()       # held by the one thread reading replies
        d["_send_lock"] = threading.Lock()
        d["_connect_lock"] = threading.Lock()
        d["_ids"] = itertools.count(1)
        d["_pending"] = {}
        d["_waiters"] = 0
        d["_async"] = 0                      # pending asynchronous calls
        d["_timed"] = 0                      # ... of which have a deadline
        d["_bg"] = None
        d["_bg_parked"] = False
        d["_drivers"] = 0                    # threads waiting on an asynchronous call
        d["_to_close"] = []                  # dropped connections a reader still holds
        d["_partial"] = None
        d["_partial_left"] = 0
        d["_last_io"] = 0.0
        d["late_replies"] = 0
        if not lazy:
            self._ensure(retry=False)

    # -- public -----------------------------------------------------------
    def __getattr__(self, name: str) -> _BoundMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        m = _BoundMethod(self, name)
        # cached on the instance: later lookups never reach __getattr__
        self.__dict__[name] = m
        return m

    def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` (a name, dotted or not) and return its result."""
        return self._call(method, args, kwargs, self._timeout)

    def invoke(self, method: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
               timeout: float | None = None) -> Any:
        """Call ``method`` with explicit ``args``, ``kwargs`` and ``timeout`` (None: the proxy's)."""
        return self._call(method, args, kwargs, self._timeout if timeout is None else timeout)

    def with_timeout(self, timeout: float | None) -> _TimeoutView:
        """A view of this proxy whose calls time out after ``timeout`` seconds."""
        return _TimeoutView(self, timeout)

    def call_async(self, method: str, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Send a call and return a ``concurrent.futures.Future`` of its result.

        Many calls may be in flight at once; the proxy's ``timeout`` applies
        to each (the future fails with :class:`fastnet.TimeoutError`).
        """
        return self._call_async(method, args, kwargs, self._timeout)

    def batch(self, timeout: float | None = None) -> _Batch:
        """A context manager that sends the calls made through it together.

        ``with proxy.batch() as b: futures = [b.call_async("add", i, 1) for i in range(64)]``
        sends the 64 requests in one write when the block ends (or every
        256 calls), instead of one write each: the way to the highest call
        rate. ``b.notify(...)`` queues one-way calls the same way.
        """
        return _Batch(self, self._timeout if timeout is None else timeout)

    def notify(self, method: str, /, *args: Any, **kwargs: Any) -> None:
        """Send a one-way call: no reply, no result, errors stay on the server."""
        frames = _encode(self._codec, [_NOTIFY, method, list(args), kwargs or None])
        self._checked()
        self._send(frames, self._gen)

    @property
    def codec(self) -> str:
        """The codec name in use."""
        return self._codec.name

    @property
    def connected(self) -> bool:
        """True while the proxy holds an open connection."""
        return self._conn is not None

    @property
    def pending(self) -> int:
        """The number of calls waiting for a reply."""
        return len(self._pending)

    def close(self) -> None:
        """Close the connection; pending calls fail with ConnectionLost."""
        with self._cv:
            self.__dict__["_closed"] = True
            conn = self._conn
            self._cv.notify_all()
        if conn is not None:
            self._drop(conn, ConnectionLost("the proxy was closed"))

    def __enter__(self) -> RPCProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        conn = self.__dict__.get("_conn")
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("connected" if self._conn else "disconnected")
        return f"<fastnet.RPCProxy {self._address!r} codec={self._codec.name} {state}>"

    def __setattr__(self, name: str, value: Any) -> None:
        # every attribute is internal; a typo must not silently shadow a remote method
        if name.startswith("_") and name in self.__dict__:
            self.__dict__[name] = value
        else:
            raise AttributeError(f"cannot set {name!r} on an RPCProxy")

    # -- connecting -------------------------------------------------------
    def _checked(self) -> Connection:
        """The open connection, reconnecting first if it is gone or went stale while idle."""
        conn = self._conn
        if conn is not None and time.monotonic() - self._last_io > _STALE_AFTER:
            self._stale()
            conn = self._conn
        if conn is None:
            conn = self._ensure()
        return conn

    def _ensure(self, retry: bool = True) -> Connection:
        conn = self._conn
        if conn is not None:
            return conn
        if self._closed:
            raise ConnectionLost("the proxy is closed")
        with self._connect_lock:
            conn = self._conn
            if conn is not None:
                return conn
            deadline = time.monotonic() + self._connect_timeout
            delay, cap = self._backoff
            while True:
                try:
                    conn = self._open(deadline)
                    break
                except AuthenticationError as e:
                    # a peer that vanished mid-handshake is a connection failure, not a refusal
                    if not isinstance(e.__cause__, (EOFError, OSError)):
                        raise
                    err: BaseException = e
                except EOFError as e:
                    # the peer closed mid-handshake (or mid-frame): a connection failure
                    err = e
                except (ProtocolError, ValueError, TypeError):
                    raise
                except OSError as e:
                    err = e
                left = deadline - time.monotonic()
                if left <= 0 or not retry:
                    raise ConnectionLost(f"cannot connect to {self._address!r}: {err}") from err
                time.sleep(min(delay, left))
                delay = min(delay * 2, cap)
            with self._cv:
                if self._closed:
                    conn.close()
                    raise ConnectionLost("the proxy is closed")
                d = self.__dict__
                d["_ch"] = conn._ch
                d["_partial"] = None
                d["_last_io"] = time.monotonic()
                d["_gen"] = self._gen + 1
                d["_conn"] = conn
            return conn

    def _open(self, deadline: float) -> Connection:
        left = max(0.001, deadline - time.monotonic())
        conn = Client(self._address, self._family, self._authkey, timeout=left,
                      max_message_size=self._max_size, strict=self._strict,
                      ssl_context=self._ssl_context, keepalive=self._keepalive)
        try:
            conn.send_bytes(hello_frame(self._codec.name))
            left = max(0.001, deadline - time.monotonic())
            try:
                data = conn._ch.recv_frame(_MAX_HELLO, left)  # type: ignore[union-attr]  # open
            except EOFError:
                raise ConnectionLost(HELLO_CLOSED) from None
            check_hello_reply(data, self._codec.name)
        except BaseException:
            conn.close()
            raise
        return conn

    def _stale(self) -> None:
        """Drop an idle connection the server closed meanwhile, so the next call reconnects first."""
        if self._pending or not self._rlock.acquire(False):
            return
        conn = self._conn
        ch = self._ch
        try:
            if ch is not None and ch.poll(0.0):
                self.__dict__["late_replies"] += len(ch.recv_frames(0.0))
        except TimeoutError:
            pass
        except (EOFError, OSError):
            self._drop(conn, ConnectionLost("the server closed the idle connection"))
        finally:
            self._release_reader()

    def _drop(self, conn: Connection | None, exc: BaseException) -> None:
        """Forget a broken connection and fail every call pending on it."""
        with self._cv:
            if self._conn is not conn:
                return
            d = self.__dict__
            d["_conn"] = None
            d["_ch"] = None
            pending = self._pending
            d["_pending"] = {}
            d["_async"] = 0
            d["_timed"] = 0
            d["_partial"] = None
            self._cv.notify_all()
        try:
            # wakes a thread blocked reading it, which then sees end of file
            conn._sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
        except (OSError, AttributeError):
            pass
        if self._rlock.acquire(False):
            try:
                conn.close()  # type: ignore[union-attr]
            finally:
                self._rlock.release()
        else:
            # the reading thread still uses its descriptor: it closes it on leaving
            self._to_close.append(conn)  # type: ignore[arg-type]
        for slot in list(pending.values()):
            slot.fail(exc)

    # -- calling ----------------------------------------------------------
    def _send(self, frames: list[Buffer], gen: int) -> None:
        with self._send_lock:
            ch = self._ch
            conn = self._conn
            if ch is None or self._gen != gen:
                raise ConnectionLost("the connection was lost before the call was sent")
            try:
                if len(frames) == 1:
                    ch.send_frame(frames[0])
                else:
                    ch.send_frames(frames)
                return
            except OSError as e:
                err = e
        self._drop(conn, ConnectionLost(f"the connection to {self._address!r} was lost: {err}"))
        raise _NotSent(f"sending the call failed: {err}") from err

    def _register(self, msgid: int, slot: _Slot | _FutureSlot, gen: int) -> bool:
        """Add a pending call; False if the connection it was meant for is gone."""
        pending = self._pending
        pending[msgid] = slot
        # _drop swaps the dict: a slot that landed in the old one would never complete
        if self._pending is pending and self._gen == gen and self._conn is not None:
            return True
        pending.pop(msgid, None)
        return False

    def _call(self, method: str, args: Sequence[Any], kwargs: dict[str, Any] | None,
              timeout: float | None) -> Any:
        try:
            return self._call_once(method, args, kwargs, timeout)
        except _NotSent:
            # the server closed the connection before this call went out (an idle
            # timeout, a restart): safe to send it once more on a new connection
            return self._call_once(method, args, kwargs, timeout)

    def _call_once(self, method: str, args: Sequence[Any], kwargs: dict[str, Any] | None,
                   timeout: float | None) -> Any:
        self._checked()
        gen = self._gen
        msgid = next(self._ids)
        frames = _encode(self._codec, [_REQUEST, msgid, method,
                                       args if type(args) is list else list(args), kwargs or None])
        slot = _Slot()
        if not self._register(msgid, slot, gen):
            raise ConnectionLost("the connection was lost before the call was sent")
        try:
            self._send(frames, gen)
        except BaseException:
            self._pending.pop(msgid, None)
            raise
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._rlock.acquire(False):
            self._read_as_reader(slot, msgid, deadline)
        else:
            self._wait_slow(slot, msgid, deadline)
        if slot.error is not None:
            raise slot.error
        return slot.value

    def _call_async(self, method: str, args: Sequence[Any], kwargs: dict[str, Any] | None,
                    timeout: float | None, batch: _Batch | None = None,
                    retried: bool = False) -> concurrent.futures.Future[Any]:
        self._checked()
        gen = self._gen
        msgid = next(self._ids)
        frames = _encode(self._codec, [_REQUEST, msgid, method, list(args), kwargs or None])
        fut = _CallFuture(self)
        fut.set_running_or_notify_cancel()
        deadline = None if timeout is None else time.monotonic() + timeout
        slot = _FutureSlot(fut, deadline)
        with self._cv:
            if not self._register(msgid, slot, gen):
                raise ConnectionLost("the connection was lost before the call was sent")
            d = self.__dict__
            d["_async"] = self._async + 1
            d["_last_io"] = time.monotonic()
            if deadline is not None:
                d["_timed"] = self._timed + 1
            if self._bg is None:
                t = d["_bg"] = threading.Thread(target=self._background, name="fastnet-rpc-reader",
                                                daemon=True)
                t.start()
            elif self._bg_parked:
                self._cv.notify_all()
        if batch is not None:
            # a batch from before a reconnect fails at flush: its slots went with the old connection
            batch._frames.extend(frames)
            batch._count += 1
            return fut
        try:
            self._send(frames, gen)
        except BaseException as e:
            with self._cv:
                if self._pending.pop(msgid, None) is not None:
                    self._forget_async(slot)
            if isinstance(e, _NotSent) and not retried:
                return self._call_async(method, args, kwargs, timeout, None, True)
            if not fut.done():
                fut.set_exception(e)
        return fut

    def _forget_async(self, slot: _FutureSlot) -> None:
        # with the lock held
        d = self.__dict__
        d["_async"] = self._async - 1
        if slot.deadline is not None:
            d["_timed"] = self._timed - 1

    def _release_reader(self) -> None:
        while self._to_close:
            try:
                self._to_close.pop().close()
            except (IndexError, OSError):
                pass
        self._rlock.release()
        if self._waiters or self._async:
            with self._cv:
                self._cv.notify_all()

    def _read_as_reader(self, slot: _Slot, msgid: int, deadline: float | None) -> None:
        """Holding the reader lock: read and dispatch replies until ``slot`` is done."""
        try:
            ch = self._ch
            conn = self._conn
            if ch is None:
                if not slot.done:
                    slot.fail(ConnectionLost("the connection was lost"))
                return
            while not slot.done:
                if deadline is None:
                    left = None
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._timed_out(slot, msgid)
                        return
                try:
                    frames = ch.recv_frames(left)
                except TimeoutError:
                    continue
                except (EOFError, OSError) as e:
                    self._lost(conn, e)
                    break
                self._dispatch(frames, conn)
            if not slot.done:
                slot.fail(ConnectionLost("the connection was lost"))
        finally:
            self._release_reader()

    def _timed_out(self, slot: _Slot, msgid: int) -> None:
        if self._pending.pop(msgid, None) is not None or not slot.done:
            slot.fail(TimeoutError("RPC call timed out waiting for its reply"))

    def _wait_slow(self, slot: _Slot, msgid: int, deadline: float | None) -> None:
        """Another thread reads replies: wait for ours, or for the reader lock to read ourselves."""
        cv = self._cv
        with cv:
            self.__dict__["_waiters"] = self._waiters + 1
            try:
                while not slot.done:
                    if self._rlock.acquire(False):
                        break
                    if self._conn is None:
                        if not slot.done:
                            slot.fail(ConnectionLost("the connection was lost"))
                        return
                    if deadline is None:
                        cv.wait()
                        continue
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._timed_out(slot, msgid)
                        return
                    cv.wait(left)
                else:
                    return
            finally:
                self.__dict__["_waiters"] = self._waiters - 1
        self._read_as_reader(slot, msgid, deadline)

    def _drive(self, fut: concurrent.futures.Future[Any], timeout: float | None) -> None:
        """Wait for ``fut``, reading replies on this thread whenever nobody else is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        d = self.__dict__
        with self._lock:
            d["_drivers"] = self._drivers + 1
        try:
            self._drive_loop(fut, deadline)
        finally:
            with self._lock:
                d["_drivers"] = self._drivers - 1

    def _drive_loop(self, fut: concurrent.futures.Future[Any], deadline: float | None) -> None:
        while not fut.done():
            if self._rlock.acquire(False):
                try:
                    self._read_for(fut, deadline)
                finally:
                    self._release_reader()
            if fut.done():
                return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return                  # Future.result raises the timeout
            # someone else reads: wait for our reply, looking again now and then in
            # case that reader leaves before it arrives
            concurrent.futures.wait((fut,), _DRIVE_POLL if left is None else min(left, _DRIVE_POLL))

    def _read_for(self, fut: concurrent.futures.Future[Any], deadline: float | None) -> None:
        ch = self._ch
        conn = self._conn
        if ch is None:
            return
        while not fut.done():
            left = self._next_deadline()
            if deadline is not None:
                mine = deadline - time.monotonic()
                if mine <= 0:
                    return
                left = mine if left is None else min(left, mine)
            try:
                frames = ch.recv_frames(left)
            except TimeoutError:
                with self._cv:
                    self._expire_locked()
                continue
            except (EOFError, OSError) as e:
                self._lost(conn, e)
                return
            self._dispatch(frames, conn)

    def _next_deadline(self) -> float | None:
        if not self._timed:
            return None
        with self._cv:
            return self._next_deadline_locked()

    def _lost(self, conn: Connection | None, e: BaseException) -> None:
        if isinstance(e, EOFError):
            why = "the server closed the connection"
        else:
            why = f"the connection failed ({type(e).__name__}: {e})"
        self._drop(conn, ConnectionLost(f"{why}; the call may or may not have run"))

    def _dispatch(self, frames: list[bytes], conn: Connection | None) -> None:
        d = self.__dict__
        d["_last_io"] = time.monotonic()
        codec = self._codec
        pending = self._pending
        woke = False
        for f in frames:
            part = self._partial
            if part is not None:
                part.append(f)
                left = d["_partial_left"] = self._partial_left - 1
                if left:
                    continue
                d["_partial"] = None
                msg_frames: Sequence[Any] = part
            elif f[:1] == b"\xc1":
                n = _oob_count(f)
                if n < 1:
                    self._lost(conn, ProtocolError("bad out-of-band marker frame from the server"))
                    return
                d["_partial"] = []
                d["_partial_left"] = n + 1
                continue
            else:
                msg_frames = (f,)
            try:
                kind, msgid, error, result = codec.loads(msg_frames)
                if kind != _REPLY:
                    raise ValueError(f"message kind {kind!r}")
            except Exception as e:
                self._lost(conn, ProtocolError(f"malformed reply from the server ({e})"))
                return
            slot = pending.pop(msgid, None)
            if slot is None:
                d["late_replies"] += 1     # its call timed out: nobody wants it
                continue
            if type(slot) is _FutureSlot:
                with self._lock:
                    self._forget_async(slot)
            else:
                woke = True
            if error is None:
                slot.set(None, result)
            else:
                slot.set(_remote_exception(error, codec), None)
        if woke and self._waiters:
            with self._cv:
                self._cv.notify_all()

    def _background(self) -> None:
        """Reads replies for asynchronous calls nobody is waiting on."""
        cv = self._cv
        d = self.__dict__
        rlock = self._rlock
        while True:
            with cv:
                while True:
                    if self._closed:
                        return
                    self._expire_locked()
                    if not self._async or self._conn is None:
                        d["_bg_parked"] = True
                        cv.wait(self._next_deadline_locked())
                        d["_bg_parked"] = False
                        continue
                    # a caller that issues calls and then waits reads its replies
                    # itself: take over only when replies have stalled a while
                    # with nobody reading or waiting
                    quiet = time.monotonic() - self._last_io
                    if quiet < _BG_GRACE or self._drivers or self._waiters or rlock.locked():
                        cv.wait(max(_BG_GRACE - quiet, _BG_GRACE / 4))
                        continue
                    if rlock.acquire(False):
                        break
                conn = self._conn
                ch = self._ch
            try:
                while self._async and self._conn is conn and not self._waiters and not self._drivers:
                    left = self._next_deadline()
                    try:
                        frames = ch.recv_frames(left)  # type: ignore[union-attr]
                    except TimeoutError:
                        with cv:
                            self._expire_locked()
                        continue
                    except (EOFError, OSError) as e:
                        self._lost(conn, e)
                        break
                    self._dispatch(frames, conn)
            finally:
                self._release_reader()

    def _next_deadline_locked(self) -> float | None:
        if not self._timed:
            return None
        soonest = None
        for slot in list(self._pending.values()):
            dl: float | None = getattr(slot, "deadline", None)
            if dl is not None and (soonest is None or dl < soonest):
                soonest = dl
        if soonest is None:
            return None
        return max(0.0, soonest - time.monotonic())

    def _expire_locked(self) -> None:
        if not self._timed:
            return
        now = time.monotonic()
        expired = [k for k, s in list(self._pending.items())
                   if type(s) is _FutureSlot and s.deadline is not None and s.deadline <= now]
        for k in expired:
            s = self._pending.pop(k)
            self._forget_async(s)  # type: ignore[arg-type]
            s.fail(TimeoutError("RPC call timed out waiting for its reply"))
