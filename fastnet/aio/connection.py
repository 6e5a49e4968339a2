"""AsyncConnection: fastnet's message connection on the running asyncio loop.

A plain socket is driven straight from the loop's ``add_reader``/``add_writer``
with the framing kernel: a read takes as much as the socket has into the
decoder (many frames per read), a large frame is read straight into its final
object (``recv_bytes``) or the caller's buffer (``recv_bytes_into``,
``recv_array``), and a send tries the syscall at once and queues only what
the socket did not take (``send_many`` is one ``sendmsg``). TLS runs on the
loop's own TLS transport with an ``asyncio.BufferedProtocol`` that fills the
same decoder.

Cancellation and timeouts (``asyncio.timeout``, ``wait_for``) leave the
connection usable: a receive keeps whatever it read of a frame in the
connection, whole, for the next receive (a frame half received into a
caller's buffer is moved into the connection's own memory); a send that was
cancelled after its frame started to leave finishes sending it from a copy.
Errors from the peer (a bad frame, a frame over ``max_message_size``, a reset)
close the connection; a clean close by the peer is EOFError, as in
multiprocessing.
"""
from __future__ import annotations

import asyncio
import collections
import os
import socket
from collections.abc import AsyncIterator, Iterable
from multiprocessing.reduction import ForkingPickler
from pickle import PickleBuffer
from typing import TYPE_CHECKING, Any, SupportsInt

from fastnet import _scm
from fastnet import zerocopy as _zc
from fastnet._kernels import framing as _framing
from fastnet.connection import _send_size
from fastnet.defaults import MAX_MESSAGE_SIZE_CONNECTION
from fastnet.errors import BufferTooShort, ConnectionLost, MessageTooLarge, ProtocolError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["AsyncConnection", "DEFAULT_HIGH_WATER", "DEFAULT_LOW_WATER", "DEFAULT_MAX_QUEUED_FDS"]

#: A send waits (like ``StreamWriter.drain``) once this many bytes are queued
#: that the socket did not take...
DEFAULT_HIGH_WATER = 1 << 20
#: ...until no more than this many are left.
DEFAULT_LOW_WATER = 256 << 10
# Initial size of the receive buffer; it grows for a frame that needs more.
_BUFSIZE = 262144
# sendmsg() takes at most IOV_MAX (1024 on Linux) buffers.
_IOV_MAX = 1024
_COPY_THRESHOLD = _framing.COPY_THRESHOLD
# A readable event goes on reading a large frame after a short read, up to this much.
_READ_BURST = 8 << 20
# Small messages corked within one loop iteration go out at least this often.
_CORK_MAX = 65536
# With no receive waiting, a TLS connection stops reading above this much.
_TLS_READ_LIMIT = 4 << 20
#: Received descriptors a connection queues (see AsyncConnection.accept_fds) unless told otherwise.
DEFAULT_MAX_QUEUED_FDS = 1024

_dumps = ForkingPickler.dumps
_loads = ForkingPickler.loads
_encode_header = _framing.encode_header


def _byte_view(obj: Any) -> memoryview:
    """A flat unsigned-byte view of any C- or Fortran-contiguous buffer."""
    v = memoryview(obj)
    if v.ndim == 1 and v.format == "B" and v.c_contiguous:
        return v
    return PickleBuffer(obj).raw()


def _frame_parts(payload: memoryview, parts: list[Any]) -> bool:
    """Append a frame's pieces to parts; True if the payload is referenced, not copied.

    Below the copy threshold header and payload become one bytes object;
    above it they go as two buffers of one vectored write, never joined.
    """
    n = len(payload)
    if n < _COPY_THRESHOLD:
        parts.append(_encode_header(n) + payload)
        return False
    parts.append(_encode_header(n))
    parts.append(payload)
    return True


class AsyncConnection:
    """A framed message connection for asyncio (see :func:`fastnet.aio.connect`).

    The verbs of :class:`fastnet.Connection`, awaited. One coroutine receives
    at a time; any number may send. Usable as ``async with`` (closes on
    exit) and ``async for obj in conn`` (``recv()`` until the peer closes).
    Over plain AF_UNIX, messages may carry descriptors (``fds=`` of
    :meth:`send_many`, :meth:`accept_fds`, :meth:`take_fds`).
    """

    _fd_passing = True

    def __init__(self, sock: socket.socket | None, *, max_message_size: int | None = MAX_MESSAGE_SIZE_CONNECTION,
                 high_water: int = DEFAULT_HIGH_WATER, low_water: int = DEFAULT_LOW_WATER) -> None:
        if not 0 <= low_water <= high_water:
            raise ValueError("need 0 <= low_water <= high_water")
        self._loop = asyncio.get_running_loop()
        self._decoder = _framing.FrameDecoder(max_message_size, _BUFSIZE)
        self._max_size = max_message_size
        self._sock = sock
        self._fd = -1 if sock is None else sock.fileno()
        self.high_water = high_water
        self.low_water = low_water
        # receive side
        self._reading = False            # the reader is registered with the loop
        self._waiter: asyncio.Future[None] | None = None
        self._into: tuple[Any, int] | None = None   # the caller's buffer of recv_bytes_into
        self._limit: int | None = None   # maxlength of the waiting recv_bytes
        self._eof = False
        # send side: what the socket did not take, and stream offsets
        self._wq: collections.deque[Any] = collections.deque()
        self._queued = 0                 # bytes handed to the connection so far
        self._sent = 0                   # bytes the socket took so far
        self._writing = False
        # small messages sent after the first in one loop iteration, sent together at its end
        self._cork: list[bytes] = []
        self._cork_size = 0
        self._tick = False               # a message went out in this loop iteration
        self._send_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._error: BaseException | None = None    # why the connection failed
        self._closing = False
        self._closed = self._loop.create_future()
        # descriptor passing (AF_UNIX): received ones not yet taken, in arrival order (None: not
        # accepted), and the stream offsets queued ones must leave at, with our copies of them
        self._fdq: collections.deque[int] | None = None
        self._max_fds = 0
        self._wfds: collections.deque[tuple[int, list[int]]] = collections.deque()

    def __repr__(self) -> str:
        state = "closed" if self._closing else "open"
        return f"<fastnet.aio.AsyncConnection fd={self._fd} {state}>"

    # -- state ---------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called or the connection failed."""
        return self._closing

    @property
    def max_message_size(self) -> int | None:
        """The largest message received, None for no limit."""
        return self._max_size

    def fileno(self) -> int:
        """The socket's descriptor."""
        return self._fd

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``peername``, ``sockname``, ``socket``; with TLS also ``peercert``, ``cipher``, ``ssl_object``."""
        sock = self._sock
        if sock is None:
            return default
        if name == "socket":
            return sock
        try:
            if name == "peername":
                return sock.getpeername()
            if name == "sockname":
                return sock.getsockname()
        except OSError:
            return default
        return default

    @property
    def write_buffer_size(self) -> int:
        """Bytes queued for the peer that the socket has not taken yet."""
        return self._queued - self._sent + self._cork_size

    def _check(self) -> None:
        if self._closing:
            if self._error is not None:
                raise ConnectionLost(f"connection failed: {self._error}") from self._error
            raise OSError("handle is closed")

    # -- receiving -----------------------------------------------------------

    def _fill(self, limit: int | None, into: tuple[Any, int] | None) -> bool:
        """Read what the socket has into the decoder; True when the receive can go on.

        BlockingIOError when the socket had nothing. Until a frame is whole
        the one in progress is steered as it arrives (see _steer). A short
        read ends it, except in a large frame: the sender is most likely
        refilling the socket, so reading on until EAGAIN (up to _READ_BURST)
        saves loop wake-ups, each of which costs both ends a trip through
        their loops.
        """
        d = self._decoder
        recv_into = self._sock.recv_into if self._fdq is None else self._recv_fds_into  # type: ignore[union-attr]
        got = 0
        while True:
            region = d.get_buffer()
            n = recv_into(region)
            if not n:
                self._eof = True
                return True
            d.buffer_updated(n)
            if d.has_frame():
                return True
            self._steer(limit, into)
            got += n
            if n < len(region) and (got >= _READ_BURST or d.needed < _COPY_THRESHOLD):
                return False

    def _recv_fds_into(self, region: memoryview) -> int:
        """recv_into that queues the SCM_RIGHTS descriptors arriving with the bytes."""
        n, anc, flags, _ = self._sock.recvmsg_into([region], _scm.CTRL_SPACE, _scm.CLOEXEC)  # type: ignore[union-attr]
        fds = _scm.scm_fds(anc) if anc else []
        q = self._fdq
        assert q is not None
        if flags & _scm.CTRUNC or len(q) + len(fds) > self._max_fds:
            for f in fds:
                os.close(f)
            if flags & _scm.CTRUNC:
                raise ProtocolError(f"control message truncated: the {len(fds)} descriptors that arrived were closed")
            raise ProtocolError(f"{len(q) + len(fds)} received descriptors would be queued, "
                                f"at most {self._max_fds} may be; closed the {len(fds)} that arrived")
        q.extend(fds)
        return n

    def accept_fds(self, max_queued: int = DEFAULT_MAX_QUEUED_FDS) -> None:
        """Receive descriptors the peer passes (``fds=`` of its sends) from now on; AF_UNIX only.

        They queue in arrival order for :meth:`take_fds`, close-on-exec: a
        descriptor is here once a message sent with it, or any later one,
        has been received. More than ``max_queued`` waiting, or a truncated
        control message, is a ProtocolError that closes the connection
        (closing the descriptors). Without this call the kernel drops any
        descriptor sent. Descriptors still queued are closed with the connection.
        """
        self._check_fd_passing()
        self._check()
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        self._max_fds = max_queued
        if self._fdq is None:
            self._fdq = collections.deque()

    def _check_fd_passing(self) -> None:
        if not self._fd_passing or self._sock is None or self._sock.family != socket.AF_UNIX:
            raise ValueError("descriptors can only be passed over plain AF_UNIX connections")

    @property
    def pending_fds(self) -> int:
        """Received descriptors not yet taken."""
        return 0 if self._fdq is None else len(self._fdq)

    def take_fds(self, n: int) -> list[int]:
        """The ``n`` oldest received descriptors not yet taken; the caller owns (and closes) them.

        Fewer than ``n`` here means the peer did not send what its messages
        said: ProtocolError, and the connection closes.
        """
        if self._closing:
            self._check()
        q = self._fdq
        if q is None:
            raise ValueError("accept_fds() was not called")
        if len(q) < n:
            exc = ProtocolError(f"{n} descriptors expected, {len(q)} arrived")
            self._abort(exc)
            raise exc
        return [q.popleft() for _ in range(n)]

    def _close_fds(self) -> None:
        wfds, self._wfds = self._wfds, collections.deque()
        q, self._fdq = self._fdq, None
        for _, fds in wfds:
            for f in fds:
                os.close(f)
        if q:
            for f in q:
                os.close(f)

    def _steer(self, limit: int | None, into: tuple[Any, int] | None) -> None:
        """Steer the frame in progress as soon as its header is here, before its payload is read.

        Into the caller's buffer (``into``, recv_bytes_into), or checked
        against ``limit`` (recv_bytes' maxlength).
        """
        if into is not None:
            self._decoder.next_frame_into(*into)
        elif limit is not None:
            self._decoder.next_frame(limit)

    def _on_readable(self) -> None:
        fut = self._waiter
        if fut is None or fut.done():
            # nobody receives: leave the data in the socket (backpressure)
            self._loop.remove_reader(self._fd)
            self._reading = False
            return
        try:
            if not self._fill(self._limit, self._into):
                return
        except (BlockingIOError, InterruptedError):
            return
        except Exception as exc:
            fut.set_exception(exc)
            return
        fut.set_result(None)

    def _arm(self, limit: int | None, into: tuple[Any, int] | None) -> asyncio.Future[None] | None:
        """Start waiting for more of the stream: None if the receive can go on now, else the future to await.

        The future resolves once the decoder holds a whole frame, the peer
        closed, or the read failed; the receive that awaits it clears the
        waiter, ``_limit`` and ``_into`` after (see _disarm).
        """
        if self._waiter is not None:
            raise RuntimeError("another coroutine is already receiving on this connection")
        if self._closing:
            self._check()
        if not self._tick:
            # try the socket first (streamed data often is there already); not
            # right after a send, whose answer cannot be here yet
            try:
                if self._fill(limit, into):
                    return None
            except (BlockingIOError, InterruptedError):
                pass
        elif self._cork:
            self._write([], 0, False)       # about to wait: what is corked goes now
        if not self._reading:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True
        # the receive yields to the loop: the next small send may go out at once
        self._tick = False
        self._limit = limit
        self._into = into
        fut = self._waiter = self._loop.create_future()
        return fut

    def _disarm(self) -> None:
        self._waiter = None
        self._into = None
        self._limit = None

    def _recv_failed(self, exc: BaseException) -> None:
        # a bad frame, a frame over the limit, a reset: the stream is
        # desynchronised or gone, and only this connection goes
        if isinstance(exc, OSError) and not self._closing:
            self._abort(exc)

    def _at_eof(self) -> None:
        self._decoder.eof()     # TruncatedFrameError when a frame was cut short
        raise EOFError("the peer closed the connection")

    async def _wait_data(self, limit: int | None, into: tuple[Any, int] | None) -> None:
        """Wait until more of the stream is here for a receive whose frame is not whole yet.

        EOFError (or TruncatedFrameError) once the peer has closed. A receive
        into a buffer that is cancelled takes the decoder off that buffer, so
        the message stays whole for the next receive.
        """
        if self._eof:
            self._at_eof()
        fut = self._arm(limit, into)
        if fut is not None:
            try:
                await fut
            except asyncio.CancelledError:
                if into is not None:
                    self._decoder.detach()
                raise
            finally:
                self._disarm()

    async def recv_bytes(self, maxlength: int | None = None) -> bytes:
        """Receive one message as bytes. EOFError when the peer has closed.

        A message longer than ``maxlength`` raises MessageTooLarge as soon
        as its header arrives, and closes the connection.
        """
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        if self._closing:
            self._check()
        d = self._decoder
        try:
            while True:
                f = d.next_frame(maxlength)
                if f is not None:
                    return f
                await self._wait_data(maxlength, None)
        except BaseException as exc:
            self._recv_failed(exc)
            raise

    async def recv(self) -> Any:
        """Receive and unpickle one object (as multiprocessing: this trusts the peer)."""
        return _loads(await self.recv_bytes())

    async def recv_many(self) -> list[bytes]:
        """Every message received so far as a list, waiting for at least one."""
        self._check()
        d = self._decoder
        try:
            while True:
                frames = d.frames()
                if frames:
                    return frames
                await self._wait_data(None, None)
        except BaseException as exc:
            self._recv_failed(exc)
            raise

    async def recv_bytes_into(self, buf: Buffer, offset: int = 0) -> int:
        """Receive one message into a writable buffer at byte ``offset``; return its size.

        The payload of a large message goes from the socket straight into
        ``buf``. A message that does not fit raises BufferTooShort carrying
        it whole. Cancelled half way, the message stays in the connection for
        the next receive (what was written into ``buf`` is not part of it).
        """
        if offset < 0:
            raise ValueError("negative offset")
        if offset > memoryview(buf).nbytes:
            raise ValueError("offset too large")
        self._check()
        return await self._recv_into(buf, offset)

    async def _recv_into(self, buf: Any, offset: int) -> int:
        d = self._decoder
        try:
            while True:
                n = d.next_frame_into(buf, offset)
                if n is not None:
                    return n
                await self._wait_data(None, (buf, offset))
        except BaseException as exc:
            self._recv_failed(exc)
            raise

    async def recv_array(self, out: Any = None) -> Any:
        """Receive an array sent with ``send_array`` (by any fastnet peer).

        With ``out``, the payload lands straight in that preallocated array
        after its shape and dtype are checked (a mismatch raises ValueError
        and leaves the connection usable). Without, a new array is allocated
        (numpy if installed, else a memoryview), bounded by max_message_size,
        and the payload is read straight into it.
        """
        header = await self.recv_bytes(_zc.MAX_HEADER)
        try:
            kind, tname, shape, order = _zc.decode_array_header(header)
            itemsize = _zc.itemsize_of(kind, tname)
            nbytes = _zc.nbytes_of(shape, itemsize)
        except ProtocolError as exc:
            self._abort(exc)
            raise
        np = _zc._np
        if out is not None:
            target, result = self._array_target(out, kind, tname, shape, order, nbytes)
            if target is None:
                await self.recv_bytes()          # the payload is not wanted: drop it
                raise result
        else:
            limit = self._max_size
            if limit is not None and nbytes > limit:
                too_large = MessageTooLarge(f"array of {nbytes} bytes exceeds max_message_size={limit}")
                self._abort(too_large)
                raise too_large
            if np is not None:
                result = np.empty(shape, _zc.dtype_of(kind, tname), order=order)
                target = _zc.byte_view(result)
            else:
                target = bytearray(nbytes)
                result = memoryview(target).cast("B").cast(tname, shape) if shape else memoryview(target)  # type: ignore[call-overload]
        try:
            n = await self._recv_into(target, 0)
        except BufferTooShort:
            exc2 = ProtocolError("array payload is larger than its header says")
            self._abort(exc2)
            raise exc2 from None
        if n != nbytes:
            exc3 = ProtocolError(f"array payload of {n} bytes, header said {nbytes}")
            self._abort(exc3)
            raise exc3
        if out is not None and target is not None and result is not out:
            out[...] = result         # a non-contiguous out: filled from the C/F-ordered copy
            return out
        return result

    @staticmethod
    def _array_target(out: Any, kind: int, tname: str, shape: tuple[int, ...], order: str,
                      nbytes: int) -> tuple[Any, Any]:
        """(buffer to receive into, array to return), or (None, the ValueError) on a mismatch."""
        np = _zc._np
        if np is not None and isinstance(out, np.ndarray):
            dt = _zc.dtype_of(kind, tname)
            if out.shape != tuple(shape) or out.dtype != dt:
                return None, ValueError(f"out is {out.dtype}{list(out.shape)}, message is {dt}{list(shape)}")
            if not out.flags.writeable:
                return None, ValueError("out is read-only")
            if out.flags.c_contiguous if order == "C" else out.flags.f_contiguous:
                return _zc.byte_view(out), out
            tmp = np.empty(shape, dt, order=order)
            return _zc.byte_view(tmp), tmp
        m = memoryview(out)
        if m.nbytes != nbytes or (kind == 1 and m.format != tname) or tuple(m.shape) != tuple(shape):  # type: ignore[arg-type]
            return None, ValueError(f"out does not match the message ({tname}{list(shape)})")
        return out, out

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            try:
                obj = await self.recv()
            except EOFError as exc:
                if isinstance(exc, ProtocolError):     # a truncated frame is an error
                    raise
                return
            yield obj

    # -- sending -------------------------------------------------------------

    def _write(self, parts: list[Any], total: int, held: bool, fds: list[int] | None = None) -> int:
        """Send parts now as far as the socket takes them and queue the rest.

        Returns the stream offset at the end of these bytes. Queued pieces
        the caller does not wait for (held=False) are copies, so its buffers
        are free once it returns. ``fds`` ride on the first byte (copies of
        them wait with it if it is queued).
        """
        if self._closing:
            self._check()
        if self._cork:
            parts = self._cork + parts
            total += self._cork_size
            self._cork = []
            self._cork_size = 0
        sent = 0
        if not self._wq:
            try:
                if fds:
                    sent = self._sock.sendmsg(parts, _scm.scm_rights(fds))  # type: ignore[union-attr]
                elif len(parts) == 1:
                    sent = self._sock.send(parts[0])  # type: ignore[union-attr]
                else:
                    sent = self._sock.sendmsg(parts)  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._abort(exc)
                raise ConnectionLost(f"send failed: {exc}") from exc
            self._sent += sent
        if fds and not sent:
            # they leave with the byte at this offset, when the queue gets there
            self._wfds.append((self._queued, [os.dup(f) for f in fds]))
        self._queued += total
        if sent == total:
            return self._queued
        wq = self._wq
        for p in parts:
            n = len(p)
            if sent >= n:
                sent -= n
                continue
            if sent:
                p = memoryview(p)[sent:]
                sent = 0
            if type(p) is not bytes and not held:
                p = bytes(p)
            wq.append(p)
        if not self._writing:
            self._loop.add_writer(self._fd, self._on_writable)
            self._writing = True
        return self._queued

    def _on_writable(self) -> None:
        wq = self._wq
        sock = self._sock
        assert sock is not None
        try:
            while wq:
                if self._wfds:
                    batch, anc = self._fd_batch()
                    n = sock.sendmsg(batch, anc) if anc else sock.sendmsg(batch)
                    if anc and n:
                        for f in self._wfds.popleft()[1]:
                            os.close(f)
                else:
                    batch = list(wq) if len(wq) <= _IOV_MAX else [wq[i] for i in range(_IOV_MAX)]
                    n = sock.sendmsg(batch)
                self._sent += n
                full = True
                for p in batch:
                    k = len(p)
                    if n >= k:
                        n -= k
                        wq.popleft()
                    else:
                        if n:
                            wq[0] = memoryview(p)[n:]
                        full = False
                        break
                if not full:
                    break
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            self._abort(exc)
            return
        if not wq:
            self._loop.remove_writer(self._fd)
            self._writing = False
            if self._closing:
                self._finish_close()
        self._wake_senders()

    def _fd_batch(self) -> tuple[list[Any], list[Any]]:
        """The queued pieces one sendmsg may take with descriptors waiting: (pieces, ancillary data).

        A sendmsg carries the descriptors due at its first byte, and ends
        where the next ones are due.
        """
        wq = self._wq
        pos = self._sent
        due, fds = self._wfds[0]
        anc: list[Any] = []
        if due == pos:
            anc = _scm.scm_rights(fds)
            due = self._wfds[1][0] if len(self._wfds) > 1 else -1
        batch = []
        for i in range(min(len(wq), _IOV_MAX)):
            if pos == due:
                break
            p = wq[i]
            batch.append(p)
            pos += len(p)
        return batch, anc

    def _wake_senders(self) -> None:
        sent = self._sent
        keep = []
        for mark, fut in self._send_waiters:
            if fut.done():
                continue
            if sent >= mark:
                fut.set_result(None)
            else:
                keep.append((mark, fut))
        self._send_waiters = keep

    async def _sent_up_to(self, mark: int, held: bool) -> None:
        """Wait until the socket took the stream up to mark.

        Cancelled, a send whose buffers are still queued by reference gets
        them copied: the frame goes out whole and the caller's memory is free.
        """
        fut = self._loop.create_future()
        self._send_waiters.append((mark, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if held and not self._closing:
                self._wq = collections.deque(p if type(p) is bytes else bytes(p) for p in self._wq)
            raise

    def _send_small(self, frame: bytes) -> None:
        """Send one small frame: at once if it is the first since this connection last waited, else corked.

        A burst of small messages then costs one syscall per loop iteration
        (or per _CORK_MAX bytes) instead of one each, while a lone message
        (a request, a reply) never waits; a corked one waits at most until
        the end of the current loop iteration.
        """
        if not self._tick:
            self._write([frame], len(frame), False)
            self._tick = True
            return
        self._check()
        if not self._cork:
            self._loop.call_soon(self._end_tick)
        self._cork.append(frame)
        self._cork_size += len(frame)
        if self._cork_size >= _CORK_MAX:
            self._write([], 0, False)

    def _end_tick(self) -> None:
        self._tick = False
        if self._cork and not self._closed.done():
            try:
                self._write([], 0, False)
            except (ConnectionLost, OSError):
                pass        # the connection failed: _write aborted it, every waiter hears of it

    async def _after_write(self, mark: int, held: bool) -> None:
        if held:
            if self._sent < mark:
                await self._sent_up_to(mark, True)
        elif self._queued - self._sent > self.high_water:
            await self._sent_up_to(self._queued - self.low_water, False)

    async def send_bytes(self, buf: Buffer, offset: int = 0, size: int | None = None) -> None:
        """Send a bytes-like object's bytes (from ``offset``, ``size`` long) as one message.

        Returns once the socket took the message, or it is copied into the
        connection's queue (small messages) and that queue is below the high
        water mark: ``buf`` may then be reused. A large message is never
        copied: the call returns when the socket has taken all of it.
        """
        if type(buf) is bytes and not offset and size is None:
            view: Any = buf
        else:
            view = _byte_view(buf)
            if offset or size is not None:
                view = view[offset:offset + _send_size(len(view), offset, size)]
        n = len(view)
        if n < _COPY_THRESHOLD:
            self._send_small(_encode_header(n) + view)
            if self._queued - self._sent > self.high_water:
                await self._sent_up_to(self._queued - self.low_water, False)
            return
        parts: list[Any] = []
        _frame_parts(view, parts)
        mark = self._write(parts, sum(len(p) for p in parts), True)
        await self._after_write(mark, True)

    async def send(self, obj: Any) -> None:
        """Send a picklable object (pickled as multiprocessing does)."""
        await self.send_bytes(_dumps(obj))

    def _write_many(self, buffers: Iterable[Buffer], keep: bool, fds: Iterable[SupportsInt] = ()) -> tuple[int, bool]:
        """Frame and send (or queue) each buffer; (stream offset at the end, whether any is held)."""
        parts: list[Any] = []
        held = False
        for b in buffers:
            held = _frame_parts(_byte_view(b), parts) or held
        fdl = [int(f) for f in fds] or None
        if fdl is not None:
            self._check_fd_passing()
            if len(fdl) > _scm.MAX_FDS or not parts:
                raise ValueError(f"send between 1 and {_scm.MAX_FDS} descriptors, with at least one message")
        mark = self._queued
        for i in range(0, len(parts), _IOV_MAX):
            chunk = parts[i:i + _IOV_MAX]
            mark = self._write(chunk, sum(len(p) for p in chunk), held or keep, fdl if i == 0 else None)
        return mark, held

    async def send_many(self, buffers: Iterable[Buffer], *, fds: Iterable[SupportsInt] = ()) -> None:
        """Send each bytes-like object in ``buffers`` as its own message, in one ``sendmsg`` where it fits.

        ``fds`` (AF_UNIX, at most 253) ride on the first message as
        SCM_RIGHTS; the caller keeps its own and may close them on return.
        The peer receives them with :meth:`take_fds`.
        """
        mark, held = self._write_many(buffers, False, fds)
        await self._after_write(mark, held)

    def write_many(self, buffers: Iterable[Buffer], *, fds: Iterable[SupportsInt] = ()) -> None:
        """Send each buffer as its own message (one ``sendmsg``) without waiting, as a transport's ``writelines``.

        What the socket does not take at once stays queued by reference,
        not copied: the buffers must not change until it is sent. There is
        no backpressure; ``await drain()`` for it. ``fds`` as for :meth:`send_many`.
        """
        self._write_many(buffers, True, fds)

    async def send_array(self, arr: Any) -> None:
        """Send a numpy array (or any buffer) with its dtype, shape and order, without copying it.

        Two messages, as :meth:`fastnet.Connection.send_array`: a small
        header and the raw bytes; a blocking fastnet peer reads it with
        ``recv_array``.
        """
        header, payload = _zc.encode_array(arr)
        await self.send_many((header, payload))

    async def drain(self) -> None:
        """Wait until the queue of unsent bytes is down to the low water mark."""
        self._check()
        if self._queued - self._sent > self.low_water:
            await self._sent_up_to(self._queued - self.low_water, False)

    # -- closing -------------------------------------------------------------

    def abort(self) -> None:
        """Close now: queued messages are dropped, waiting receives and sends fail."""
        self._abort(ConnectionLost("the connection was aborted"))

    def peer_gone(self) -> bool:
        """True once the connection is closed or the peer closed or reset its end.

        Needs no receive waiting: with none, one non-blocking peek at the
        socket tells. It stays False while a message from the peer is still
        waiting to be received.
        """
        if self._closing or self._eof:
            return True
        if self._reading or self._sock is None:
            return False     # the loop watches the socket for the waiting receive
        try:
            return not self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def close(self) -> None:
        """Close the connection; queued messages are still sent (see :meth:`wait_closed`)."""
        if self._closing:
            return
        if self._cork:
            try:
                self._write([], 0, False)
            except (ConnectionLost, OSError):
                pass
        self._closing = True
        self._stop_reading(ConnectionLost("the connection was closed"))
        if not self._wq:
            self._finish_close()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed and its socket released."""
        await asyncio.shield(self._closed)

    def _stop_reading(self, exc: BaseException) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        fut = self._waiter
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def _abort(self, exc: BaseException) -> None:
        """Fail the connection now: queued data is dropped, every waiter gets the error."""
        if self._closed.done():
            return
        if self._error is None:
            self._error = exc
        self._closing = True
        self._stop_reading(exc)
        self._wq.clear()
        self._cork = []
        self._cork_size = 0
        self._finish_close()

    def _finish_close(self) -> None:
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._close_fds()
        err = self._error
        for _, fut in self._send_waiters:
            if not fut.done():
                fut.set_exception(ConnectionLost(f"connection failed: {err}") if err is not None
                                  else ConnectionLost("the connection was closed"))
        self._send_waiters = []
        self._release()
        if not self._closed.done():
            self._closed.set_result(None)

    def _release(self) -> None:
        sock = self._sock
        if sock is not None:
            sock.close()

    async def __aenter__(self) -> AsyncConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    def __del__(self) -> None:
        sock = getattr(self, "_sock", None)
        if sock is None or sock.fileno() < 0 or not hasattr(self, "_writing"):
            return
        # never closed: take it off the loop (if that still runs) and release the socket
        if hasattr(self, "_wfds"):
            self._close_fds()
        try:
            if not self._loop.is_closed():
                if self._reading:
                    self._loop.remove_reader(self._fd)
                if self._writing:
                    self._loop.remove_writer(self._fd)
        except Exception:
            pass
        sock.close()


class _TLSConnection(AsyncConnection):
    """An AsyncConnection over the loop's TLS transport (a BufferedProtocol feeds the decoder)."""

    _fd_passing = False         # descriptors would bypass the encryption

    def __init__(self, sock: socket.socket, **kw: Any) -> None:
        super().__init__(sock, **kw)
        self._transport: asyncio.Transport | None = None
        self._paused = False                   # the transport asked us to stop writing
        self._read_paused = False
        self._resumed: asyncio.Future[None] | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        t = self._transport
        if t is None:
            return super().get_extra_info(name, default)
        return t.get_extra_info(name, default)

    # the protocol's side -----------------------------------------------------
    def _data_arrived(self) -> None:
        fut = self._waiter
        if fut is None or fut.done():
            if self._decoder.buffered > _TLS_READ_LIMIT and not self._read_paused and self._transport:
                self._transport.pause_reading()
                self._read_paused = True
            return
        try:
            if not (self._eof or self._decoder.has_frame()):
                self._steer(self._limit, self._into)
                return
        except Exception as exc:
            fut.set_exception(exc)
            return
        fut.set_result(None)

    def _lost(self, exc: BaseException | None) -> None:
        # the transport is gone: a clean close leaves what was received readable
        self._eof = True
        if exc is not None:
            if self._error is None:
                self._error = exc
            self._closing = True
        fut = self._waiter
        if fut is not None and not fut.done():
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(ConnectionLost(f"connection failed: {exc}"))
        self._resume_writing()
        self._finish_close()

    def _resume_writing(self) -> None:
        self._paused = False
        r = self._resumed
        self._resumed = None
        if r is not None and not r.done():
            r.set_result(None)

    # the connection's side ---------------------------------------------------
    def _arm(self, limit: int | None, into: tuple[Any, int] | None) -> asyncio.Future[None] | None:
        if self._waiter is not None:
            raise RuntimeError("another coroutine is already receiving on this connection")
        if self._error is not None or self._transport is None:
            self._check()
            raise ConnectionLost("the connection was closed")
        if self._read_paused:
            self._read_paused = False
            self._transport.resume_reading()
        self._limit = limit
        self._into = into
        fut = self._waiter = self._loop.create_future()
        return fut

    def _send_small(self, frame: bytes) -> None:
        # the TLS transport buffers and coalesces by itself
        self._write([frame], len(frame), False)

    def _write(self, parts: list[Any], total: int, held: bool, fds: list[int] | None = None) -> int:
        self._check()
        t = self._transport
        if t is None or t.is_closing():
            raise ConnectionLost("the connection was closed")
        # the TLS transport may keep what it is given until it is encrypted: give it copies
        t.writelines([p if type(p) is bytes else bytes(p) for p in parts])
        self._queued += total
        self._sent += total
        return self._queued

    async def _after_write(self, mark: int, held: bool) -> None:
        while self._paused:
            if self._resumed is None:
                self._resumed = self._loop.create_future()
            await asyncio.shield(self._resumed)
            self._check()

    async def drain(self) -> None:
        self._check()
        await self._after_write(0, False)

    def _stop_reading(self, exc: BaseException) -> None:
        fut = self._waiter
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def peer_gone(self) -> bool:
        # the TLS transport keeps reading (up to its limit), so it saw any close
        return self._closing or self._eof or self._closed.done()

    def _release(self) -> None:
        t = self._transport
        if t is not None:
            if self._error is not None:
                t.abort()
            else:
                t.close()
        elif self._sock is not None:
            self._sock.close()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._stop_reading(ConnectionLost("the connection was closed"))
        t = self._transport
        if t is None or self._closed.done():
            self._finish_close()
        else:
            t.close()       # flushes what is queued; connection_lost finishes the close

    def __del__(self) -> None:
        t = getattr(self, "_transport", None)
        if t is not None and not t.is_closing() and not self._loop.is_closed():
            t.abort()
        elif t is None:
            super().__del__()


class _TLSProtocol(asyncio.BufferedProtocol):
    """Feeds the loop's TLS transport's plaintext into the connection's frame decoder."""

    def __init__(self, conn: _TLSConnection) -> None:
        self.conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn._transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.conn._decoder.buffer_updated(nbytes)
        self.conn._data_arrived()

    def eof_received(self) -> bool:
        self.conn._eof = True
        self.conn._data_arrived()
        return False

    def pause_writing(self) -> None:
        self.conn._paused = True

    def resume_writing(self) -> None:
        self.conn._resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn._lost(exc)
