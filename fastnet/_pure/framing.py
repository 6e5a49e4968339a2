"""Pure-Python twin of src_c/framing.pyx: multiprocessing.connection's frames.

A frame is a 4-byte big-endian signed length and the payload; payloads over
0x7fffffff use length -1 and an 8-byte big-endian unsigned length. The decoder
checks a header against its limits before allocating anything for the
payload, receives into one reusable bytearray (many frames per read, compacted
only when the free tail runs out) and fills large frames into a bytearray of
their own, returned as bytes (one copy more than the compiled kernel).

FrameDecoder is sans-I/O. Channel drives it with blocking calls on a socket
object it keeps (``release()`` drops it); the socket must be in blocking mode.
Its receives take exactly the frame they return unless ``readahead=True``.
Channel's byte side (waiting, the io hook, coalescing, descriptors, the
receives through the decoder) is _ChannelIO in _framing_channel.py; the
methods that encode or scan headers stay here, beside the codec.
"""
from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, SupportsIndex, SupportsInt

from fastnet import _scm
from fastnet._pure._convert import _LLONG_MAX, _longlong, _ssize, _view, _wview
from fastnet._pure._framing_channel import (_ChannelIO, _DONTWAIT, _MAX_FDS, _NOSIGNAL, _PEEK, _POLLIN,
                                            _POLLOUT, _monotonic)
from fastnet.errors import (ProtocolError, MessageTooLarge, TruncatedFrameError,
                            BufferTooShort, TimeoutError as FastnetTimeout)

if TYPE_CHECKING:
    from typing_extensions import Buffer, Self

_HUGE = 0x7fffffff
# The compiled kernel's receive buffer doubles within Py_ssize_t: never beyond this.
_MAX_BUFFER = 0x3fffffffffffffff

HEADER_SIZE = 4
LARGE_HEADER_SIZE = 12
#: Frames at least this large are received straight into their own object.
LARGE_FRAME = 65536
DEFAULT_BUFSIZE = 262144

_I32 = struct.Struct("!i")
_U64 = struct.Struct("!Q")
_pack_i32 = _I32.pack
_unpack_i32 = _I32.unpack_from
_unpack_u64 = _U64.unpack_from
_LARGE_PREFIX = b"\xff\xff\xff\xff"


# -- the frame header codec: the one copy the pure kernels share -------------
# (the compiled kernels' is src_c/framing.pxd)

_HDR_BAD_LENGTH = -1    # a negative length other than -1
_HDR_TOO_LARGE = -2     # an 8-byte length beyond 2**63 - 1


def _header(n: int) -> bytes:
    """The header for an n-byte payload (n >= 0)."""
    if n <= _HUGE:
        return _pack_i32(n)
    return _LARGE_PREFIX + _U64.pack(n)


def _parse_header(buf: Any, pos: int, avail: int) -> tuple[int, int]:
    """Read the header at buf[pos:], of which avail bytes are present.

    Returns (its size, the payload length); (0, the bytes it lacks) when it
    is incomplete; (_HDR_BAD_LENGTH or _HDR_TOO_LARGE, the length) for a
    header no peer may send (see _header_error).
    """
    if avail < 4:
        return 0, 4 - avail
    n = _unpack_i32(buf, pos)[0]
    if n >= 0:
        return 4, n
    if n != -1:
        return _HDR_BAD_LENGTH, n
    if avail < 12:
        return 0, 12 - avail
    n = _unpack_u64(buf, pos + 4)[0]
    if n > _LLONG_MAX:
        return _HDR_TOO_LARGE, n
    return 12, n


def _header_error(code: int, n: int) -> Exception:
    """The exception for a header _parse_header refused."""
    if code == _HDR_TOO_LARGE:
        return MessageTooLarge(f"frame header claims {n} bytes")
    return ProtocolError(f"invalid frame length {n}")


def encode_header(n: SupportsIndex) -> bytes:
    """Return the frame header for an n-byte payload."""
    n = _ssize(n)
    if n < 0:
        raise ValueError("negative payload length")
    return _header(n)


class FrameDecoder:
    """Incremental decoder of length-prefixed frames.

    Feed bytes with :meth:`feed` (or write into :meth:`get_buffer` and call
    :meth:`buffer_updated`), then take complete frames with :meth:`next_frame`,
    :meth:`frames` or by iterating. ``max_size`` (None: unlimited) is checked
    when a header arrives, before anything is allocated for the payload.
    """

    __slots__ = ("_buf", "_mv", "_cap", "_rpos", "_wpos", "_cur", "_target", "_tview",
                 "_tpos", "_max_size", "_large_threshold", "_received", "_frame_start",
                 "_frame_hdr", "_broken", "_user")

    _target: bytearray | None
    _tview: memoryview
    _broken: BaseException | None

    def __init__(self, max_size: SupportsInt | None = None, bufsize: SupportsIndex = DEFAULT_BUFSIZE,
                 large_threshold: SupportsIndex = LARGE_FRAME) -> None:
        bufsize = _ssize(bufsize)
        large_threshold = _ssize(large_threshold)
        if bufsize < 64:
            bufsize = 64
        self._buf = bytearray(bufsize)
        # the buffer is never resized in place (a region handed out by
        # get_buffer may still be exported), so one view serves until replaced
        self._mv = memoryview(self._buf)
        self._cap = bufsize
        self._rpos = 0
        self._wpos = 0
        self._cur = -1           # length of the frame whose header was consumed, -1 if none
        self._target = None      # bytearray being filled for a large frame, or None
        self._tview = None  # type: ignore[assignment]  # set with _target
        self._tpos = 0
        self._user: tuple[Any, int] | None = None   # (buf, offset) of a caller's target (next_frame_into)
        self._received = 0       # bytes taken from the stream so far
        self._frame_start = 0    # stream offset of the last parsed header
        self._frame_hdr = 0      # its header length, 4 or 12 (0 before the first)
        self._broken = None      # the exception that desynchronised the stream, or None
        self._max_size = -1 if max_size is None else _longlong(max_size)
        if self._max_size < -1:
            raise ValueError("max_size must be None or >= 0")
        self._large_threshold = max(large_threshold, 16)

    @property
    def max_size(self) -> int:
        """The largest frame accepted, -1 for unlimited."""
        return self._max_size

    @property
    def large_threshold(self) -> int:
        """Frames at least this long are filled into their own object."""
        return self._large_threshold

    @property
    def received(self) -> int:
        """Bytes taken from the stream so far."""
        return self._received

    @property
    def frame_start(self) -> int:
        """Stream offset of the last parsed header."""
        return self._frame_start

    @property
    def frame_hdr(self) -> int:
        """Header length of the last parsed frame, 4 or 12."""
        return self._frame_hdr

    # -- internals ---------------------------------------------------------

    def _check(self) -> None:
        if self._broken is not None:
            raise self._broken

    def _consume(self, n: int) -> None:
        self._rpos += n
        if self._rpos == self._wpos:
            self._rpos = self._wpos = 0

    def _parse_header(self, limit: int) -> bool:
        """Consume a header if one is complete: True if a frame length is known."""
        if self._cur >= 0:
            return True
        rpos = self._rpos
        avail = self._wpos - rpos
        if avail < 4:
            return False
        self._frame_start = self._received - avail
        h, n = _parse_header(self._buf, rpos, avail)
        if h == 0:
            return False
        if h < 0:
            self._broken = _header_error(h, n)
            raise self._broken
        self._frame_hdr = h
        self._consume(h)
        if self._max_size >= 0 and n > self._max_size:
            self._broken = MessageTooLarge(
                f"frame of {n} bytes exceeds max_message_size={self._max_size}")
            raise self._broken
        if limit >= 0 and n > limit:
            self._broken = MessageTooLarge(f"bad message length: {n} bytes exceeds maxlength={limit}")
            raise self._broken
        self._cur = n
        return True

    def _reserve(self, need: int) -> None:
        """Make room for `need` contiguous unread+free bytes from rpos."""
        if need > _MAX_BUFFER:
            raise MemoryError("receive buffer cannot grow that large")
        rpos = self._rpos
        avail = self._wpos - rpos
        if rpos > 0 and (self._cap - rpos < need or self._wpos == self._cap):
            self._mv[0:avail] = self._mv[rpos:self._wpos]
            self._rpos = 0
            self._wpos = avail
        if self._cap < need:
            ncap = self._cap
            while ncap < need:
                ncap *= 2
            nb = bytearray(ncap)
            nb[0:avail] = self._mv[0:avail]
            self._mv.release()
            self._buf = nb
            self._mv = memoryview(nb)
            self._cap = ncap

    def _new_target(self) -> tuple[bytearray, memoryview]:
        """A bytearray for the whole current frame, and its view."""
        try:
            t = bytearray(self._cur)
        except (MemoryError, OverflowError):
            # only a header claiming more than this process can hold gets here
            self._broken = MessageTooLarge(f"frame of {self._cur} bytes cannot be allocated")
            raise self._broken from None
        return t, memoryview(t)

    def _switch_to_target(self) -> None:
        """Move the buffered part of a large frame into its own bytearray."""
        rpos = self._rpos
        avail = self._wpos - rpos
        t, tv = self._new_target()
        tv[0:avail] = self._mv[rpos:self._wpos]
        self._target = t
        self._tview = tv
        self._tpos = avail
        self._rpos = self._wpos = 0

    def _detach(self) -> None:
        """Move the part of a frame received into a caller's buffer into a bytearray of its own."""
        t, tv = self._new_target()
        tv[0:self._tpos] = self._tview[0:self._tpos]
        self._tview.release()
        self._target = t
        self._tview = tv
        self._user = None

    def _take_target(self) -> bytes:
        t = self._target
        assert t is not None
        self._tview.release()
        self._target = self._tview = None  # type: ignore[assignment]
        self._cur = -1
        return bytes(t)

    def _next(self, limit: int) -> bytes | None:
        """Return the next complete frame or None; switch to direct fill for large frames."""
        cur = self._cur
        if cur > limit >= 0:
            # the header was parsed earlier (has_frame, poll, a timed-out receive)
            self._broken = MessageTooLarge(f"bad message length: {cur} bytes exceeds maxlength={limit}")
            raise self._broken
        if self._user is not None:
            self._detach()
        if self._target is not None:
            if self._tpos < cur:
                return None
            return self._take_target()
        if cur < 0 and not self._parse_header(limit):
            return None
        n = self._cur
        rpos = self._rpos
        if self._wpos - rpos >= n:
            frame = self._mv[rpos:rpos + n].tobytes()
            self._cur = -1
            self._consume(n)
            return frame
        if n >= self._large_threshold:
            self._switch_to_target()
        return None

    def _drain(self, out: list[bytes]) -> None:
        """Append every complete frame to out: a fast loop over small frames, _next for the rest."""
        append = out.append
        while True:
            if self._target is None and self._cur < 0:
                buf = self._buf
                mv = self._mv
                rpos = start = self._rpos
                wpos = self._wpos
                limit = self._max_size
                last = -1
                while True:
                    # small complete frames only; anything else goes through _next
                    h, n = _parse_header(buf, rpos, wpos - rpos)
                    if h != 4 or n > wpos - rpos - 4 or 0 <= limit < n:
                        break
                    last = rpos
                    rpos += 4 + n
                    append(mv[last + 4:rpos].tobytes())
                if last >= 0:
                    self._frame_start = self._received - (wpos - last)
                    self._frame_hdr = 4
                if rpos != start:
                    if rpos == wpos:
                        self._rpos = self._wpos = 0
                    else:
                        self._rpos = rpos
            f = self._next(-1)
            if f is None:
                return
            append(f)

    def _needed(self) -> int:
        """Bytes missing to complete the last frame begun in the buffered data (0 if none)."""
        if self._target is not None:
            if self._tpos < self._cur:
                return self._cur - self._tpos
            n = -1
        else:
            n = self._cur
        buf = self._buf
        pos = self._rpos
        end = self._wpos
        while True:
            left = end - pos
            if n < 0:
                if left == 0:
                    return 0
                h, n = _parse_header(buf, pos, left)
                if h == 0:
                    return n
                if h < 0:
                    return 0    # a bad header, reported when it is parsed
                pos += h
                left = end - pos
            if n > left:
                return n - left
            pos += n
            n = -1

    # -- Python API ------------------------------------------------------

    def next_frame_into(self, buf: Buffer, offset: SupportsIndex = 0) -> int | None:
        """Receive the next frame into the writable buffer ``buf`` at ``offset``.

        Returns the frame's length once it is complete, else None: call
        again, with the same buffer and offset, after each buffer_updated().
        Once the header is parsed, what is buffered of the frame is copied
        into ``buf`` and get_buffer() hands out the rest of it, so the
        payload goes from the socket straight into ``buf``. A frame longer
        than the space is received whole and raised as BufferTooShort
        carrying it. :meth:`detach` (or any other receive) moves a frame
        left half-received into the decoder's own memory.
        """
        offset = _ssize(offset)
        self._check()
        if self._user is not None:
            if self._user[0] is not buf or self._user[1] != offset:
                self._detach()
            elif self._tpos < self._cur:
                return None
            else:
                self._tview.release()
                self._target = self._tview = self._user = None  # type: ignore[assignment]
                n = self._cur
                self._cur = -1
                return n
        if self._target is None and not self._parse_header(-1):
            return None
        view = _wview(buf)
        if offset < 0 or offset > len(view):
            view.release()
            raise ValueError("offset out of bounds")
        n = self._cur
        if n > len(view) - offset:
            view.release()
            f = self._next(-1)
            if f is None:
                return None
            raise BufferTooShort(f)
        tv = view[offset:offset + n]
        view.release()
        if self._target is not None:
            tpos = self._tpos
            tv[0:tpos] = self._tview[0:tpos]
            self._tview.release()
            if tpos >= n:
                tv.release()
                self._target = self._tview = None  # type: ignore[assignment]
                self._cur = -1
                return n
        else:
            rpos = self._rpos
            avail = self._wpos - rpos
            if avail >= n:
                tv[0:n] = self._mv[rpos:rpos + n]
                tv.release()
                self._cur = -1
                self._consume(n)
                return n
            tv[0:avail] = self._mv[rpos:self._wpos]
            self._tpos = avail
            self._rpos = self._wpos = 0
        self._target = buf  # type: ignore[assignment]
        self._tview = tv
        self._user = (buf, offset)
        return None

    def detach(self) -> None:
        """Stop receiving into the caller's buffer of next_frame_into(); keep the frame whole.

        What it holds of the frame so far is copied into the decoder's own
        memory and the frame is returned by a later next_frame(). Does
        nothing when no frame is being received into a caller's buffer.
        """
        if self._user is not None:
            self._detach()

    def feed(self, data: Buffer) -> None:
        """Append bytes received from the peer (any buffer-protocol object)."""
        self._check()
        view = _view(data)
        total = len(view)
        try:
            off = 0
            while off < total:
                k = total - off
                if self._target is not None:
                    if self._tpos < self._cur:
                        k = min(self._cur - self._tpos, k)
                        tpos = self._tpos
                        self._tview[tpos:tpos + k] = view[off:off + k]
                        self._tpos = tpos + k
                        off += k
                        self._received += k
                        continue
                else:
                    avail = self._wpos - self._rpos
                    if self._cur < 0 and avail < 12:
                        # stage just enough to read a header, so a large
                        # frame goes straight to its target
                        k = min(k, 12 - avail)
                    elif self._cur >= self._large_threshold and avail < self._cur:
                        self._switch_to_target()
                        continue
                self._reserve(self._wpos - self._rpos + k)
                wpos = self._wpos
                self._mv[wpos:wpos + k] = view[off:off + k]
                self._wpos = wpos + k
                off += k
                self._received += k
                if self._target is None and self._cur < 0:
                    self._parse_header(-1)
        finally:
            view.release()

    def get_buffer(self, sizehint: SupportsIndex = -1) -> memoryview:
        """Return a writable buffer to receive into; then call buffer_updated(n).

        Bytes written into a region after buffer_updated() (or after a later
        call on the decoder) may be lost or overwrite data received since;
        the region keeps alive whatever memory it covers, so they never land
        outside it.
        """
        sizehint = _ssize(sizehint)
        self._check()
        if self._target is None:
            self._parse_header(-1)
            if self._cur >= self._large_threshold and self._wpos - self._rpos < self._cur:
                self._switch_to_target()
        if self._target is not None and self._tpos < self._cur:
            return self._tview[self._tpos:self._cur]
        if sizehint > _MAX_BUFFER:
            raise MemoryError("receive buffer cannot grow that large")
        need = self._wpos - self._rpos + max(sizehint, 4096)
        if self._target is None and self._cur > need:
            need = self._cur
        self._reserve(need)
        return self._mv[self._wpos:self._cap]

    def buffer_updated(self, nbytes: SupportsIndex) -> None:
        """Record that nbytes were written into the last get_buffer() region."""
        nbytes = _ssize(nbytes)
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        if self._target is not None and self._tpos < self._cur:
            if self._tpos + nbytes > self._cur:
                raise ValueError("buffer_updated beyond the region handed out")
            self._tpos += nbytes
        else:
            if self._wpos + nbytes > self._cap:
                raise ValueError("buffer_updated beyond the region handed out")
            self._wpos += nbytes
        self._received += nbytes

    def next_frame(self, maxlength: SupportsInt | None = None) -> bytes | None:
        """Return the next complete frame as bytes, or None if none is complete.

        A frame longer than ``maxlength`` raises MessageTooLarge as soon as
        its header is parsed, before its payload is received (the asyncio
        face's ``recv_bytes(maxlength)``, the handshake's message limit).
        """
        limit = -1 if maxlength is None else _longlong(maxlength)
        self._check()
        return self._next(limit)

    def frames(self) -> list[bytes]:
        """Return every complete frame now buffered, as a list of bytes."""
        self._check()
        out: list[bytes] = []
        self._drain(out)
        return out

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> bytes:
        self._check()
        f = self._next(-1)
        if f is None:
            raise StopIteration
        return f

    def has_frame(self) -> bool:
        """True if a complete frame is buffered."""
        self._check()
        if self._target is not None:
            return self._tpos >= self._cur
        if not self._parse_header(-1):
            return False
        return self._wpos - self._rpos >= self._cur

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as frames (headers excluded once parsed)."""
        if self._target is not None:
            return self._tpos + self._wpos - self._rpos
        return self._wpos - self._rpos

    @property
    def needed(self) -> int:
        """Bytes still missing to complete the frame in progress (0 if none is).

        That is the last frame begun in the buffered bytes; for a partial
        header, the bytes the header still lacks.
        """
        return self._needed()

    def eof(self) -> None:
        """Signal the end of the stream: raise TruncatedFrameError if a frame is incomplete."""
        self._check()
        missing = self._needed()
        if missing > 0:
            self._broken = TruncatedFrameError(missing)
            raise self._broken


#: Payloads up to this size are copied next to their header and sent in one
#: send(); larger ones go out as a two-buffer sendmsg without a copy.
COPY_THRESHOLD = 65536

#: The coalescing threshold ``coalesce=True`` means: queued frames are
#: written once they pass this many bytes (the measured knee of the one-way
#: 64-byte stream; larger buffers gain little and delay the first message).
COALESCE_THRESHOLD = 65536


class Channel(_ChannelIO):
    """Length-prefixed frames over a connected stream socket in blocking mode.

    ``Channel(sock, max_size=None, bufsize=..., *, readahead=False, io=None)``.
    Every receive accepts an optional ``timeout`` in seconds (None: block); a
    timeout raises :class:`fastnet.TimeoutError` and leaves what it received
    buffered, so the next receive resumes the frame.

    By default a receive takes from the socket exactly the frame it returns;
    ``recv_frames`` peeks at what has arrived and takes exactly the whole
    frames in it. ``readahead=True`` reads as much as the socket has instead:
    fewer syscalls, but select() on the descriptor no longer sees frames
    already buffered, another process reading the same socket loses them, and
    bytes that follow a frame (a descriptor sent by ``send_handle``) are taken.

    ``io``, when given, is an object with ``recv_into(buffer, nbytes)`` and
    ``sendall(data)`` (an ``ssl.SSLSocket`` fits, and is its own io when passed
    as ``sock``) that carries every byte in
    place of the socket's syscalls; ``sock`` is still what readiness is
    waited on. An ``io`` holding bytes of its own (``pending()``, as TLS
    decrypts whole records) makes ``readahead`` moot: the channel then reads
    as much as it gets, and ``poll``, ``has_frame`` and ``buffered`` count
    ``io.pending()``. With a timeout the io is set non-blocking
    (``settimeout(0.0)``) for each read.

    ``coalesce=n`` (bytes, 0: off; see :meth:`set_coalesce`) queues small
    frames and writes them together; ``spin=us`` busy-polls a receive that
    would block for up to ``us`` microseconds (no effect with an ``io``).
    """

    __slots__ = ()

    def __init__(self, sock: socket.socket, max_size: SupportsInt | None = None,
                 bufsize: SupportsIndex = 262144, *, readahead: bool = False, io: Any = None,
                 coalesce: SupportsIndex = 0, spin: float = 0.0) -> None:
        bufsize = _ssize(bufsize)
        if sock.fileno() < 0:
            raise ValueError("socket is closed")
        ssl = sys.modules.get("ssl")
        if io is None and ssl is not None and isinstance(sock, ssl.SSLSocket):
            io = sock   # its bytes are only readable through it
        if io is not None and not (hasattr(io, "recv_into") and hasattr(io, "sendall")):
            raise TypeError("io must have recv_into(buffer, nbytes) and sendall(data)")
        self._sock = sock
        self._decoder = FrameDecoder(max_size, bufsize)
        self._pollers = {}
        self._readahead = bool(readahead)
        self._io = io
        # readahead, or an io (whose own buffering makes exact reads moot)
        self._ahead = self._readahead or io is not None
        # AF_UNIX without an io: recvmsg, so SCM_RIGHTS is never lost (an io has no recvmsg)
        self._is_unix = sock.family == socket.AF_UNIX and io is None
        # [(start, end, fds)]: descriptors and the stream range of the read that brought them
        self._fd_batches = []
        spin = float(spin)
        if not spin >= 0.0:
            raise ValueError("spin must be >= 0 microseconds")
        self._spin_us = spin
        self._spin = spin * 1e-6   # busy-poll budget of a receive, seconds
        self._cbuf = bytearray()   # frames queued by coalescing
        self._climit = 0           # coalescing threshold, 0: off
        self.set_coalesce(coalesce)

    def send_frame(self, buf: Buffer, offset: SupportsIndex = 0, size: SupportsIndex | None = None) -> None:
        """Send one frame holding buf[offset:offset+size] (any contiguous buffer)."""
        if type(offset) is not int:
            offset = _ssize(offset)
        sock = self._fdcheck()
        if type(buf) is bytes:
            view: bytes | memoryview = buf
            ln = len(buf)
        else:
            view = _view(buf)
            ln = len(view)
        part: bytes | memoryview | None = None
        try:
            if offset < 0 or offset > ln:
                raise ValueError("offset is out of range")
            n = ln - offset if size is None else _ssize(size)
            if n < 0:
                raise ValueError("size is negative")
            if offset + n > ln:
                raise ValueError("buffer length < offset + size")
            if offset == 0 and n == ln:
                part = view
            else:
                part = (view if type(view) is memoryview else memoryview(view))[offset:offset + n]
            if self._climit:
                cb = self._cbuf
                cb += _header(n)
                if n > COPY_THRESHOLD:
                    # a large payload goes without a copy, behind the queue, in one sendmsg
                    self._cbuf = bytearray()
                    self._sendv_all([cb, part])
                else:
                    cb += part
                    if len(cb) >= self._climit:
                        self.flush()
            elif n <= COPY_THRESHOLD:
                if self._io is not None:
                    self._io.sendall(_header(n) + part)
                elif sock.gettimeout() is None:
                    sock.sendall(_header(n) + part, _NOSIGNAL)
                else:
                    self._sendv_all([_header(n) + part])
            else:
                self._sendv_all([_header(n), part])
        finally:
            if type(part) is memoryview and part is not view:
                part.release()
            if view is not buf:
                view.release()  # type: ignore[union-attr]  # not buf: a memoryview

    def send_frames(self, buffers: Iterable[Buffer]) -> None:
        """Send every buffer in the iterable as its own frame, in as few syscalls as possible."""
        bufs = list(buffers)
        self._fdcheck()
        if not bufs:
            return
        self._flush_first()
        views: list[bytes | memoryview] = []
        try:
            # take every buffer before anything is sent, as the compiled kernel does
            for b in bufs:
                views.append(b if type(b) is bytes else _view(b))
            parts: list[bytes | memoryview] = []
            small: list[bytes | memoryview] = []
            for v in views:
                n = len(v)
                small.append(_header(n))
                if n <= COPY_THRESHOLD:
                    small.append(v)
                else:
                    parts.append(b"".join(small))
                    parts.append(v)
                    small = []
            if small:
                parts.append(b"".join(small))
            if len(parts) == 1 and self._io is None and self._sock.gettimeout() is None:
                self._sock.sendall(parts[0], _NOSIGNAL)
            else:
                self._sendv_all(parts)
        finally:
            for v in views:
                if type(v) is memoryview:
                    v.release()

    def _peek_whole(self, deadline: float, frames: int = -1, limit: int = -1, tryfirst: bool = True) -> int:
        """Peek at what the socket holds; take exactly the whole frames at its head.

        Returns the bytes taken into the (empty) buffer, 0 if no whole frame
        has arrived yet. Two syscalls for any number of frames (at most
        ``frames`` of them, if >= 0), and nothing of a partial frame leaves
        the socket. A header the decoder would refuse (negative, the 12-byte
        form, over max_size or ``limit``) ends the scan: the exact path that
        follows receives or reports it.
        """
        d = self._decoder
        sock = self._sock
        d._reserve(d._cap)
        wpos = d._wpos
        free = d._cap - wpos
        with d._mv[wpos:d._cap] as v:
            if self._spin:
                until = self._spin_wait(deadline)
                while True:
                    try:
                        sock.recv_into(v, free, _PEEK | _DONTWAIT)
                        break
                    except BlockingIOError:
                        if _monotonic() >= until:
                            break
            if not tryfirst and deadline >= 0 and not self._wait(_POLLIN, deadline):
                raise FastnetTimeout("timed out waiting for data")
            while True:
                try:
                    if deadline >= 0:
                        r = sock.recv_into(v, free, _PEEK | _DONTWAIT)
                    else:
                        r = sock.recv_into(v, free, _PEEK)
                    break
                except BlockingIOError:
                    if not self._wait(_POLLIN, deadline):
                        raise FastnetTimeout("timed out waiting for data") from None
        if r == 0:
            self._eof()
        buf = d._buf
        max_size = d._max_size
        pos = 0
        while frames != 0:
            h, n = _parse_header(buf, wpos + pos, r - pos)
            if h != 4 or 0 <= max_size < n or 0 <= limit < n or n > r - pos - 4:
                break
            pos += 4 + n
            frames -= 1
        read = self._readmsg if self._is_unix else self._read
        got = 0
        while got < pos:
            # the bytes are there: these reads do not block (a reader sharing
            # the socket must serialise with us, as with multiprocessing)
            with d._mv[wpos + got:wpos + pos] as v:
                r = read(v, pos - got, -1.0, True)
            if r == 0:
                self._eof()
            got += r
            d._wpos += r
            d._received += r
        return pos

    def _peek_first(self, timeout: float | None, frames: int = -1, limit: int = -1, tryfirst: bool = True) -> float:
        """Start a receive that peeks (see _peek_whole) when nothing is buffered; its deadline."""
        deadline = -1.0 if timeout is None else self._deadline(timeout)
        self._fdcheck()
        self._flush_first()
        d = self._decoder
        if d._broken is not None:
            raise d._broken
        if frames != 0 and not self._ahead and d._target is None and d._cur < 0 and d._wpos == d._rpos:
            self._peek_whole(deadline, frames, limit, tryfirst)
        return deadline

    def recv_frame_peeking(self, frames: int, maxlength: SupportsInt | None = None,
                           timeout: float | None = None) -> bytes:
        """recv_frame, taking with it the whole frames that have arrived behind it, ``frames`` in all at most.

        For a caller that knows how many frames the peer has left to send
        in an exchange (the authkey handshake): the ones it pipelined come
        in one receive (peeked at, then taken exactly), and nothing past the
        exchange leaves the socket. Later receives return them.
        """
        limit = -1 if maxlength is None else _longlong(maxlength)
        # the peer is usually still to answer: wait, then peek (no try first)
        return self._recv_frame(limit, self._peek_first(timeout, frames, limit, False))

    def recv_frames(self, timeout: float | None = None) -> list[bytes]:
        """Receive every frame available now as a list, blocking for at least one.

        Without read-ahead: every whole frame that has arrived (peeked at,
        then taken exactly), or else the next frame as recv_frame does.
        """
        deadline = self._peek_first(timeout)
        d = self._decoder
        out: list[bytes] = []
        while True:
            d._drain(out)
            if out:
                return out
            self._fill(deadline)

    def send_frame_fds(self, buf: Buffer, fds: Iterable[SupportsInt]) -> None:
        """Send one frame whose first bytes carry ``fds`` as SCM_RIGHTS (AF_UNIX only)."""
        sock = self._fdcheck()
        self._flush_first()
        fdl = [int(f) for f in fds]
        if not self._is_unix:
            raise ValueError("descriptors can only be passed over AF_UNIX connections")
        if not 1 <= len(fdl) <= _MAX_FDS:
            raise ValueError(f"send between 1 and {_MAX_FDS} descriptors")
        view = _view(buf)
        hdr = _header(len(view))
        parts: list[bytes | memoryview] = [hdr, view] if len(view) else [hdr]
        anc = _scm.scm_rights(fdl)
        while True:
            try:
                r = sock.sendmsg(parts, anc, _NOSIGNAL)
                break
            except BlockingIOError:
                self._wait(_POLLOUT, -1.0)
        # the descriptors went with the first byte; the rest is plain data
        if r < len(hdr):
            self._sendv_all([hdr[r:], view])
        elif r - len(hdr) < len(view):
            self._sendv_all([view[r - len(hdr):]])
