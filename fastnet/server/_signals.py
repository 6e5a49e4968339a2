"""The stop signals of a server serving on the main thread."""
from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastnet.loop import EventLoop


class _StopSignals:
    """Handlers for ``sigs`` that call ``on_signal`` at once, then ``on_wake`` on the loop.

    Our own handlers rather than the loop's: a signal must also reach a
    blocking handler running on this (main) thread (``on_signal``). The
    handler takes no locks; it wakes the loop through a socket of its own.
    A signal ignored when serving starts (by whoever started the process)
    stays ignored.
    """

    def __init__(self, loop: EventLoop, sigs: Iterable[int], on_signal: Callable[[], None],
                 on_wake: Callable[[], None]) -> None:
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._loop = loop
        self._socks = (r, w)
        self._on_signal = on_signal
        self._on_wake = on_wake
        self._old: dict[int, Any] = {}
        loop.add_reader(r, self._wake)
        for sig in sigs:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._old[sig] = signal.signal(sig, self._signal)

    def _signal(self, signum: int, frame: FrameType | None) -> None:
        self._on_signal()
        try:
            self._socks[1].send(b"s")
        except OSError:
            pass

    def _wake(self) -> None:
        try:
            self._socks[0].recv(64)
        except OSError:
            pass
        self._on_wake()

    def remove(self) -> None:
        """Restore the signals' previous handlers and close the wake-up sockets."""
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old = {}
        if not self._loop.is_closed():
            self._loop.remove_reader(self._socks[0])
        for sk in self._socks:
            sk.close()
