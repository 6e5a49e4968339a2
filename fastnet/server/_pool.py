"""Threads of a server: the bounded pool whose completions come back on the
loop, and handle_request()'s thread per request."""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastnet.loop import EventLoop

# set on a pool thread: a shutdown() called from a handler there must not wait for itself
_local = threading.local()


class _Pool:
    """Up to ``size`` threads, started as work arrives, that report each task's end to the loop."""

    def __init__(self, loop: EventLoop, size: int, name: str) -> None:
        self.loop = loop
        self.size = size
        self.name = name
        self.q: queue.SimpleQueue[tuple[Callable[..., object], tuple[Any, ...],
                                        Callable[[BaseException | None], object]] | None] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []

    def submit(self, fn: Callable[..., object], args: tuple[Any, ...],
               done: Callable[[BaseException | None], object]) -> None:
        """Run ``fn(*args)`` on a pool thread, then ``done(exc_or_None)`` on the loop."""
        if len(self.threads) < self.size:
            t = threading.Thread(target=self._run, name=f"{self.name}-{len(self.threads)}", daemon=True)
            self.threads.append(t)
            t.start()
        self.q.put((fn, args, done))

    def _run(self) -> None:
        _local.in_handler = True
        while True:
            item = self.q.get()
            if item is None:
                return
            fn, args, done = item
            exc: BaseException | None = None
            try:
                fn(*args)
            except Exception as e:
                exc = e
            except BaseException as e:
                # SystemExit or KeyboardInterrupt would end a thread of its own
                # (socketserver's thread per request): report it the way such a
                # thread's death is reported, and live on to serve the next task
                exc = e
                _thread_died(e)
            try:
                self.loop.call_soon_threadsafe(done, exc)
            except RuntimeError:
                pass   # the loop closed: a forced shutdown, nobody to tell
            del item, fn, args, done, exc

    def stop(self, timeout: float) -> None:
        for _ in self.threads:
            self.q.put(None)
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))


def _thread_died(exc: BaseException) -> None:
    try:
        threading.excepthook(threading.ExceptHookArgs(
            (type(exc), exc, exc.__traceback__, threading.current_thread())))
    except Exception:
        pass


class _Threads(list[threading.Thread]):
    """The non-daemon threads of requests in progress; finished ones are dropped as new ones come."""

    def append(self, thread: threading.Thread) -> None:
        self[:] = [t for t in self if t.is_alive()]
        if not thread.daemon:
            super().append(thread)

    def join(self) -> None:
        me = threading.current_thread()
        threads, self[:] = self[:], []
        for t in threads:
            if t is not me:
                t.join()
