"""FramedTransport of the pure reactor (see reactor.py): frames over a stream socket."""
from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from fastnet._pure.framing import FrameDecoder

from fastnet._pure._reactor_flow import TransportBase
from fastnet._pure._reactor_handles import _FdEntry, _LostCall, _new_handle
from fastnet._pure.framing import _header
from fastnet.errors import ProtocolError, MessageTooLarge, TruncatedFrameError

#: Payloads up to this size are copied next to their header and sent with one
#: send(); larger ones go out without a copy.
COPY_THRESHOLD = 65536

_IOV_MAX = 1024
_DECODER_BUFSIZE = 1024
_DIRECT_READ = 65536
_RETRY = (BlockingIOError, InterruptedError)
_FrameDecoder: type[FrameDecoder] | None = None


def _decoder_class() -> type[FrameDecoder]:
    global _FrameDecoder
    if _FrameDecoder is None:
        from fastnet._pure.framing import FrameDecoder
        _FrameDecoder = FrameDecoder
    return _FrameDecoder


def as_frame(b: Buffer) -> bytes | memoryview:
    """bytes as they are; another buffer as a flat byte view of it, copied only if not contiguous.

    What a transport queues for a frame's payload (the TLS transport too).
    """
    if type(b) is bytes:
        return b
    mv = memoryview(b)
    if not mv.c_contiguous:
        return mv.tobytes()
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


class FramedTransport(TransportBase):
    """Length-prefixed frames over a non-blocking stream socket on a Reactor.

    Created by ``Reactor.add_stream``. ``send_bytes`` / ``send_many`` try the
    send syscall at once and queue only what the kernel did not take; more
    than the high-water mark queued pauses reading until the queue drains to
    the low-water mark. ``close()`` sends what is queued, then closes;
    ``abort()`` closes now. ``protocol.connection_lost(exc)`` is called once,
    with the error (a bad frame from the peer, a socket error) or None.
    """

    def __init__(self, *a: object, **k: object) -> None:
        raise TypeError("FramedTransport is created by Reactor.add_stream")

    _entry: _FdEntry
    _on_message: Callable[[bytes], object]
    _decoder: FrameDecoder | None
    _wq: collections.deque[bytes | memoryview]

    def _init(self, entry: _FdEntry, on_message: Callable[[bytes], object]) -> None:
        """What this transport adds to TransportBase._setup."""
        self._entry = entry
        self._on_message = on_message
        self._decoder = None
        self._dirty = False
        self._wq = collections.deque()
        self._wq_off = 0
        self._writing = self._drain_scheduled = False
        self._messages_received = self._messages_sent = 0
        self._bytes_received = self._bytes_sent = 0

    # -- reading ------------------------------------------------------------

    def _read_ready(self) -> None:
        d = self._decoder
        if d is None:
            d = self._decoder = _decoder_class()(
                None if self._max_size < 0 else self._max_size, _DECODER_BUFSIZE)
        try:
            if self._dirty and d.needed >= _DIRECT_READ:
                region = d.get_buffer()
                n = self._sock.recv_into(region)
                if n:
                    d.buffer_updated(n)
            else:
                view = self._loop._rview
                n = self._sock.recv_into(view)
                if n:
                    try:
                        d.feed(view[:n])
                    except (ProtocolError, MessageTooLarge) as exc:
                        self._finalize(exc)
                        return
        except _RETRY:
            return
        except OSError as exc:
            self._finalize(exc)
            return
        if n == 0:
            self._on_eof()
            return
        self._bytes_received += n
        self._dirty = True
        self._drain()

    def _drain(self) -> None:
        d = self._decoder
        assert d is not None
        while self._want_read():
            try:
                frame = d.next_frame()
            except (ProtocolError, MessageTooLarge) as exc:
                self._finalize(exc)
                return
            if frame is None:
                break
            self._messages_received += 1
            self._deliver(frame)
        if not self._closed and d.buffered == 0 and d.needed == 0:
            self._dirty = False

    def _drain_later(self) -> None:
        self._drain_scheduled = False
        if self._dirty and not self._closed and self._want_read():
            try:
                self._drain()
            except Exception as exc:
                self._loop._report(exc, "exception in transport", self)
                self._finalize(exc)

    def _deliver(self, frame: bytes) -> None:
        try:
            self._on_message(frame)
        except Exception as exc:
            self._loop._report(exc, "exception in message_received", self)
            self._finalize(exc)

    def _on_eof(self) -> None:
        self._eof = True
        if self._dirty:
            try:
                assert self._decoder is not None
                self._decoder.eof()
            except TruncatedFrameError as exc:
                self._finalize(exc)
                return
        if self._wq:
            self._closing = True
            self._loop._update(self._entry)
        else:
            self._finalize(None)

    # -- writing ------------------------------------------------------------

    def send_bytes(self, data: Buffer) -> None:
        """Send one frame holding the bytes of ``data`` (any contiguous buffer)."""
        if self._closing or self._closed:
            raise ConnectionError("send on a closed transport")
        if type(data) is not bytes:
            data = memoryview(data)
            if not data.contiguous:
                raise BufferError("memoryview: underlying buffer is not contiguous")
            data = data.cast("B") if data.ndim != 1 or data.format != "B" else data
        n = len(data)
        self._messages_sent += 1
        if n <= COPY_THRESHOLD:
            buf = _header(n) + data
            if self._wq:
                self._enqueue(buf, 0)
                return
            r = self._try_send(buf)
            if 0 <= r < len(buf):
                self._enqueue(buf[r:], 0)
            return
        hdr = _header(n)
        r = 0
        if not self._wq:
            r = self._try_sendv([hdr, data])
            if r < 0 or r == len(hdr) + n:
                return
        if r < len(hdr):
            self._enqueue(hdr[r:], 0)
            r = len(hdr)
        if type(data) is bytes:
            self._enqueue(data, r - len(hdr))
        else:
            self._enqueue(bytes(data[r - len(hdr):]), 0)

    def send_many(self, buffers: Iterable[Buffer]) -> None:
        """Send each buffer of ``buffers`` as its own frame, in one syscall when they fit.

        Large buffers other than bytes are sent from their own memory, not
        copied: leave them unchanged until they are sent.
        """
        if self._closing or self._closed:
            raise ConnectionError("send on a closed transport")
        items = [as_frame(b) for b in buffers]
        if not items:
            return
        self._messages_sent += len(items)
        total = sum(len(b) + (4 if len(b) <= 0x7fffffff else 12) for b in items)
        if total <= COPY_THRESHOLD:
            buf = b"".join([x for b in items for x in (_header(len(b)), b)])
            if self._wq:
                self._enqueue(buf, 0)
                return
            r = self._try_send(buf)
            if 0 <= r < len(buf):
                self._enqueue(buf[r:], 0)
            return
        pieces = [x for b in items for x in (_header(len(b)), b)]
        r = 0
        if not self._wq:
            r = self._try_sendv(pieces[:_IOV_MAX])
            if r < 0:
                return
        i = 0
        while i < len(pieces) and r >= len(pieces[i]):
            r -= len(pieces[i])
            i += 1
        first = True
        for p in pieces[i:]:
            self._enqueue(p, r if first else 0)
            first = False

    def _try_send(self, buf: Buffer) -> int:
        try:
            r = self._sock.send(buf)
        except _RETRY:
            return 0
        except OSError as exc:
            self._finalize(exc)
            return -1
        self._bytes_sent += r
        return r

    def _try_sendv(self, pieces: list[Any]) -> int:
        try:
            r = self._sock.sendmsg(pieces)
        except _RETRY:
            return 0
        except OSError as exc:
            self._finalize(exc)
            return -1
        self._bytes_sent += r
        return r

    def _enqueue(self, b: bytes | memoryview, off: int) -> None:
        if self._closed:
            return
        if not self._wq:
            self._wq_off = off
        self._wq.append(b)
        self._wq_bytes += len(b) - off
        if not self._writing:
            self._writing = True
            self._loop._update(self._entry)
        self._check_high()

    def _write_ready(self) -> None:
        loop = self._loop
        wq = self._wq
        if not wq:
            self._writing = False
            loop._update(self._entry)
            return
        pieces = []
        off = self._wq_off
        for i, b in enumerate(wq):
            if i == _IOV_MAX:
                break
            pieces.append(memoryview(b)[off:] if off else b)
            off = 0
        r = self._try_sendv(pieces)
        if r <= 0:
            return
        self._wq_bytes -= r
        off = self._wq_off
        while wq:
            sz = len(wq[0]) - off
            if r >= sz:
                r -= sz
                off = 0
                wq.popleft()
            else:
                off += r
                break
        self._wq_off = off
        if not wq:
            self._writing = False
            self._wq_off = 0
            if self._closing:
                self._finalize(None)
                return
            loop._update(self._entry)
        self._check_low()

    def _schedule_drain(self) -> None:
        if self._dirty and not self._drain_scheduled and not self._closed:
            self._drain_scheduled = True
            self._loop._ready.append(_new_handle(self._drain_later, ()))

    # read-only, as the compiled FramedTransport's readonly attributes
    @property
    def messages_received(self) -> int:
        return self._messages_received

    @property
    def messages_sent(self) -> int:
        return self._messages_sent

    @property
    def bytes_received(self) -> int:
        return self._bytes_received

    @property
    def bytes_sent(self) -> int:
        return self._bytes_sent

    def _reading_changed(self) -> None:
        self._loop._update(self._entry)

    # -- control ------------------------------------------------------------

    def _flush_then_close(self) -> None:
        if not self._wq:
            self._finalize(None)
        else:
            self._loop._update(self._entry)

    def _finalize(self, exc: BaseException | None) -> None:
        if self._closed:
            return
        loop = self._loop
        self._closed = True
        self._closing = True
        self._writing = False
        self._wq = collections.deque()
        self._wq_bytes = 0
        self._decoder = None
        self._dirty = False
        e = self._entry
        if e is not None:
            e.stream = None
            if not loop._closed:
                loop._update(e)
            self._entry = None  # type: ignore[assignment]
        loop._streams.discard(self)
        try:
            self._sock.close()
        except OSError:
            pass
        self._on_message = None  # type: ignore[assignment]
        loop._ready.append(_new_handle(_LostCall(self._protocol, exc), ()))

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("closing" if self._closing else f"fd={self._fd}")
        return f"<FramedTransport {state} queued={self._wq_bytes}>"
