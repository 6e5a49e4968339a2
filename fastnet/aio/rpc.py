"""RPCProxy for asyncio: ``await proxy.add(2, 3)`` against any fastnet :class:`~fastnet.RPCServer`.

The wire is :mod:`fastnet.rpc`'s (hello frame, msgpack-rpc shaped messages,
out-of-band buffers), so this proxy and the blocking one reach the same
servers. Calls made concurrently (``asyncio.gather``) share the one
connection: requests are matched to replies by id, and one reader task on
the loop dispatches every reply.
"""
from __future__ import annotations

import asyncio
import itertools
import ssl
from collections.abc import Sequence
from typing import Any

from fastnet.aio.connection import AsyncConnection
from fastnet.aio.opening import connect
from fastnet._kernels import framing, rpcwire
from fastnet.codecs import DEFAULT_CODEC, Codec, get_codec
from fastnet.errors import ConnectionLost, TimeoutError
from fastnet.rpc._wire import (_MAX_HELLO, DEFAULT_RPC_MAX_MESSAGE_SIZE, HELLO_CLOSED, ReplyReader,
                               _remote_exception, check_hello_reply, hello_frame)

__all__ = ["RPCProxy"]


def _payloads(msg: bytes | list[Any]) -> list[Any]:
    # the kernel frames a small message itself; the connection frames again
    if isinstance(msg, bytes):
        return [memoryview(msg)[framing.HEADER_SIZE:]]
    return msg


class _Method:
    """``proxy.name``: awaiting a call of it calls the remote method; attributes extend the dotted name."""

    __slots__ = ("_proxy", "_name")

    def __init__(self, proxy: RPCProxy, name: str) -> None:
        self._proxy = proxy
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._proxy.call(self._name, *args, **kwargs)

    def __getattr__(self, attr: str) -> _Method:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Method(self._proxy, f"{self._name}.{attr}")

    def __repr__(self) -> str:
        return f"<fastnet.aio remote method {self._name!r}>"


class RPCProxy:
    """An asyncio client of an :class:`fastnet.RPCServer`.

    ``RPCProxy(address, authkey=None, codec="msgpack", ssl_context=None,
    timeout=None)``; ``await proxy.add(2, 3)`` calls ``add`` (connecting on
    the first call, or use ``async with``). ``timeout`` is the per-call
    timeout in seconds: a call that times out (or is cancelled) raises and
    its late reply is dropped; the connection stays usable. If the
    connection drops, the pending calls fail with :class:`fastnet.ConnectionLost`
    and the next call reconnects. Attribute access names remote methods
    (``proxy.kv.get``) except for the proxy's own; :meth:`call` reaches any name.
    """

    def __init__(self, address: Any, authkey: bytes | None = None, codec: str | Codec = DEFAULT_CODEC,
                 ssl_context: ssl.SSLContext | None = None, timeout: float | None = None, *,
                 connect_timeout: float = 10.0, max_message_size: int | None = DEFAULT_RPC_MAX_MESSAGE_SIZE,
                 keepalive: float | None = None, family: str | int | None = None, strict: bool = False) -> None:
        self._address = address
        self._authkey = authkey
        self._codec = codec if isinstance(codec, Codec) else get_codec(codec)
        self._wire = rpcwire.Wire(self._codec)
        self._ssl_context = ssl_context
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._max_size = max_message_size
        self._keepalive = keepalive
        self._family = family
        self._strict = strict
        self._conn: AsyncConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connecting: asyncio.Future[AsyncConnection] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._closed = False
        #: Replies that came after their call had timed out or been cancelled.
        self.late_replies = 0

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self, name)

    def __repr__(self) -> str:
        state = "connected" if self._conn is not None else "closed" if self._closed else "idle"
        return f"<fastnet.aio.RPCProxy {self._address!r} {self._codec.name} {state}>"

    @property
    def codec(self) -> str:
        """The codec name in use."""
        return self._codec.name

    @property
    def pending(self) -> int:
        """Calls sent and not yet answered."""
        return len(self._pending)

    # connection ----------------------------------------------------------
    async def connect(self) -> RPCProxy:
        """Connect now (the first call does otherwise) and return the proxy."""
        await self._ensure()
        return self

    async def _ensure(self) -> AsyncConnection:
        if self._closed:
            raise ConnectionLost("the proxy is closed")
        if self._conn is not None:
            return self._conn
        if self._connecting is None:
            # one coroutine connects; the calls that come meanwhile wait for it
            fut = self._connecting = asyncio.get_running_loop().create_future()
            try:
                conn = await self._open()
            except BaseException as exc:
                fut.set_exception(exc)
                fut.exception()      # retrieved: only the waiters re-raise it
                raise
            finally:
                self._connecting = None
            self._conn = conn
            self._reader = asyncio.get_running_loop().create_task(self._read(conn))
            fut.set_result(conn)
            return conn
        return await asyncio.shield(self._connecting)

    async def _open(self) -> AsyncConnection:
        conn = await connect(self._address, self._authkey, ssl_context=self._ssl_context,
                             timeout=self._connect_timeout, max_message_size=self._max_size,
                             keepalive=self._keepalive, family=self._family, strict=self._strict)
        try:
            await conn.send_bytes(hello_frame(self._codec.name))
            try:
                data = await asyncio.wait_for(conn.recv_bytes(_MAX_HELLO), self._connect_timeout)
            except asyncio.TimeoutError:
                raise TimeoutError("the RPC server did not answer the hello") from None
            except EOFError:
                raise ConnectionLost(HELLO_CLOSED) from None
            check_hello_reply(data, self._codec.name)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _read(self, conn: AsyncConnection) -> None:
        """Dispatch every reply on conn until it ends; then fail what is pending."""
        codec = self._codec
        pending = self._pending
        reader = ReplyReader(codec)
        error: BaseException
        try:
            while True:
                for f in await conn.recv_many():
                    reply = reader.feed(f)
                    if reply is None:
                        continue
                    msgid, err, result = reply
                    fut = pending.pop(msgid, None)
                    if fut is None or fut.done():
                        self.late_replies += 1
                    elif err is None:
                        fut.set_result(result)
                    else:
                        fut.set_exception(_remote_exception(err, codec))
        except asyncio.CancelledError:
            error = ConnectionLost("the proxy is closed")
        except EOFError:
            error = ConnectionLost("the server closed the connection")
        except Exception as exc:
            error = ConnectionLost(f"connection to the RPC server lost: {exc}")
            error.__cause__ = exc
        if self._conn is conn:
            self._conn = None
            self._reader = None
        conn.close()
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error)
        pending.clear()

    # calls ---------------------------------------------------------------
    async def call(self, method: str, /, *args: Any, **kwargs: Any) -> Any:
        """Call ``method`` (a name, dotted or not) and return its result."""
        return await self.invoke(method, args, kwargs or None)

    async def invoke(self, method: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
                     timeout: float | None = None) -> Any:
        """Call ``method`` with explicit ``args``, ``kwargs`` and ``timeout`` (None: the proxy's)."""
        conn = await self._ensure()
        msgid = next(self._ids)
        frames = _payloads(self._wire.request(msgid, method, args, kwargs))
        fut = asyncio.get_running_loop().create_future()
        self._pending[msgid] = fut
        try:
            await conn.send_many(frames)
            if timeout is None:
                timeout = self._timeout
            if timeout is None:
                return await fut
            try:
                return await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(f"RPC call {method!r} timed out after {timeout} s") from None
        finally:
            self._pending.pop(msgid, None)

    async def notify(self, method: str, /, *args: Any, **kwargs: Any) -> None:
        """Send a one-way call: no reply, no result, errors stay on the server."""
        conn = await self._ensure()
        await conn.send_many(_payloads(self._wire.notification(method, args, kwargs)))

    # closing -------------------------------------------------------------
    async def close(self) -> None:
        """Close the connection; pending calls fail with ConnectionLost."""
        self._closed = True
        reader, conn = self._reader, self._conn
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if conn is not None:
            conn.close()
            await conn.wait_closed()

    async def __aenter__(self) -> RPCProxy:
        await self._ensure()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
