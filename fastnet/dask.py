"""The ``fastnet://`` and ``fastnet-tls://`` comm backends for Dask distributed.

Installed with ``pip install 'fastnet[dask]'``, they register through the
``distributed.comm.backends`` entry point, so a cluster runs on fastnet with
no other change::

    LocalCluster(protocol="fastnet")            # or "fastnet-tls" with a Security
    dask scheduler --protocol fastnet
    Client("fastnet://10.0.0.1:8786")

A Dask message (the frames of ``distributed.protocol.dumps``) travels as
fastnet frames on a :mod:`fastnet.aio` connection: first a prelude frame with
the number of frames and their sizes, then one fastnet frame per Dask frame,
all handed to the socket in one ``sendmsg`` without joining them. The
receiver checks the prelude against ``max_message_size`` before it allocates
anything, then receives every frame of 64 KiB or more straight from the
socket into a writeable buffer of its own (the shards of one split frame into
one buffer, so Dask merges them without a copy); smaller frames come out of
the connection's read buffer.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import weakref
from typing import Any

import dask
from dask.utils import parse_bytes, parse_timedelta
from distributed.comm.addressing import parse_host_port, unparse_host_port
from distributed.comm.core import (BaseListener, Comm, CommClosedError, Connector,
                                   FatalCommClosedError)
from distributed.comm.registry import Backend
from distributed.comm.utils import OFFLOAD_THRESHOLD, ensure_concrete_host, from_frames, to_frames
from distributed.protocol.utils import host_array
from distributed.system import MEMORY_LIMIT
from distributed.utils import ensure_ip, get_ip, nbytes

from fastnet import aio
from fastnet.errors import AuthenticationError

__all__ = ["FastnetBackend", "FastnetTLSBackend", "FastnetComm", "FastnetTLSComm",
           "FastnetConnector", "FastnetTLSConnector", "FastnetListener", "FastnetTLSListener",
           "DEFAULT_MAX_MESSAGE_SIZE"]

logger = logging.getLogger("fastnet.dask")

#: The most bytes one message may make its receiver allocate (the sum of its
#: frames): half the machine's memory, as distributed's own TCP buffer limit.
#: ``connection_args["max_message_size"]`` overrides it.
DEFAULT_MAX_MESSAGE_SIZE = int(MEMORY_LIMIT // 2)
# Frames this large are received into a buffer of their own; smaller ones
# are cut out of the connection's read buffer.
OWN_BUFFER_THRESHOLD = 64 * 1024
# The most frames one message may have (bounds the prelude a peer can send).
MAX_FRAMES = 1 << 20
# Prelude: little-endian u64 frame count, then one u64 per frame: its size,
# with _JOINED set when the frame continues the previous frame's buffer.
_U64 = struct.Struct("<Q")
_JOINED = 1 << 63
_SIZE_MASK = _JOINED - 1


def _prelude(frames: list[Any]) -> tuple[bytes, int]:
    """The prelude frame of a message and the message's size in bytes."""
    words = [len(frames)]
    total = 0
    prev_obj: Any = None
    for f in frames:
        n = nbytes(f)
        total += n
        obj = f.obj if isinstance(f, memoryview) else None
        # shards that frame_split_size cut from one buffer arrive into one buffer
        if obj is not None and obj is prev_obj and n >= OWN_BUFFER_THRESHOLD:
            words.append(n | _JOINED)
        else:
            words.append(n)
        prev_obj = obj if n >= OWN_BUFFER_THRESHOLD else None
    return struct.pack(f"<{len(words)}Q", *words), total


def _parse_prelude(prelude: bytes, limit: int | None) -> list[int]:
    """The frame size words of a prelude, checked before anything is allocated for them."""
    if len(prelude) < 8 or len(prelude) % 8:
        raise CommClosedError(f"bad message prelude of {len(prelude)} bytes")
    (count,) = _U64.unpack_from(prelude)
    if count != len(prelude) // 8 - 1:
        raise CommClosedError(f"message prelude says {count} frames and holds {len(prelude) // 8 - 1}")
    words = list(struct.unpack_from(f"<{count}Q", prelude, 8))
    total = sum(w & _SIZE_MASK for w in words)
    if limit is not None and total > limit:
        raise CommClosedError(f"message of {total} bytes exceeds max_message_size={limit}")
    return words


_SCALARS = frozenset((int, float, bool, type(None)))


def _flat_and_small(msg: Any) -> bool:
    """True for a dict of scalars, short strings and bytes that distributed would not offload.

    ``to_frames`` measures every message with dask's ``sizeof`` to decide
    whether to serialize it on a thread; for the many small control
    messages that costs more than serializing them. An upper bound of their
    size is cheaper, and the answer is the same.
    """
    if type(msg) is not dict or len(msg) > 64 or not OFFLOAD_THRESHOLD:
        return False
    size = 0
    for k, v in msg.items():
        t = type(v)
        if t is str or t is bytes:
            size += len(v) * (4 if t is str else 1)
        elif t not in _SCALARS:
            return False
        if type(k) is str:
            size += 4 * len(k)
        elif type(k) not in _SCALARS:
            return False
        size += 200
    return bool(size <= OFFLOAD_THRESHOLD)


class FastnetComm(Comm):
    """A Dask comm over a :class:`fastnet.aio.AsyncConnection`."""

    max_shard_size = parse_bytes(dask.config.get("distributed.comm.shard"))

    def __init__(self, conn: aio.AsyncConnection, local_addr: str, peer_addr: str,
                 deserialize: bool = True, max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        self._conn: aio.AsyncConnection | None = conn
        super().__init__(deserialize=deserialize)
        self._local_addr = local_addr
        self._peer_addr = peer_addr
        self._max_size = max_message_size
        self._reading = False
        self._extra: dict[str, Any] = {}
        self._read_extra(conn)
        # a comm dropped without close() must not leave its socket open
        self._finalizer = weakref.finalize(self, _close_dangling, conn, repr(self))
        self._finalizer.atexit = False

    def _read_extra(self, conn: aio.AsyncConnection) -> None:
        pass

    @property
    def local_address(self) -> str:
        return self._local_addr

    @property
    def peer_address(self) -> str:
        return self._peer_addr

    @property
    def extra_info(self) -> dict[str, Any]:
        return self._extra

    async def read(self, deserializers: Any = None) -> Any:
        conn = self._conn
        if conn is None:
            raise CommClosedError(f"in {self}: the comm is closed")
        self._reading = True
        try:
            words = _parse_prelude(await conn.recv_bytes(8 * (MAX_FRAMES + 1)), self._max_size)
            frames: list[Any] = []
            i, count = 0, len(words)
            while i < count:
                n = words[i] & _SIZE_MASK
                if n < OWN_BUFFER_THRESHOLD:
                    f = await conn.recv_bytes(n)
                    if len(f) != n:
                        raise CommClosedError(f"frame of {len(f)} bytes, prelude said {n}")
                    frames.append(f)
                    i += 1
                    continue
                # a run of shards of one buffer: one host array, each shard received in place
                j = i + 1
                while j < count and words[j] & _JOINED:
                    j += 1
                sizes = [w & _SIZE_MASK for w in words[i:j]]
                buf = host_array(sum(sizes))
                off = 0
                for n in sizes:
                    view = buf[off:off + n]
                    got = await conn.recv_bytes_into(view)
                    if got != n:
                        raise CommClosedError(f"frame of {got} bytes, prelude said {n}")
                    frames.append(view)
                    off += n
                i = j
        except (EOFError, OSError) as exc:
            # a clean close, a reset, a bad frame, a frame over the limit
            self.abort()
            if isinstance(exc, CommClosedError):
                raise
            raise CommClosedError(f"in {self}: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            # cancelled or failed half way through a message: the stream is out of step
            self.abort()
            raise
        finally:
            self._reading = False
        try:
            return await from_frames(frames, deserialize=self.deserialize, deserializers=deserializers,
                                     allow_offload=self.allow_offload)
        except EOFError:
            # frames garbled or truncated by the peer
            self.abort()
            raise CommClosedError(f"in {self}: aborted stream on truncated data") from None

    async def write(self, msg: Any, serializers: Any = None, on_error: str = "message") -> int:
        conn = self._conn
        if conn is None:
            raise CommClosedError(f"in {self}: the comm is closed")
        frames = await to_frames(
            msg,
            allow_offload=self.allow_offload and not _flat_and_small(msg),
            serializers=serializers,
            on_error=on_error,
            context={"sender": self.local_info, "recipient": self.remote_info, **self.handshake_options},
            frame_split_size=self.max_shard_size,
        )
        prelude, total = _prelude(frames)
        try:
            # queued by reference as distributed's TCP comm does: the frames are
            # this message's own, and a writer waiting for its reader to drain
            # the socket would deadlock a task that writes then reads
            conn.write_many([prelude, *frames])
        except OSError as exc:
            self.abort()
            raise CommClosedError(f"in {self}: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            # what already left is unknown: the comm cannot be used again
            self.abort()
            raise
        return total + len(prelude)

    async def close(self) -> None:
        """Flush what is queued, then close (idempotent)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._finalizer.detach()
        conn.close()
        try:
            await conn.wait_closed()
        except asyncio.CancelledError:
            conn.abort()
            raise

    def abort(self) -> None:
        """Close now, dropping whatever is queued (idempotent)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._finalizer.detach()
            conn.abort()

    def closed(self) -> bool:
        conn = self._conn
        if conn is None:
            return True
        # with no read pending nobody else would notice the peer going; what
        # it sent before going stays readable until a read meets the end
        return conn.closed or (not self._reading and conn.peer_gone())


def _close_dangling(conn: aio.AsyncConnection, r: str) -> None:
    if not conn.closed:
        logger.warning("closing dangling comm %s", r)
        try:
            conn.abort()
        except RuntimeError:      # its loop is gone: release the socket alone
            sock = conn.get_extra_info("socket")
            if sock is not None:
                sock.close()


class FastnetTLSComm(FastnetComm):
    """A Dask comm over a TLS :class:`fastnet.aio.AsyncConnection`."""

    # OpenSSL writes at most INT_MAX bytes at once
    max_shard_size = min(2**31 - 1, FastnetComm.max_shard_size)

    def _read_extra(self, conn: aio.AsyncConnection) -> None:
        self._extra.update(peercert=conn.get_extra_info("peercert"), cipher=conn.get_extra_info("cipher"))


def _tls_context(connection_args: dict[str, Any]) -> ssl.SSLContext:
    ctx = connection_args.get("ssl_context")
    if not isinstance(ctx, ssl.SSLContext):
        raise TypeError("fastnet-tls expects a `ssl_context` argument of type ssl.SSLContext "
                        f"(perhaps check your TLS configuration?); got {ctx!r}")
    return ctx


def _max_message_size(connection_args: dict[str, Any]) -> int | None:
    size = connection_args.get("max_message_size", DEFAULT_MAX_MESSAGE_SIZE)
    return None if size is None else int(size)


class _Scheme:
    prefix = "fastnet://"
    encrypted = False
    comm_class: type[FastnetComm] = FastnetComm

    def _check_encryption(self, address: str, connection_args: dict[str, Any]) -> None:
        if not self.encrypted and connection_args.get("require_encryption"):
            raise RuntimeError("encryption required by Dask configuration, "
                               f"refusing communication from/to {self.prefix + address!r}")

    def _ssl(self, connection_args: dict[str, Any]) -> ssl.SSLContext | None:
        return _tls_context(connection_args) if self.encrypted else None

    def _comm(self, conn: aio.AsyncConnection, deserialize: bool, max_size: int | None) -> FastnetComm:
        """A comm over conn with its two ends' addresses as URIs (OSError once the socket is gone)."""
        sock = conn.get_extra_info("socket")
        if conn.closed or sock is None:
            raise CommClosedError("the connection closed before it could be used")
        local = self.prefix + unparse_host_port(*sock.getsockname()[:2])
        peer = self.prefix + unparse_host_port(*sock.getpeername()[:2])
        return self.comm_class(conn, local, peer, deserialize, max_size)


class FastnetConnector(_Scheme, Connector):
    """Connects to a ``fastnet://`` address."""

    async def connect(self, address: str, deserialize: bool = True, **connection_args: Any) -> FastnetComm:
        self._check_encryption(address, connection_args)
        host, port = parse_host_port(address)
        ctx = self._ssl(connection_args)
        max_size = _max_message_size(connection_args)
        try:
            conn = await aio.connect((host, port), ssl_context=ctx, max_message_size=max_size,
                                     server_hostname=connection_args.get("server_hostname"))
        except AuthenticationError as exc:
            # the TLS handshake failed: a certificate problem will not go away by retrying
            cause = exc.__cause__
            if isinstance(cause, ssl.SSLCertVerificationError) or (
                    isinstance(cause, ssl.SSLError) and "UNKNOWN_CA" in str(cause.reason)):
                raise FatalCommClosedError(f"TLS certificate rejected connecting to {self.prefix}{address}: "
                                           f"{cause}") from exc
            raise CommClosedError(f"connecting to {self.prefix}{address}: {exc}") from exc
        try:
            return self._comm(conn, deserialize, max_size)
        except BaseException:
            conn.abort()
            raise


class FastnetTLSConnector(FastnetConnector):
    """Connects to a ``fastnet-tls://`` address."""

    prefix = "fastnet-tls://"
    encrypted = True
    comm_class = FastnetTLSComm


class FastnetListener(_Scheme, BaseListener):
    """Listens on a ``fastnet://`` address; each connection passes Dask's handshake before the handler."""

    def __init__(self, address: str, comm_handler: Any, deserialize: bool = True, allow_offload: bool = True,
                 default_host: str | None = None, default_port: int = 0, **connection_args: Any) -> None:
        super().__init__()
        self._check_encryption(address, connection_args)
        self.ip, self.port = parse_host_port(address, default_port)
        self.default_host = default_host
        self.comm_handler = comm_handler
        self.deserialize = deserialize
        self.allow_offload = allow_offload
        self._ssl_context = self._ssl(connection_args)
        self._max_size = _max_message_size(connection_args)
        self._server: aio.Server | None = None
        self._bound: tuple[str, int] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        backlog = int(dask.config.get("distributed.comm.socket-backlog"))
        hs_timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="seconds")
        # a wildcard host binds IPv4's, as distributed's TCP listener prefers
        host = self.ip or "0.0.0.0"
        self._server = await aio.serve((host, self.port), self._accepted, ssl_context=self._ssl_context,
                                       max_message_size=self._max_size, backlog=backlog,
                                       handshake_timeout=hs_timeout, max_connections=1 << 16,
                                       close_on_return=False)
        self._bound = self._server.address[:2]

    def stop(self) -> None:
        """Stop accepting (takes effect at once); established comms stay open."""
        server, self._server = self._server, None
        if server is not None:
            server.close()

    async def _accepted(self, conn: aio.AsyncConnection) -> None:
        # the comm outlives the accept: its handshake and handler run in a task of their own
        if self._server is None:
            conn.abort()
            return
        try:
            comm = self._comm(conn, self.deserialize, self._max_size)
        except OSError:
            conn.abort()
            return
        comm.allow_offload = self.allow_offload
        task = asyncio.get_running_loop().create_task(self._handshake_then_handle(comm))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handshake_then_handle(self, comm: FastnetComm) -> None:
        timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="seconds")
        try:
            # a silent or garbage-speaking peer never reaches the handler
            await asyncio.wait_for(self.on_connection(comm), timeout)
        except (asyncio.TimeoutError, Exception) as exc:
            logger.info("connection from %s closed before the handshake completed: %s: %s",
                        comm.peer_address, type(exc).__name__, exc)
            comm.abort()
            return
        await self.comm_handler(comm)

    def get_host_port(self) -> tuple[str, int]:
        """The bound address as (host, port)."""
        if self._bound is None:
            raise ValueError("invalid operation on a listener that was not started")
        return self._bound

    @property
    def listen_address(self) -> str:
        return self.prefix + unparse_host_port(*self.get_host_port())

    @property
    def contact_address(self) -> str:
        host, port = self.get_host_port()
        return self.prefix + unparse_host_port(ensure_concrete_host(host, default_host=self.default_host), port)


class FastnetTLSListener(FastnetListener):
    """Listens on a ``fastnet-tls://`` address."""

    prefix = "fastnet-tls://"
    encrypted = True
    comm_class = FastnetTLSComm


class FastnetBackend(Backend):
    """The ``fastnet://`` scheme: host:port addresses, as distributed's ``tcp://``."""

    _connector_class: type[FastnetConnector] = FastnetConnector
    _listener_class: type[FastnetListener] = FastnetListener

    def get_connector(self) -> FastnetConnector:
        return self._connector_class()

    def get_listener(self, loc: str, handle_comm: Any, deserialize: bool, **connection_args: Any) -> FastnetListener:
        return self._listener_class(loc, handle_comm, deserialize, **connection_args)

    def get_address_host(self, loc: str) -> str:
        return parse_host_port(loc)[0]

    def get_address_host_port(self, loc: str) -> tuple[str, int]:
        return parse_host_port(loc)

    def resolve_address(self, loc: str) -> str:
        host, port = parse_host_port(loc)
        return unparse_host_port(ensure_ip(host), port)

    def get_local_address_for(self, loc: str) -> str:
        host, port = parse_host_port(loc)
        return unparse_host_port(get_ip(ensure_ip(host)), None)


class FastnetTLSBackend(FastnetBackend):
    """The ``fastnet-tls://`` scheme: ``fastnet://`` over TLS (``ssl_context`` from Dask's Security)."""

    _connector_class = FastnetTLSConnector
    _listener_class = FastnetTLSListener
