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

Same host
---------
Processes on one host (a ``LocalCluster``, the many workers of one big
node) skip the TCP stack: each listener also listens on a Linux
abstract-namespace ``AF_UNIX`` socket named after its TCP address, and a
connector whose target has such a name in its network namespace connects
there instead. Abstract names belong to a network namespace, so a name is
found only where the TCP address is this host's; anything else, and any
failure on the way, goes over TCP as before. Addresses stay
``fastnet://host:port`` URIs (the connector's own end, which has no TCP
port on this path, reads ``host:0``), TLS, Dask's handshake,
``max_message_size`` and every comm semantic are those of TCP. The Dask
config key ``distributed.comm.fastnet.same-host`` (:data:`SAME_HOST_CONFIG`)
turns the path off.

Shared memory
-------------
On a plain (not TLS) same-host comm a large frame does not cross the socket
at all. The sender copies each frame of at least
:data:`SHARED_MEMORY_THRESHOLD` bytes (a frame with the shards cut from the
same buffer counts as one) into a ``memfd`` segment of :mod:`fastnet.shm`'s
pool, once, and passes the segment's descriptor with the message's first
byte (SCM_RIGHTS, at most 253 segments a message; further frames go in the
stream); the prelude marks those frames, which have no bytes in the stream.
The receiver takes the descriptors in arrival order, accepts each only if it
is a memfd sealed against shrinking, as large as its frames, and the message
within ``max_message_size`` (else the comm closes with an error saying
which, and only that comm), maps it, and hands Dask writeable views of the
mapping: numpy arrays are deserialized over the shared memory with no
further copy, and the shards of one array are merged without one. The
mapping lives as long as the objects viewing it, each run of frames in a
mapping of its own; the sender's pool reuses a segment only after the
receiver's last mapping of it is gone (:mod:`fastnet.shm`'s ownership
protocol), and nothing outlives the two processes, whichever is killed.
Copies of more than distributed's offload threshold run on its offload
thread. A mapping holds no descriptor, so a worker may keep any number of
received chunks. ``distributed.comm.fastnet.shared-memory``
(:data:`SHARED_MEMORY_CONFIG`) set false makes a process send every frame
through the socket; a comm receives segments whatever its own setting.
TLS comms never pass segments: the bytes would bypass the encryption, so
every byte stays in the TLS stream, on the socket path.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
import struct
import sys
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
from distributed.utils import ensure_ip, get_ip, nbytes, offload

from fastnet import aio, shm
from fastnet.errors import AuthenticationError

__all__ = ["FastnetBackend", "FastnetTLSBackend", "FastnetComm", "FastnetTLSComm",
           "FastnetConnector", "FastnetTLSConnector", "FastnetListener", "FastnetTLSListener",
           "DEFAULT_MAX_MESSAGE_SIZE", "SAME_HOST_CONFIG", "same_host_enabled", "same_host_name",
           "SHARED_MEMORY_CONFIG", "SHARED_MEMORY_THRESHOLD", "shared_memory_enabled"]

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
# with _JOINED set when the frame continues the previous frame's buffer, and
# _SEGMENT when the frame (with the _JOINED ones after it) is in the next
# shared-memory segment the message carries instead of in the stream.
_U64 = struct.Struct("<Q")
_PRELUDE_ONE = struct.Struct("<QQ")
_JOINED = 1 << 63
_SEGMENT = 1 << 62
_SIZE_MASK = _SEGMENT - 1

#: The Dask config key that turns the same-host path on (the default) or off.
SAME_HOST_CONFIG = "distributed.comm.fastnet.same-host"
_UCRED = struct.Struct("3i")
_MAX_HOST = 64            # the longest IP literal a same-host preamble may carry
#: The Dask config key that lets a plain same-host comm send large frames
#: through shared memory (the default) or not.
SHARED_MEMORY_CONFIG = "distributed.comm.fastnet.shared-memory"
#: Own-buffer frames (a frame with its shards) of at least this many bytes go
#: through shared memory on a plain same-host comm (at 1 MiB a message already
#: crosses about 1.1x as fast as through the socket, at 16 MiB 2x).
SHARED_MEMORY_THRESHOLD = shm.THRESHOLD
# The most segments one message carries (one sendmsg's descriptors); further frames go in the stream.
_MAX_SEGMENTS = 253
# The most received descriptors a comm queues: the prelude of a message with segments
# is received right after them, and the most one message claims is _MAX_SEGMENTS.
_MAX_QUEUED_FDS = 4 * _MAX_SEGMENTS


def _config_flag(key: str) -> bool:
    value = dask.config.get(key, True)
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


def same_host_enabled() -> bool:
    """Whether comms between two processes of one host go over AF_UNIX (Dask config, default True)."""
    if not sys.platform.startswith("linux"):
        return False       # abstract AF_UNIX names are Linux's
    return _config_flag(SAME_HOST_CONFIG)


def shared_memory_enabled() -> bool:
    """Whether plain same-host comms send large frames as shared-memory segments (Dask config, default True)."""
    return shm.available() and _config_flag(SHARED_MEMORY_CONFIG)


def same_host_name(prefix: str, host: str, port: int) -> str:
    """The abstract AF_UNIX name of the listener on ``host:port`` for scheme ``prefix``."""
    return f"\0fastnet.dask {prefix[:-3]} {unparse_host_port(host, port)}"


def _is_local_ip(ip: str) -> bool:
    """True when a packet to ``ip`` would stay on this host (its route's source is ``ip`` itself)."""
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.connect((ip, 9))          # a route lookup; nothing is sent
            return bool(s.getsockname()[0] == ip)
    except OSError:
        return False


def _same_host_candidates(prefix: str, host: str, port: int) -> list[str]:
    """The abstract names that may serve ``host:port`` on this host, most specific first.

    A listener bound to the wildcard address serves every local address,
    so its name is tried only when ``host`` is one of this host's.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return []           # a host name: TCP resolves it
    names = [same_host_name(prefix, str(ip), port)]
    if not ip.is_unspecified and _is_local_ip(str(ip)):
        if ip.version == 4:
            names.append(same_host_name(prefix, "0.0.0.0", port))
        names.append(same_host_name(prefix, "::", port))
    return names


def _prelude(frames: list[Any], segments: bool = False) -> tuple[bytes, int, list[tuple[int, int]]]:
    """The prelude frame of a message, the message's size in bytes, and the runs of frames to send in segments.

    A run (start, end) is a frame and the shards joined to it; with
    ``segments``, each run of at least SHARED_MEMORY_THRESHOLD bytes is one.
    """
    if len(frames) == 1:
        # most messages are one small frame (the scheduler's and workers' control traffic)
        n = nbytes(frames[0])
        if not segments or n < SHARED_MEMORY_THRESHOLD:
            return _PRELUDE_ONE.pack(1, n), n, []
    words: list[int] = []
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
    runs: list[tuple[int, int]] = []
    if segments:
        i = 0
        while i < len(words) and len(runs) < _MAX_SEGMENTS:
            j = _run_end(words, i)
            if sum(w & _SIZE_MASK for w in words[i:j]) >= SHARED_MEMORY_THRESHOLD:
                words[i] |= _SEGMENT
                runs.append((i, j))
            i = j
    return struct.pack(f"<{len(words) + 1}Q", len(words), *words), total, runs


def _run_end(words: list[int], i: int) -> int:
    """Where the run of frames starting at ``words[i]`` ends: past the shards joined to it."""
    j = i + 1
    while j < len(words) and words[j] & _JOINED:
        j += 1
    return j


def _pack(frames: list[Any], runs: list[tuple[int, int]]) -> list[Any]:
    """One pool segment per run, holding its frames' bytes one after another."""
    segs: list[Any] = []
    try:
        for i, j in runs:
            segs.append(shm.pack(frames[i:j]))
    except BaseException:
        for seg in segs:
            shm.pool.release(seg)
        raise
    return segs


def _parse_prelude(prelude: bytes, limit: int | None) -> list[int]:
    """The frame size words of a prelude, checked before anything is allocated for them."""
    if len(prelude) < 8 or len(prelude) % 8:
        raise CommClosedError(f"bad message prelude of {len(prelude)} bytes")
    if len(prelude) == 16:
        # one frame (the common case); anything odd about it takes the checks below
        count, w = _PRELUDE_ONE.unpack(prelude)
        if count == 1 and not w & _JOINED and (limit is None or w & _SIZE_MASK <= limit):
            return [w]
    (count,) = _U64.unpack_from(prelude)
    if count != len(prelude) // 8 - 1:
        raise CommClosedError(f"message prelude says {count} frames and holds {len(prelude) // 8 - 1}")
    words = list(struct.unpack_from(f"<{count}Q", prelude, 8))
    if any(w & _JOINED and w & _SEGMENT for w in words):
        raise CommClosedError("bad message prelude: a joined frame cannot start a run")
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
        self._segments_in = False     # the connection takes descriptors: segments may arrive
        self._segments_out = False    # large frames leave as segments
        self._extra: dict[str, Any] = {}
        self._read_extra(conn)
        # a comm dropped without close() must not leave its socket open
        self._finalizer = weakref.finalize(self, _close_dangling, conn, repr(self))
        self._finalizer.atexit = False

    def _read_extra(self, conn: aio.AsyncConnection) -> None:
        pass

    def _use_segments(self, send: bool) -> None:
        """Take the peer's shared-memory segments, and send large frames as segments if ``send``."""
        assert self._conn is not None
        self._conn.accept_fds(_MAX_QUEUED_FDS)
        self._segments_in = True
        self._segments_out = send

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
        with _AbortOnError(self):
            try:
                words = _parse_prelude(await conn.recv_bytes(8 * (MAX_FRAMES + 1)), self._max_size)
                n = words[0] if len(words) == 1 else OWN_BUFFER_THRESHOLD
                if n < OWN_BUFFER_THRESHOLD:
                    # one small frame in the stream (flags would make n larger)
                    frames = [_whole(await conn.recv_bytes(n), n)]
                else:
                    frames = await self._read_frames(conn, words)
            finally:
                self._reading = False
        try:
            return await from_frames(frames, deserialize=self.deserialize, deserializers=deserializers,
                                     allow_offload=self.allow_offload)
        except EOFError:
            # frames garbled or truncated by the peer
            self.abort()
            raise CommClosedError(f"in {self}: aborted stream on truncated data") from None

    async def _read_frames(self, conn: aio.AsyncConnection, words: list[int]) -> list[Any]:
        """The frames of a message whose prelude gave ``words``: from the stream, or mapped from its segments."""
        fds: list[int] = []
        try:
            nseg = sum(1 for w in words if w & _SEGMENT)
            if nseg:
                if not self._segments_in:
                    raise CommClosedError(f"a message with {nseg} shared-memory segments on a comm that takes none")
                # they came with (or before) the prelude: the sender passed them on its first byte
                fds = conn.take_fds(nseg)
            frames: list[Any] = []
            i, count = 0, len(words)
            while i < count:
                n = words[i] & _SIZE_MASK
                if words[i] & _SEGMENT:
                    j = _run_end(words, i)
                    sizes = [w & _SIZE_MASK for w in words[i:j]]
                    fd = fds.pop(0)
                    try:
                        view = memoryview(shm.map_segment(fd, sum(sizes)))
                    except OSError as exc:
                        raise CommClosedError(f"in {self}: {exc}") from None
                    finally:
                        os.close(fd)
                    off = 0
                    for n in sizes:
                        frames.append(view[off:off + n])
                        off += n
                    i = j
                    continue
                if n < OWN_BUFFER_THRESHOLD:
                    frames.append(_whole(await conn.recv_bytes(n), n))
                    i += 1
                    continue
                # a run of shards of one buffer: one host array, each shard received in place
                j = _run_end(words, i)
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
            return frames
        finally:
            # a peer's descriptors not yet mapped when it failed
            _close_all(fds)

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
        prelude, total, runs = _prelude(frames, self._segments_out)
        segs = await self._pack(frames, runs) if runs else []
        fds: list[int] = []
        # what already left is unknown if this fails: the comm cannot be used again
        with _AbortOnError(self):
            try:
                if segs:
                    in_segments = {k for i, j in runs for k in range(i, j)}
                    frames = [f for k, f in enumerate(frames) if k not in in_segments]
                    for seg in segs:
                        fds.append(seg.handover())
                # queued by reference as distributed's TCP comm does: the frames are
                # this message's own, and a writer waiting for its reader to drain
                # the socket would deadlock a task that writes then reads; the
                # descriptors (or the connection's copies) leave with the prelude's first byte
                conn.write_many([prelude, *frames], fds=fds)
            finally:
                _close_all(fds)
                for seg in segs:
                    shm.pool.release(seg)
        return total + len(prelude)

    async def _pack(self, frames: list[Any], runs: list[tuple[int, int]]) -> list[Any]:
        """The runs of frames copied into shared-memory segments (the comm aborts if that fails)."""
        with _AbortOnError(self, "shared memory: "):
            if not self.allow_offload or sum(nbytes(frames[k]) for i, j in runs
                                             for k in range(i, j)) <= OFFLOAD_THRESHOLD:
                # a short copy costs less than a handoff to a thread
                return _pack(frames, runs)
            # a long one goes to a thread, as distributed's serialization does (the
            # copy releases the GIL): the loop runs on meanwhile
            task = asyncio.ensure_future(offload(_pack, frames, runs))
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                # the copy finishes on its thread: its segments go back to the pool then
                task.add_done_callback(_release_packed)
                raise

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


class _AbortOnError:
    """Abort ``comm`` on any error or cancellation inside the block.

    Half a message read or written leaves the stream out of step, so the
    comm cannot go on. An OSError or EOFError leaves as CommClosedError.
    """

    __slots__ = ("comm", "what")

    def __init__(self, comm: FastnetComm, what: str = "") -> None:
        self.comm = comm
        self.what = what

    def __enter__(self) -> None:
        pass

    def __exit__(self, typ: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            return
        self.comm.abort()
        if isinstance(exc, (EOFError, OSError)) and not isinstance(exc, CommClosedError):
            # a clean close, a reset, a bad frame, a frame over the limit
            raise CommClosedError(f"in {self.comm}: {self.what}{type(exc).__name__}: {exc}") from exc


def _whole(frame: bytes, n: int) -> bytes:
    """``frame``, if it is the ``n`` bytes the prelude said."""
    if len(frame) != n:
        raise CommClosedError(f"frame of {len(frame)} bytes, prelude said {n}")
    return frame


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()


def _release_packed(task: asyncio.Future[list[Any]]) -> None:
    if not task.cancelled() and task.exception() is None:
        for seg in task.result():
            shm.pool.release(seg)


def _close_dangling(conn: aio.AsyncConnection, r: str) -> None:
    if not conn.closed:
        logger.warning("closing dangling comm %s", r)
        try:
            conn.abort()
        except RuntimeError:      # its loop is gone: release the socket alone
            sock = conn.get_extra_info("socket")
            # a TLS connection's transport hands out asyncio's TransportSocket, which
            # cannot close: the socket is the one it wraps
            sock = getattr(sock, "_sock", sock)
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

    def _comm(self, conn: aio.AsyncConnection, deserialize: bool, max_size: int | None,
              ends: tuple[str, str] | None = None) -> FastnetComm:
        """A comm over conn with its two ends' addresses as URIs (OSError once the socket is gone).

        ``ends`` gives (local, peer) as host:port where the socket has no IP
        address of its own (the same-host path).
        """
        sock = conn.get_extra_info("socket")
        if conn.closed or sock is None:
            raise CommClosedError("the connection closed before it could be used")
        if ends is None:
            ends = unparse_host_port(*sock.getsockname()[:2]), unparse_host_port(*sock.getpeername()[:2])
        comm = self.comm_class(conn, self.prefix + ends[0], self.prefix + ends[1], deserialize, max_size)
        if sock.family == socket.AF_UNIX and not self.encrypted:
            # TLS keeps every byte inside the encryption: segments are for plain comms
            comm._use_segments(shared_memory_enabled())
        return comm


class FastnetConnector(_Scheme, Connector):
    """Connects to a ``fastnet://`` address."""

    async def connect(self, address: str, deserialize: bool = True, **connection_args: Any) -> FastnetComm:
        self._check_encryption(address, connection_args)
        host, port = parse_host_port(address)
        ctx = self._ssl(connection_args)
        max_size = _max_message_size(connection_args)
        # a TLS context that checks host names cannot check one over AF_UNIX: TCP
        if same_host_enabled() and (ctx is None or not ctx.check_hostname):
            comm = await self._connect_same_host(host, port, ctx, max_size, deserialize, connection_args)
            if comm is not None:
                return comm
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

    async def _connect_same_host(self, host: str, port: int, ctx: ssl.SSLContext | None, max_size: int | None,
                                 deserialize: bool, connection_args: dict[str, Any]) -> FastnetComm | None:
        """A comm over the listener's AF_UNIX name when it is on this host; None to go over TCP."""
        for name in _same_host_candidates(self.prefix, host, port):
            try:
                conn = await aio.connect(name, ssl_context=ctx, max_message_size=max_size,
                                         server_hostname=connection_args.get("server_hostname") or host)
            except Exception as exc:     # no such name (the usual case), or it failed: the next, then TCP
                logger.debug("same-host connect to %r: %s: %s", name[1:], type(exc).__name__, exc)
                continue
            try:
                # anyone on the host can bind an abstract name: only a listener of our
                # own user (or root) stands in for the one that owns the TCP port
                sock = conn.get_extra_info("socket")
                uid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1]
                if uid not in (os.getuid(), 0):
                    logger.warning("%r is held by uid %d: connecting over TCP", name[1:], uid)
                    conn.abort()
                    continue
                # the listener learns which of its addresses the connector meant
                conn.write_many([host.encode()])
                ends = unparse_host_port(host, 0), unparse_host_port(host, port)
                return self._comm(conn, deserialize, max_size, ends)
            except Exception as exc:
                conn.abort()
                logger.debug("same-host comm over %r failed: %s: %s", name[1:], type(exc).__name__, exc)
            except BaseException:
                conn.abort()
                raise
        return None


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
        self._local_server: aio.Server | None = None
        self._bound: tuple[str, int] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        backlog = int(dask.config.get("distributed.comm.socket-backlog"))
        hs_timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="seconds")
        # a wildcard host binds IPv4's, as distributed's TCP listener prefers
        host = self.ip or "0.0.0.0"
        kw: dict[str, Any] = dict(ssl_context=self._ssl_context, max_message_size=self._max_size, backlog=backlog,
                                  handshake_timeout=hs_timeout, max_connections=1 << 16, close_on_return=False)
        self._server = await aio.serve((host, self.port), self._accepted, **kw)
        self._bound = self._server.address[:2]
        if same_host_enabled():
            # bound after the TCP port: the port is ours, so is the name derived from it
            name = same_host_name(self.prefix, *self._bound)
            try:
                self._local_server = await aio.serve(name, self._accepted_same_host, **kw)
            except OSError as exc:
                logger.warning("no same-host path for %s (%r: %s): its comms go over TCP",
                               self.listen_address, name[1:], exc)

    def stop(self) -> None:
        """Stop accepting (takes effect at once); established comms stay open."""
        for server in (self._server, self._local_server):
            if server is not None:
                server.close()
        self._server = self._local_server = None

    async def _accepted(self, conn: aio.AsyncConnection) -> None:
        # the comm outlives the accept: its handshake and handler run in a task of their own
        self._handle(conn, None)

    async def _accepted_same_host(self, conn: aio.AsyncConnection) -> None:
        self._handle(conn, self._bound)

    def _handle(self, conn: aio.AsyncConnection, same_host: tuple[str, int] | None) -> None:
        if self._server is None:
            conn.abort()
            return
        task = asyncio.get_running_loop().create_task(self._handshake_then_handle(conn, same_host))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _same_host_ends(self, conn: aio.AsyncConnection, bound: tuple[str, int]) -> tuple[str, str]:
        """(local, peer) of a same-host comm, from the IP its connector meant (its first frame)."""
        if not self.encrypted:
            # before anything is read: no descriptor the connector sends is dropped
            conn.accept_fds(_MAX_QUEUED_FDS)
        raw = await conn.recv_bytes(_MAX_HOST)
        try:
            ip = ipaddress.ip_address(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise CommClosedError(f"bad same-host preamble {raw[:_MAX_HOST]!r}") from None
        if not ipaddress.ip_address(bound[0]).is_unspecified and ip != ipaddress.ip_address(bound[0]):
            raise CommClosedError(f"same-host connector meant {ip}, this listener is on {bound[0]}")
        return unparse_host_port(str(ip), bound[1]), unparse_host_port(str(ip), 0)

    async def _handshake_then_handle(self, conn: aio.AsyncConnection, same_host: tuple[str, int] | None) -> None:
        timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="seconds")

        async def handshake() -> FastnetComm:
            ends = None if same_host is None else await self._same_host_ends(conn, same_host)
            comm = self._comm(conn, self.deserialize, self._max_size, ends)
            comm.allow_offload = self.allow_offload
            try:
                await self.on_connection(comm)
            except BaseException:
                comm.abort()
                raise
            return comm

        try:
            # a silent or garbage-speaking peer never reaches the handler
            comm = await asyncio.wait_for(handshake(), timeout)
        except (asyncio.TimeoutError, Exception) as exc:
            logger.info("connection from %s closed before the handshake completed: %s: %s",
                        "this host" if same_host else conn.get_extra_info("peername"), type(exc).__name__, exc)
            conn.abort()
            return
        except BaseException:
            conn.abort()
            raise
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
