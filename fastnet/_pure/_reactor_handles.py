"""Handles and the descriptor table entry of the pure reactor (see reactor.py)."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastnet._pure._reactor_transport import FramedTransport
    from fastnet._pure.reactor import Reactor


class Handle:
    """A callback scheduled on a reactor; ``cancel()`` keeps it from running."""
    __slots__ = ("_callback", "_args", "_cancelled")
    _callback: Callable[..., object] | None
    _args: tuple[Any, ...] | None
    _cancelled: bool

    def __init__(self, callback: Callable[..., object], args: Iterable[Any] = ()) -> None:
        self._callback = callback
        self._args = tuple(args)
        self._cancelled = False

    def cancel(self) -> None:
        """Do not run the callback (a no-op once it ran)."""
        if not self._cancelled:
            self._cancelled = True
            self._callback = None
            self._args = None

    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def callback(self) -> Callable[..., object] | None:
        return self._callback

    @property
    def args(self) -> tuple[Any, ...] | None:
        return self._args

    def __repr__(self) -> str:
        state = " cancelled" if self._cancelled else ""
        return f"<{type(self).__name__} {self._callback!r}{state}>"


def _new_handle(callback: Callable[..., object], args: tuple[Any, ...]) -> Handle:
    h = Handle.__new__(Handle)
    h._callback = callback
    h._args = args
    h._cancelled = False
    return h


class TimerHandle(Handle):
    """A callback scheduled for a point on the reactor's monotonic clock."""
    __slots__ = ("_when", "_seq", "_scheduled", "_loop")
    _when: float
    _seq: int
    _scheduled: bool
    _loop: Reactor | None

    def __init__(self, *a: object) -> None:
        raise TypeError("TimerHandle is created by call_later/call_at")

    def when(self) -> float:
        """The monotonic time the callback is due."""
        return self._when

    def cancel(self) -> None:
        if not self._cancelled and self._scheduled and self._loop is not None:
            self._loop._timer_cancelled += 1
        Handle.cancel(self)


class _FdEntry:
    __slots__ = ("fd", "reader", "writer", "stream", "mask", "wake")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.reader: Handle | None = None
        self.writer: Handle | None = None
        self.stream: FramedTransport | None = None
        self.mask = 0
        self.wake = False


class _LostCall:
    """Calls protocol.connection_lost(exc) once, then forgets the protocol."""
    __slots__ = ("protocol", "exc")

    def __init__(self, protocol: Any, exc: BaseException | None) -> None:
        self.protocol = protocol
        self.exc = exc

    def __call__(self) -> None:
        p, exc = self.protocol, self.exc
        self.protocol = self.exc = None
        lost = getattr(p, "connection_lost", None)
        if lost is not None:
            lost(exc)
