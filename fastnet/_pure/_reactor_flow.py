"""TransportBase of the pure reactor (see reactor.py): what the loop's transports share.

The twin of src_c/reactor_flow.pxi, with the same hooks: _reading_changed,
_schedule_drain, _flush_then_close and _finalize are where FramedTransport
and fastnet.tls.TLSTransport differ; _wq_bytes is all a transport holds
that the kernel has not taken, kept so by each subclass.
"""
from __future__ import annotations

import socket as _socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastnet._pure.reactor import Reactor

DEFAULT_HIGH_WATER = 1 << 20


class TransportBase:
    """What the loop's transports share: flow control, state and the protocol's callbacks.

    Queued bytes above the high-water mark pause reading and call the
    protocol's ``pause_writing()``; at or below the low-water mark reading
    resumes and ``resume_writing()`` is called. Not made directly: see
    ``Reactor.add_stream`` and ``fastnet.tls.TLSTransport``.
    """

    # the compiled base's fields: a subclass's __slots__ work alike on both kernel sets
    __slots__ = ("_loop", "_sock", "_fd", "_protocol", "_max_size", "_high", "_low", "_wq_bytes",
                 "_user_paused", "_bp_paused", "_closing", "_closed", "_eof", "_pauses")

    def __init__(self, *a: object, **k: object) -> None:
        raise TypeError("TransportBase is the base of the loop's transports, not one itself")

    def _setup(self, loop: Reactor, sock: _socket.socket, fd: int, protocol: Any,
               max_message_size: int | None, high_water: int | None, low_water: int | None) -> None:
        """Attach to ``loop`` and ``sock``; the subclass's constructor calls this first."""
        self._loop = loop
        self._sock = sock
        self._fd = fd
        self._protocol = protocol
        self._max_size = -1 if max_message_size is None else max_message_size
        self._wq_bytes = 0
        self._user_paused = self._bp_paused = False
        self._closing = self._closed = False
        self._eof = False           # the peer ended its stream
        self._pauses = 0
        self.set_write_buffer_limits(high_water, low_water)

    # -- the hooks ------------------------------------------------------------

    def _reading_changed(self) -> None:
        """Hand the wish to read (pause flags, closing) to the loop."""
        raise NotImplementedError

    def _schedule_drain(self) -> None:
        """Deliver later what was received while reading was paused."""
        raise NotImplementedError

    def _flush_then_close(self) -> None:
        """close() was called: send what is queued, then finalize."""
        raise NotImplementedError

    def _finalize(self, exc: BaseException | None) -> None:
        """Close the socket now and call connection_lost(exc) once."""
        raise NotImplementedError

    # -- flow control ---------------------------------------------------------

    def _report(self, exc: BaseException, message: str) -> None:
        """Hand an exception from a callback to the loop's exception handler."""
        self._loop._report(exc, message, self)

    def _check_high(self) -> None:
        """Pause reading and the protocol's writing if more than the high-water mark is queued."""
        if self._bp_paused or self._closed or self._wq_bytes <= self._high:
            return
        self._bp_paused = True
        self._pauses += 1
        self._reading_changed()
        pw = getattr(self._protocol, "pause_writing", None)
        if pw is not None:
            try:
                pw()
            except Exception as exc:
                self._loop._report(exc, "exception in pause_writing", self)

    def _check_low(self) -> None:
        """Undo _check_high once the queue is down to the low-water mark."""
        if not self._bp_paused or self._closed or self._wq_bytes > self._low:
            return
        self._bp_paused = False
        self._reading_changed()
        rw = getattr(self._protocol, "resume_writing", None)
        if rw is not None:
            try:
                rw()
            except Exception as exc:
                self._loop._report(exc, "exception in resume_writing", self)
        self._schedule_drain()

    def pause_reading(self) -> None:
        """Stop calling message_received until resume_reading()."""
        if self._closed or self._user_paused:
            return
        self._user_paused = True
        self._reading_changed()

    def resume_reading(self) -> None:
        """Undo pause_reading(); frames received meanwhile are delivered first."""
        if self._closed or not self._user_paused:
            return
        self._user_paused = False
        self._reading_changed()
        self._schedule_drain()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Queued bytes above ``high`` pause reading; at or below ``low`` it resumes."""
        if high is None:
            high = DEFAULT_HIGH_WATER if low is None else max(4 * low, DEFAULT_HIGH_WATER)
        if low is None:
            low = high // 4
        if not 0 <= low <= high:
            raise ValueError(f"need 0 <= low ({low}) <= high ({high})")
        self._high = high
        self._low = low

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def get_write_buffer_size(self) -> int:
        """Bytes queued and not yet taken by the kernel."""
        return self._wq_bytes

    @property
    def reading_paused(self) -> bool:
        """True while reading is paused (by pause_reading or by backpressure)."""
        return self._user_paused or self._bp_paused

    def _want_read(self) -> bool:
        return not (self._user_paused or self._bp_paused or self._closing or self._eof)

    @property
    def _reading_wanted(self) -> bool:
        """_want_read for Python subclasses (a property, as the compiled base's)."""
        return self._want_read()

    # -- state ----------------------------------------------------------------
    # read-only, as the compiled TransportBase's readonly attributes

    @property
    def protocol(self) -> Any:
        return self._protocol

    @property
    def pauses(self) -> int:
        """Times the write queue went over the high-water mark and paused the protocol's writing."""
        return self._pauses

    @property
    def max_message_size(self) -> int | None:
        return None if self._max_size < 0 else self._max_size

    @property
    def socket(self) -> _socket.socket:
        return self._sock

    @property
    def loop(self) -> Reactor:
        return self._loop

    def fileno(self) -> int:
        return self._fd if not self._closed else -1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """'peername', 'sockname' or 'socket', as asyncio transports."""
        if name == "socket":
            return self._sock
        if self._closed:
            return default
        try:
            if name == "peername":
                return self._sock.getpeername()
            if name == "sockname":
                return self._sock.getsockname()
        except OSError:
            return default
        return default

    def is_closing(self) -> bool:
        return self._closing or self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop reading, send what is queued, then close."""
        if self._closing or self._closed:
            return
        self._closing = True
        self._flush_then_close()

    def abort(self) -> None:
        """Close now, dropping queued bytes."""
        self._finalize(None)
