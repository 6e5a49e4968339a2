"""The byte side of the pure blocking Channel (fastnet._pure.framing.Channel).

_ChannelIO holds the channel's state and everything that moves bytes without
building or parsing a header itself: waiting on the socket, deadlines and
busy-polling, the ``io`` hook, the coalescing queue, SCM_RIGHTS bookkeeping,
and the receives that go through the FrameDecoder. Channel, beside the header
codec in framing.py, adds the methods that encode headers (the sends) or scan
them (the peek of ``recv_frames``). This module imports nothing from
framing.py, so framing.py can import it without a cycle.
"""
from __future__ import annotations

import os
import select
import socket
import time
from typing import TYPE_CHECKING, Any, SupportsIndex, SupportsInt

from fastnet import _scm
from fastnet._pure._convert import _longlong, _ssize, _wview
from fastnet.errors import ProtocolError, TruncatedFrameError, BufferTooShort, TimeoutError as FastnetTimeout

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from fastnet._pure.framing import FrameDecoder

_IOV_BATCH = 512
_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
# plain ints: or-ing the socket module's IntFlag members costs a few enum calls per receive
_NOSIGNAL = int(socket.MSG_NOSIGNAL)
_DONTWAIT = int(socket.MSG_DONTWAIT)
_WAITALL = int(socket.MSG_WAITALL)
_PEEK = int(socket.MSG_PEEK)
_monotonic = time.monotonic


_MAX_FDS = _scm.MAX_FDS
_CTRL_SPACE = _scm.CTRL_SPACE
_CLOEXEC = _scm.CLOEXEC
_CTRUNC = _scm.CTRUNC
_scm_fds = _scm.scm_fds
_close_fd = os.close


_ssl_want: tuple[type[BaseException], ...] | None = None


def _spin_on(until: float) -> bool:
    """One more turn of a busy-poll, if time is left before ``until``.

    Each turn first lets a runnable task on this CPU run: when both ends
    share one CPU, that task is the peer being waited for.
    """
    os.sched_yield()
    return _monotonic() < until


def _would_block() -> tuple[type[BaseException], ...]:
    """The exceptions an io in non-blocking mode raises for 'not now' (ssl's WANT_* included)."""
    global _ssl_want
    if _ssl_want is None:
        import ssl
        _ssl_want = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
    return _ssl_want


class _ChannelIO:
    """State and byte I/O of a Channel; see framing.Channel for the whole API."""

    __slots__ = ("_sock", "_decoder", "_pollers", "_is_unix", "_fd_batches", "_readahead", "_io", "_ahead",
                 "_cbuf", "_climit", "_spin", "_spin_us")
    _sock: socket.socket
    _pollers: dict[int, select.poll]
    _fd_batches: list[tuple[int, int, list[int]]]
    _io: Any
    _decoder: FrameDecoder
    _readahead: bool
    _ahead: bool
    _is_unix: bool
    _cbuf: bytearray
    _climit: int
    _spin: float
    _spin_us: float

    @property
    def coalesce(self) -> int:
        """The coalescing threshold in bytes (0: every frame is written at once)."""
        return self._climit

    @property
    def spin(self) -> float:
        """Microseconds a receive that would block busy-polls first (0: none)."""
        return self._spin_us

    def set_coalesce(self, limit: SupportsIndex) -> None:
        """Queue frames up to ``limit`` bytes before writing them (0: off, after a flush)."""
        limit = _ssize(limit)
        if limit < 0:
            raise ValueError("coalesce must be >= 0 bytes")
        if limit == 0:
            if self._cbuf:
                self.flush()
            self._climit = 0
            return
        self._climit = limit
        if len(self._cbuf) >= limit:
            self.flush()

    def unflushed(self) -> int:
        """Bytes of frames queued by coalescing and not yet written."""
        return len(self._cbuf)

    def flush(self) -> None:
        """Write the frames queued by coalescing, in one syscall where the socket takes them.

        The queue is emptied before the write: if it fails, the error is
        raised and the queued frames are dropped (a prefix of them may have
        reached the peer).
        """
        buf = self._cbuf
        if not buf:
            return
        self._cbuf = bytearray()
        self._fdcheck()
        self._sendv_all([buf])

    def _flush_first(self) -> None:
        # everything queued leaves before this end waits for the peer
        if self._cbuf:
            self.flush()

    def _spin_wait(self, deadline: float) -> float:
        """The time until which a receive busy-polls (see ``spin``)."""
        until = _monotonic() + self._spin
        return deadline if 0 <= deadline < until else until

    @property
    def readahead(self) -> bool:
        """True if receives read as much as the socket has, not exactly one frame."""
        return self._readahead

    @property
    def io(self) -> Any:
        """The object that carries the bytes instead of the socket's syscalls, or None."""
        return self._io

    @property
    def decoder(self) -> FrameDecoder:
        """The FrameDecoder this channel receives through."""
        return self._decoder

    def release(self) -> None:
        """Forget the socket (it is being closed); close unclaimed received descriptors."""
        self._sock = None  # type: ignore[assignment]  # _fdcheck() tells it is gone
        self._pollers = {}
        self._close_batches(0, True)

    def _close_batches(self, before: int, every: bool) -> None:
        """Close descriptors whose frame has already been returned without them."""
        keep = []
        for batch in self._fd_batches:
            if every or batch[1] <= before:
                for f in batch[2]:
                    _close_fd(f)
            else:
                keep.append(batch)
        self._fd_batches = keep

    @property
    def max_size(self) -> int | None:
        """The largest frame accepted (None: unlimited)."""
        m = self._decoder._max_size
        return None if m < 0 else m

    def _fdcheck(self) -> socket.socket:
        sock = self._sock
        if sock is None:
            raise OSError(9, "handle is closed")
        return sock

    def _wait(self, events: int, deadline: float) -> bool:
        """Wait until the socket is ready; deadline < 0 waits forever. False on timeout."""
        p = self._pollers.get(events)
        if p is None:
            p = self._pollers[events] = select.poll()
            p.register(self._sock, events)
        while True:
            if deadline < 0:
                ms = -1
            else:
                left = deadline - _monotonic()
                if left <= 0:
                    ms = 0
                elif left < 2000000.0:
                    ms = int(left * 1000.0) + 1
                else:
                    ms = 2000000000     # poll() takes an int; a far deadline is re-polled
            # poll() retries EINTR itself, with the timeout recomputed
            if p.poll(ms):
                return True
            if deadline >= 0 and _monotonic() >= deadline:
                return False

    @staticmethod
    def _deadline(timeout: float | None) -> float:
        if timeout is None:
            return -1.0
        if timeout < 0:
            raise ValueError("timeout must be >= 0 or None")
        return float(_monotonic() + timeout)

    # -- sending ----------------------------------------------------------

    def _sendv_all(self, parts: list[Any]) -> None:
        """sendmsg every byte of parts (bytes, bytearrays, flat byte views), resuming after partial writes."""
        sock = self._sock
        if self._io is not None:
            for p in parts:
                if len(p):
                    self._io.sendall(p)
            return
        cnt = len(parts)
        i = 0
        made = []
        try:
            while i < cnt:
                try:
                    r = sock.sendmsg(parts[i:i + _IOV_BATCH], (), _NOSIGNAL)
                except BlockingIOError:
                    self._wait(_POLLOUT, -1.0)
                    continue
                # sendmsg retries EINTR itself; a partial count still needs resuming
                while i < cnt and r >= len(parts[i]):
                    r -= len(parts[i])
                    i += 1
                if r:
                    p = parts[i]
                    v = (p if type(p) is memoryview else memoryview(p))[r:]
                    made.append(v)
                    parts[i] = v
        finally:
            for v in made:
                v.release()

    # -- receiving --------------------------------------------------------

    def _read(self, view: memoryview, n: int, deadline: float, waitall: bool) -> int:
        """recv_into up to n bytes (MSG_WAITALL when waitall and no deadline); 0 means EOF."""
        if self._io is not None:
            return self._io_read(view, n, deadline, waitall)
        sock = self._sock
        if self._spin:
            until = self._spin_wait(deadline)
            while True:
                try:
                    return sock.recv_into(view, n, _DONTWAIT)
                except BlockingIOError:
                    if not _spin_on(until):
                        break
        while True:
            try:
                if deadline >= 0:
                    return sock.recv_into(view, n, _DONTWAIT)
                return sock.recv_into(view, n, _WAITALL if waitall else 0)
            except BlockingIOError:
                # a deadline, or a socket made non-blocking behind our back
                if not self._wait(_POLLIN, deadline):
                    raise FastnetTimeout("timed out waiting for data") from None

    def _io_read(self, view: memoryview, n: int, deadline: float, waitall: bool) -> int:
        """recv_into through the io; with a deadline, wait on the socket unless the io holds bytes."""
        io = self._io
        if deadline < 0:
            got: int = io.recv_into(view, n)
            while waitall and 0 < got < n:
                with view[got:n] as rest:
                    r = io.recv_into(rest, n - got)
                if r == 0:
                    break
                got += r
            return got
        want = _would_block()
        while True:
            if not self._io_pending() and not self._wait(_POLLIN, deadline):
                raise FastnetTimeout("timed out waiting for data")
            # non-blocking for this read: a readable socket may hold only part
            # of what the io needs (a TLS record), or nothing for the caller
            io.settimeout(0.0)
            try:
                return int(io.recv_into(view, n))
            except want:
                continue
            finally:
                io.settimeout(None)

    def _io_pending(self) -> int:
        pending = getattr(self._io, "pending", None)
        return 0 if pending is None else int(pending())

    def _unreturned(self) -> int:
        """Stream offset where the first frame not yet returned starts."""
        d = self._decoder
        if d._target is not None or d._cur >= 0:
            return d._frame_start
        return d._received - (d._wpos - d._rpos)

    def _readmsg(self, view: memoryview, n: int, deadline: float, waitall: bool) -> int:
        """recvmsg_into view, keeping any SCM_RIGHTS descriptors with the stream range they came with."""
        sock = self._sock
        until = self._spin_wait(deadline) if self._spin else -1.0
        while True:
            try:
                if until >= 0:
                    # busy-poll first (see _read)
                    try:
                        r, anc, mflags, _ = sock.recvmsg_into([view[:n]], _CTRL_SPACE, _CLOEXEC | _DONTWAIT)
                        break
                    except BlockingIOError:
                        if _spin_on(until):
                            continue
                        until = -1.0
                if deadline >= 0:
                    flags = _CLOEXEC | _DONTWAIT
                else:
                    flags = _CLOEXEC | (_WAITALL if waitall else 0)
                r, anc, mflags, _ = sock.recvmsg_into([view[:n]], _CTRL_SPACE, flags)
                break
            except BlockingIOError:
                if not self._wait(_POLLIN, deadline):
                    raise FastnetTimeout("timed out waiting for data") from None
        if anc:
            fds = _scm_fds(anc)
            d = self._decoder
            if mflags & _CTRUNC:
                for f in fds:
                    _close_fd(f)
                d._broken = ProtocolError(
                    f"control message truncated: the {len(fds)} descriptors that arrived were closed")
                raise d._broken
            if fds:
                if self._fd_batches:
                    self._close_batches(self._unreturned(), False)
                self._fd_batches.append((d._received, d._received + r, fds))
        return r

    def _fill(self, deadline: float) -> None:
        """One read into the decoder (buffer or large-frame target); EOF raises.

        No MSG_WAITALL here: a signal handler that raises after a partial
        WAITALL read would lose the bytes it returned (Python runs handlers
        between the call and the assignment of its result). Callers loop.
        """
        d = self._decoder
        read = self._readmsg if self._is_unix else self._read
        if d._target is not None:
            tpos = d._tpos
            with d._tview[tpos:d._cur] as v:
                r = read(v, d._cur - tpos, deadline, False)
            d._tpos = tpos + r
        elif self._ahead:
            need = d._wpos - d._rpos + 4096
            if d._cur > need:
                need = d._cur
            d._reserve(need)
            wpos = d._wpos
            with d._mv[wpos:d._cap] as v:
                r = read(v, d._cap - wpos, deadline, False)
            d._wpos = wpos + r
        else:
            # exactly what the frame begun still lacks: its header, then its
            # payload; nothing of the next frame is taken from the socket
            need = d._needed()
            if need <= 0:
                need = 4
            d._reserve(d._wpos - d._rpos + need)
            wpos = d._wpos
            with d._mv[wpos:wpos + need] as v:
                r = read(v, need, deadline, False)
            d._wpos = wpos + r
        if r == 0:
            self._eof()
        d._received += r

    def _eof(self) -> None:
        d = self._decoder
        if d._target is not None:
            missing = d._cur - d._tpos
        elif d._cur >= 0:
            missing = d._cur - (d._wpos - d._rpos)
        elif d._wpos > d._rpos:
            missing = d._needed()  # a partial header: 4 bytes, or 12 after an 0xffffffff prefix
        else:
            raise EOFError
        d._broken = TruncatedFrameError(missing)
        raise d._broken

    def recv_frame(self, maxlength: SupportsInt | None = None, timeout: float | None = None) -> bytes:
        """Receive one frame as bytes. EOFError on a clean close."""
        limit = -1 if maxlength is None else _longlong(maxlength)
        deadline = -1.0 if timeout is None else self._deadline(timeout)
        self._fdcheck()
        self._flush_first()
        return self._recv_frame(limit, deadline)

    def _recv_frame(self, limit: int, deadline: float) -> bytes:
        d = self._decoder
        if d._broken is not None:
            raise d._broken
        while True:
            f = d._next(limit)
            if f is not None:
                return f
            self._fill(deadline)

    def recv_frame_into(self, buf: Buffer, offset: SupportsIndex = 0) -> int:
        """Receive one frame into buf at offset and return its length.

        Whatever is already buffered is copied; the rest of a large frame is
        received straight into buf. A frame longer than the space raises
        BufferTooShort carrying the whole frame.
        """
        offset = _ssize(offset)
        self._fdcheck()
        self._flush_first()
        d = self._decoder
        d._check()
        if d._target is not None:
            # a large frame was started by a timed-out recv_frame: finish it there
            f = self.recv_frame()
            return self._copy_out(buf, offset, f)
        while not d._parse_header(-1):
            self._fill(-1.0)
        view = _wview(buf)
        try:
            if offset < 0 or offset > len(view):
                raise ValueError("offset out of bounds")
            n = d._cur
            if n > len(view) - offset:
                f = self.recv_frame()
                raise BufferTooShort(f)
            avail = d._wpos - d._rpos
            if avail >= n or n < d._large_threshold:
                while d._wpos - d._rpos < n:
                    self._fill(-1.0)
                rpos = d._rpos
                view[offset:offset + n] = d._mv[rpos:rpos + n]
                d._cur = -1
                d._consume(n)
                return n
            view[offset:offset + avail] = d._mv[d._rpos:d._wpos]
            d._rpos = d._wpos = 0
            k = avail
            try:
                while k < n:
                    with view[offset + k:offset + n] as v:
                        r = self._read(v, n - k, -1.0, True)
                    if r == 0:
                        d._broken = TruncatedFrameError(n - k)
                        raise d._broken
                    k += r
                    d._received += r
            except BaseException:
                if d._broken is None:
                    d._broken = ProtocolError(
                        f"receive interrupted mid-frame ({k} of {n} bytes): connection state lost")
                raise
            d._cur = -1
            return n
        finally:
            view.release()

    def _copy_out(self, buf: Buffer, offset: int, f: bytes) -> int:
        view = _wview(buf)
        try:
            n = len(f)
            if offset < 0 or offset > len(view):
                raise ValueError("offset out of bounds")
            if n > len(view) - offset:
                raise BufferTooShort(f)
            view[offset:offset + n] = f
            return n
        finally:
            view.release()

    def discard_frame(self) -> None:
        """Receive the next frame and drop it without allocating its size."""
        self._fdcheck()
        self._flush_first()
        d = self._decoder
        d._check()
        if d._target is not None:
            self.recv_frame()
            return
        while not d._parse_header(-1):
            self._fill(-1.0)
        left = d._cur
        k = min(left, d._wpos - d._rpos)
        d._consume(k)
        left -= k
        if left > 0:
            tmp = memoryview(bytearray(min(left, 65536)))
            try:
                while left > 0:
                    m = min(left, 65536)
                    r = self._read(tmp[:m] if m < len(tmp) else tmp, m, -1.0, False)
                    if r == 0:
                        d._broken = TruncatedFrameError(left)
                        raise d._broken
                    left -= r
                    d._received += r
            except BaseException:
                if d._broken is None:
                    d._broken = ProtocolError(
                        f"receive interrupted mid-frame ({d._cur - left} of {d._cur} bytes): "
                        "connection state lost")
                raise
        d._cur = -1

    def recv_frame_fds(self, maxfds: int = _MAX_FDS, timeout: float | None = None,
                       maxlength: SupportsInt | None = None) -> tuple[bytes, list[int]]:
        """Receive one frame and the descriptors that rode on it: ``(bytes, fds)``.

        Descriptors are matched to the frame they were sent with even when
        the channel has read ahead: a read that brings descriptors ends with
        the sender's message that carried them, so they belong to the last
        frame starting inside that read. More than ``maxfds`` closes them
        all and raises ProtocolError; a frame over ``maxlength`` raises
        MessageTooLarge, as recv_frame does.
        """
        # this class's receive, not a subclass's wrapper of it
        f = _ChannelIO.recv_frame(self, maxlength, timeout)
        d = self._decoder
        start = d._frame_start
        end = start + d._frame_hdr + len(f)
        fds = []
        keep = []
        for batch in self._fd_batches:
            if batch[0] <= start < batch[1] and end >= batch[1]:
                fds.extend(batch[2])
            elif batch[1] <= start:
                for x in batch[2]:
                    _close_fd(x)
            else:
                keep.append(batch)
        self._fd_batches = keep
        if len(fds) > maxfds:
            for x in fds:
                _close_fd(x)
            d._broken = ProtocolError(f"{len(fds)} descriptors arrived, at most {maxfds} were expected; closed them")
            raise d._broken
        return f, fds

    def pending_fds(self) -> int:
        """Number of received descriptors not yet claimed."""
        return sum(len(b[2]) for b in self._fd_batches)

    def has_frame(self) -> bool:
        """True if a whole frame is already buffered (recv will not block).

        Bytes an io holds (``pending()``) are taken into the buffer to tell.
        """
        d = self._decoder
        if d.has_frame():
            return True
        if self._io is not None and self._sock is not None:
            while self._io_pending() > 0 and not d.has_frame():
                self._fill(0.0)
        return d.has_frame()

    def buffered(self) -> int:
        """Number of received bytes not yet returned (with an io's pending() bytes)."""
        if self._io is not None and self._sock is not None:
            return self._decoder.buffered + self._io_pending()
        return self._decoder.buffered

    def poll(self, timeout: float | None = 0.0) -> bool:
        """True if a frame is buffered or the socket has data, waiting up to timeout."""
        self._fdcheck()
        self._flush_first()
        d = self._decoder
        if d._broken is not None:
            return True
        if d.buffered > 0:
            return True
        deadline = self._deadline(timeout)
        if self._io is None:
            return self._wait(_POLLIN, deadline)
        # a readable socket may carry only bytes the io keeps to itself (TLS
        # 1.3 session tickets): read into the buffer to know
        try:
            self._fill(deadline)
        except FastnetTimeout:
            return False
        except (EOFError, OSError):
            return True     # the receive that follows reports it
        return True
