"""The RPC client's surface: :class:`RPCProxy`, its remote methods, timeout views, batches and futures.

A call is encoded here, registered with the reply demultiplexer
(:mod:`fastnet.rpc._demux`) and sent through the connection manager
(:mod:`fastnet.rpc._connector`), which also reconnects; this module keeps
no connection state of its own.
"""
from __future__ import annotations

import concurrent.futures
import ssl
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastnet.codecs import DEFAULT_CODEC, get_codec
from fastnet.connection import _coalesce_limit
from fastnet.errors import ConnectionLost
from fastnet.rpc._connector import Connector, _NotSent
from fastnet.rpc._demux import ReplyDemux, _CallFuture, _Slot
from fastnet.rpc._wire import DEFAULT_RPC_MAX_MESSAGE_SIZE

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from fastnet.codecs import Codec
    from fastnet.connection import Connection

__all__ = ["RPCProxy"]

_BATCH_MAX = 256


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


class _Batch:
    """``proxy.batch()``: calls and notifications queued, then sent together in one write."""

    def __init__(self, proxy: RPCProxy, timeout: float | None) -> None:
        self._proxy = proxy
        self._timeout = timeout
        self._msgs: list[bytes | list[Buffer]] = []
        self._count = 0

    def call_async(self, method: str, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Queue a call; returns its Future (sent at the latest when the batch ends)."""
        fut = self._proxy._call_async(method, args, kwargs, self._timeout, self)
        if self._count >= _BATCH_MAX:
            self.flush()
        return fut

    def notify(self, method: str, /, *args: Any, **kwargs: Any) -> None:
        """Queue a one-way call."""
        self._msgs.append(self._proxy._link.wire.notification(method, args, kwargs))
        self._count += 1
        if self._count >= _BATCH_MAX:
            self.flush()

    def flush(self) -> None:
        """Send what is queued now."""
        msgs = self._msgs
        if not msgs:
            return
        self._msgs = []
        self._count = 0
        link = self._proxy._link
        link.checked()
        link.send_many(msgs, link.gen)

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
    either way. ``spin`` (microseconds) makes a call waiting for its reply
    poll the socket without sleeping for up to that long before it blocks:
    lower latency across CPUs for CPU burnt (see :class:`fastnet.Connection`).

    ``coalesce=True`` (or a threshold in bytes; True: 64 KiB) queues the
    requests of :meth:`call_async` and :meth:`notify` and writes them
    together, in one syscall, when a reply is waited for, with a
    synchronous call or a batch, on :meth:`flush` and :meth:`close`, or
    when the queue passes the threshold. If that write fails, the calls
    pending on the connection fail with ConnectionLost and queued
    notifications are lost (see "Coalescing requests" in the RPC docs).
    """

    # every attribute lives in the instance's __dict__ (see __setattr__)
    _codec: Codec
    _timeout: float | None
    _link: Connector
    _replies: ReplyDemux

    def __init__(self, address: Any, authkey: bytes | None = None, codec: str | Codec = DEFAULT_CODEC,
                 ssl_context: ssl.SSLContext | None = None, timeout: float | None = None, *,
                 connect_timeout: float = 10.0, family: str | int | None = None,
                 max_message_size: int | None = DEFAULT_RPC_MAX_MESSAGE_SIZE,
                 strict: bool = False, backoff: tuple[float, float] = (0.02, 1.0), lazy: bool = False,
                 keepalive: float | None = None, spin: float = 0.0, coalesce: bool | int = False) -> None:
        d = self.__dict__
        d["_codec"] = the_codec = get_codec(codec)
        d["_timeout"] = timeout
        d["_link"] = link = Connector(address, family, authkey, the_codec, ssl_context, connect_timeout,
                                      max_message_size, strict, backoff, keepalive, spin,
                                      _coalesce_limit(coalesce))
        d["_replies"] = link.replies
        if not lazy:
            link.ensure(retry=False)

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
        link = self._link
        msg = link.wire.notification(method, args, kwargs)
        link.checked()
        link.send(msg, link.gen, True)

    def flush(self) -> None:
        """Write the requests queued by coalescing now (ConnectionLost if that fails)."""
        self._link.flush()

    @property
    def coalesce(self) -> int:
        """The coalescing threshold in bytes (0: every request is written at once)."""
        return self._link.climit

    @property
    def codec(self) -> str:
        """The codec name in use."""
        return self._codec.name

    @property
    def connected(self) -> bool:
        """True while the proxy holds an open connection."""
        return self._link.conn is not None

    @property
    def pending(self) -> int:
        """The number of calls waiting for a reply."""
        return len(self._replies.pending)

    @property
    def late_replies(self) -> int:
        """The number of replies dropped because their call had timed out."""
        return self._replies.late_replies

    @property
    def _conn(self) -> Connection | None:
        # the open connection, for a look at its socket
        return self._link.conn

    def close(self) -> None:
        """Write queued requests and close the connection; pending calls fail with ConnectionLost."""
        self._link.close()

    def __enter__(self) -> RPCProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        link = self.__dict__.get("_link")
        conn = link.conn if link is not None else None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        link = self._link
        state = "closed" if link.closed else ("connected" if link.conn else "disconnected")
        return f"<fastnet.RPCProxy {link.address!r} codec={self._codec.name} {state}>"

    def __setattr__(self, name: str, value: Any) -> None:
        # every attribute is internal; a typo must not silently shadow a remote method
        if name.startswith("_") and name in self.__dict__:
            self.__dict__[name] = value
        else:
            raise AttributeError(f"cannot set {name!r} on an RPCProxy")

    # -- calling ----------------------------------------------------------
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
        link = self._link
        replies = self._replies
        link.checked()
        gen = link.gen
        msgid = next(replies.ids)
        msg = link.wire.request(msgid, method, args, kwargs)
        slot = _Slot()
        if not replies.register(msgid, slot, gen):
            raise ConnectionLost("the connection was lost before the call was sent")
        try:
            link.send(msg, gen)
        except BaseException:
            replies.pending.pop(msgid, None)
            raise
        deadline = None if timeout is None else time.monotonic() + timeout
        replies.wait(slot, msgid, deadline)
        if slot.error is not None:
            raise slot.error
        return slot.value

    def _call_async(self, method: str, args: Sequence[Any], kwargs: dict[str, Any] | None,
                    timeout: float | None, batch: _Batch | None = None,
                    retried: bool = False) -> concurrent.futures.Future[Any]:
        link = self._link
        replies = self._replies
        link.checked()
        gen = link.gen
        msgid = next(replies.ids)
        msg = link.wire.request(msgid, method, args, kwargs)
        fut = _CallFuture(self, None if timeout is None else time.monotonic() + timeout)
        # the reader thread keeps this proxy alive while it runs, as it reads the
        # connection the proxy's finalizer closes
        replies.register_async(msgid, fut, gen, self)
        if batch is not None:
            # a batch from before a reconnect fails at flush: its slots went with the old connection
            batch._msgs.append(msg)
            batch._count += 1
            return fut
        try:
            link.send(msg, gen, True)
        except BaseException as e:
            replies.unregister_async(msgid, fut)
            if isinstance(e, _NotSent) and not retried:
                return self._call_async(method, args, kwargs, timeout, None, True)
            fut._complete(e, None)
        return fut
