"""Reactor: readiness dispatch, timers and framed stream transports (pure twin).

The pure-Python twin of ``src_c/reactor.pyx``: the same classes, methods and
behaviour over ``select.epoll``, ``select.poll`` and ``select.select``. See
the compiled kernel's docstring for the design; this file mirrors it.
"""
from __future__ import annotations

import collections
import errno as _errno
import heapq
import os
import select as _select
import socket as _socket
import sys
import threading
import time as _time
import traceback
from collections.abc import Callable
from typing import Any

# One piece of the kernel per module, as src_c/reactor.pyx includes one
# file per piece; this module is the one users and stubs see.
from fastnet._pure._reactor_handles import Handle as Handle, TimerHandle as TimerHandle
from fastnet._pure._reactor_handles import _FdEntry, _LostCall, _new_handle
from fastnet._pure._reactor_flow import DEFAULT_HIGH_WATER as DEFAULT_HIGH_WATER
from fastnet._pure._reactor_flow import TransportBase as TransportBase
from fastnet._pure._reactor_transport import (COPY_THRESHOLD as COPY_THRESHOLD,
                                             FramedTransport as FramedTransport, as_frame as as_frame)

BACKENDS = ("epoll", "poll", "select")
SELECT_FD_LIMIT = 1024
RECV_BUFSIZE = 262144

_READ = 1
_WRITE = 2


def default_backend() -> str:
    """The backend "auto" picks: epoll on Linux."""
    return "epoll" if hasattr(_select, "epoll") else "poll"


def _closed_error() -> RuntimeError:
    return RuntimeError("the event loop is closed")


def _fd_of(obj: int | _socket.socket) -> int:
    fd = obj if isinstance(obj, int) else obj.fileno()
    if fd < 0:
        raise ValueError(f"invalid file descriptor {fd}")
    return fd


class Reactor:
    """Readiness dispatch, timers and a ready queue on one thread.

    ``Reactor(backend="auto", spin=0.0)``; backend is "epoll", "poll" or
    "select". ``spin`` (microseconds, 0: off) busy-polls before each wait
    that would block: the backend is polled with a zero timeout until
    something is ready or ``min(spin, timeout)`` has passed, and only then
    does the reactor sleep for what is left of the timeout.
    Every method except ``call_soon_threadsafe`` and ``stop`` belongs to the
    thread that runs the reactor.
    """

    _fds: dict[int, _FdEntry]
    _ready: collections.deque[Handle]
    _heap: list[tuple[float, int, TimerHandle]]
    _streams: set[FramedTransport]
    _epoll: _select.epoll | None
    _pollobj: _select.poll | None
    _rset: set[int]
    _wset: set[int]
    _wake_socks: tuple[_socket.socket, _socket.socket] | None

    def __init__(self, backend: str = "auto", spin: float = 0.0) -> None:
        if getattr(self, "_ready_init", False):
            raise RuntimeError("Reactor.__init__ called twice")
        self._closed = True
        if backend == "auto":
            backend = default_backend()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use 'auto', 'epoll', 'poll' or 'select'")
        spin = float(spin)
        if not spin >= 0.0:
            raise ValueError("spin must be >= 0 microseconds")
        self._backend = backend
        self._spin_us = spin
        self._spin_s = spin * 1e-6
        self._fds = {}
        self._ready = collections.deque()
        self._heap = []
        self._timer_cancelled = 0
        self._seq = 0
        self._streams = set()
        self._woken = False
        self._stopping = False
        self._running = False
        self._wake_lock = threading.Lock()
        self._rbuf = bytearray(RECV_BUFSIZE)
        self._rview = memoryview(self._rbuf)
        self._ctl_calls = 0
        self._iterations = 0
        self._epoll = self._pollobj = None
        self._rset = set()
        self._wset = set()
        if backend == "epoll":
            self._epoll = _select.epoll()
        elif backend == "poll":
            self._pollobj = _select.poll()
        self._ready_init = True
        self._closed = False
        self._open_wake()

    # -- wake-up descriptor -------------------------------------------------

    def _open_wake(self) -> None:
        self._wake_socks = None
        if hasattr(os, "eventfd"):
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._wake_r = self._wake_w = fd
            self._wake_is_eventfd = True
        else:
            a, b = _socket.socketpair()
            a.setblocking(False)
            b.setblocking(False)
            self._wake_socks = (a, b)
            self._wake_r, self._wake_w = a.fileno(), b.fileno()
            self._wake_is_eventfd = False
        e = self._entry(self._wake_r)
        e.wake = True
        self._update(e)

    def _drain_wake(self) -> None:
        try:
            if self._wake_is_eventfd:
                os.read(self._wake_r, 8)
            else:
                while os.read(self._wake_r, 256):
                    pass
        except OSError:
            pass
        self._woken = False

    def _wakeup(self) -> None:
        # the lock keeps close() from freeing the descriptor between the
        # check and the write (a reused fd number would get our bytes)
        with self._wake_lock:
            if self._closed:
                raise _closed_error()
            if not self._woken:
                self._woken = True
                try:
                    if self._wake_is_eventfd:
                        os.write(self._wake_w, (1).to_bytes(8, sys.byteorder))
                    else:
                        os.write(self._wake_w, b"x")
                except BlockingIOError:
                    pass

    # -- descriptor table and interest ----------------------------------------

    def _entry(self, fd: int) -> _FdEntry:
        if self._backend == "select" and fd >= SELECT_FD_LIMIT:
            raise ValueError(
                f"the select backend cannot watch descriptor {fd}: select() is limited to "
                f"descriptors below FD_SETSIZE={SELECT_FD_LIMIT}; use backend='epoll' or 'poll'")
        e = self._fds.get(fd)
        if e is None:
            e = self._fds[fd] = _FdEntry(fd)
        return e

    def _update(self, e: _FdEntry) -> None:
        want = 0
        s = e.stream
        if e.wake or e.reader is not None or (s is not None and s._want_read()):
            want |= _READ
        if e.writer is not None or (s is not None and s._writing):
            want |= _WRITE
        if want != e.mask:
            if self._epoll is not None:
                self._ctl_epoll(e, want)
            elif self._pollobj is not None:
                self._ctl_poll(e, want)
            else:
                self._ctl_select(e, want)
            e.mask = want
            self._ctl_calls += 1
        if want == 0 and e.reader is None and e.writer is None and s is None and not e.wake:
            if self._fds.get(e.fd) is e:
                del self._fds[e.fd]

    def _ctl_epoll(self, e: _FdEntry, want: int) -> None:
        ev = (_select.EPOLLIN if want & _READ else 0) | (_select.EPOLLOUT if want & _WRITE else 0)
        ep = self._epoll
        assert ep is not None
        if e.mask == 0:
            try:
                ep.register(e.fd, ev)
            except FileExistsError:
                ep.modify(e.fd, ev)
        elif want == 0:
            try:
                ep.unregister(e.fd)
            except (FileNotFoundError, OSError) as exc:
                if exc.errno not in (_errno.ENOENT, _errno.EBADF):
                    raise
        else:
            try:
                ep.modify(e.fd, ev)
            except FileNotFoundError:
                ep.register(e.fd, ev)

    def _ctl_poll(self, e: _FdEntry, want: int) -> None:
        ev = (_select.POLLIN if want & _READ else 0) | (_select.POLLOUT if want & _WRITE else 0)
        assert self._pollobj is not None
        if want == 0:
            try:
                self._pollobj.unregister(e.fd)
            except KeyError:
                pass
        elif e.mask == 0:
            self._pollobj.register(e.fd, ev)
        else:
            self._pollobj.modify(e.fd, ev)

    def _ctl_select(self, e: _FdEntry, want: int) -> None:
        (self._rset.add if want & _READ else self._rset.discard)(e.fd)
        (self._wset.add if want & _WRITE else self._wset.discard)(e.fd)

    def _check_open(self) -> None:
        if self._closed:
            raise _closed_error()

    # -- readiness API ----------------------------------------------------

    def add_reader(self, fd: int | _socket.socket, callback: Callable[..., object], *args: Any) -> None:
        """Call ``callback(*args)`` whenever fd is readable (replaces a previous reader)."""
        f = _fd_of(fd)
        self._check_open()
        if not callable(callback):
            raise TypeError("callback must be callable")
        e = self._entry(f)
        if e.stream is not None or e.wake:
            raise ValueError(f"descriptor {f} is owned by a transport of this loop")
        e.reader = _new_handle(callback, args)
        self._update(e)

    def add_writer(self, fd: int | _socket.socket, callback: Callable[..., object], *args: Any) -> None:
        """Call ``callback(*args)`` whenever fd is writable (replaces a previous writer)."""
        f = _fd_of(fd)
        self._check_open()
        if not callable(callback):
            raise TypeError("callback must be callable")
        e = self._entry(f)
        if e.stream is not None or e.wake:
            raise ValueError(f"descriptor {f} is owned by a transport of this loop")
        e.writer = _new_handle(callback, args)
        self._update(e)

    def remove_reader(self, fd: int | _socket.socket) -> bool:
        """Stop watching fd for reading; True if it was watched."""
        if self._closed:
            return False
        e = self._fds.get(_fd_of(fd))
        if e is None or e.reader is None:
            return False
        e.reader = None
        self._update(e)
        return True

    def remove_writer(self, fd: int | _socket.socket) -> bool:
        """Stop watching fd for writing; True if it was watched."""
        if self._closed:
            return False
        e = self._fds.get(_fd_of(fd))
        if e is None or e.writer is None:
            return False
        e.writer = None
        self._update(e)
        return True

    def interest(self, fd: int | _socket.socket) -> set[str]:
        """The events registered for fd now: a subset of {"read", "write"}."""
        e = self._fds.get(_fd_of(fd))
        out = set()
        if e is not None:
            if e.mask & _READ:
                out.add("read")
            if e.mask & _WRITE:
                out.add("write")
        return out

    # read-only, as the compiled Reactor's ``readonly`` attributes
    @property
    def backend(self) -> str:
        """The readiness backend: "epoll", "poll" or "select"."""
        return self._backend

    @property
    def spin(self) -> float:
        """Microseconds each wait that would block busy-polls first (0: none)."""
        return self._spin_us

    @property
    def ctl_calls(self) -> int:
        """Calls that changed the backend's interest set (epoll_ctl, poll.register, ...)."""
        return self._ctl_calls

    @property
    def iterations(self) -> int:
        """Loop iterations run so far."""
        return self._iterations

    @property
    def registered(self) -> int:
        """Number of descriptors the backend watches now (the wake-up one included)."""
        return sum(1 for e in self._fds.values() if e.mask)

    # -- time and callbacks ---------------------------------------------------

    def time(self) -> float:
        """The reactor's clock: monotonic seconds (time.monotonic())."""
        return _time.monotonic()

    def call_soon(self, callback: Callable[..., object], *args: Any) -> Handle:
        """Run ``callback(*args)`` on the next iteration, in call order; returns a Handle."""
        self._check_open()
        if not callable(callback):
            raise TypeError("callback must be callable")
        h = _new_handle(callback, args)
        self._ready.append(h)
        return h

    def call_soon_threadsafe(self, callback: Callable[..., object], *args: Any) -> Handle:
        """call_soon from any thread: queues the callback and wakes the reactor."""
        if not callable(callback):
            raise TypeError("callback must be callable")
        h = _new_handle(callback, args)
        if self._closed:
            raise _closed_error()
        self._ready.append(h)
        self._wakeup()
        return h

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> TimerHandle:
        """Run ``callback(*args)`` after delay seconds; returns a cancellable TimerHandle."""
        return self._call_at(_time.monotonic() + float(delay), callback, args)

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> TimerHandle:
        """Run ``callback(*args)`` at ``when`` on the reactor's clock (see time())."""
        return self._call_at(float(when), callback, args)

    def _call_at(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]) -> TimerHandle:
        self._check_open()
        if not callable(callback):
            raise TypeError("callback must be callable")
        t = TimerHandle.__new__(TimerHandle)
        t._callback = callback
        t._args = args
        t._cancelled = False
        t._when = when
        t._seq = self._seq
        self._seq += 1
        t._scheduled = True
        t._loop = self
        heapq.heappush(self._heap, (when, t._seq, t))
        return t

    def _heap_pop(self) -> TimerHandle:
        t = heapq.heappop(self._heap)[2]
        t._scheduled = False
        t._loop = None
        return t

    def _compact_timers(self) -> None:
        keep = []
        for item in self._heap:
            t = item[2]
            if t._cancelled:
                t._scheduled = False
                t._loop = None
            else:
                keep.append(item)
        heapq.heapify(keep)
        self._heap = keep
        self._timer_cancelled = 0

    @property
    def timers(self) -> int:
        """Number of timers scheduled and not cancelled."""
        return len(self._heap) - self._timer_cancelled

    # -- running ------------------------------------------------------------

    def is_running(self) -> bool:
        return self._running

    def is_closed(self) -> bool:
        return self._closed

    def stop(self) -> None:
        """Return from run_forever/run_until after the current iteration (any thread)."""
        self._stopping = True
        if not self._closed:
            self._wakeup()

    def _enter(self) -> None:
        self._check_open()
        if self._running:
            raise RuntimeError("the event loop is already running")
        self._running = True

    def run_forever(self) -> None:
        """Dispatch events, timers and callbacks until stop() is called."""
        self._enter()
        try:
            while True:
                self._run_once(-1.0)
                if self._stopping:
                    break
        finally:
            self._stopping = False
            self._running = False

    def run_until(self, predicate: Callable[[], object] | float | None = None, timeout: float | None = None,
                  interval: float | None = 0.05) -> bool:
        """Run until ``predicate()`` is true or ``timeout`` seconds pass.

        ``run_until(5.0)`` runs for five seconds. The predicate is checked
        after every iteration and at least every ``interval`` seconds, so it
        may watch things the loop does not (a thread, a child process).
        Returns True if the predicate became true (or, without one, if
        stop() was called) and False if the timeout passed first.
        """
        if predicate is not None and not callable(predicate):
            if timeout is not None:
                raise TypeError("predicate must be callable")
            timeout, predicate = predicate, None
        deadline = -1.0
        if timeout is not None:
            deadline = _time.monotonic() + max(float(timeout), 0.0)
        step = -1.0 if predicate is None or interval is None else max(float(interval), 0.0)
        self._enter()
        try:
            while True:
                if predicate is not None and predicate():
                    return True
                if self._stopping:
                    return predicate is None
                wait = step
                if deadline >= 0:
                    left = deadline - _time.monotonic()
                    if left <= 0:
                        return False
                    if wait < 0 or left < wait:
                        wait = left
                self._run_once(wait)
        finally:
            self._stopping = False
            self._running = False

    def run_once(self, timeout: float | None = None) -> None:
        """One iteration: wait up to timeout (None: until something happens), dispatch."""
        self._enter()
        try:
            self._run_once(-1.0 if timeout is None else max(float(timeout), 0.0))
        finally:
            self._running = False

    def _run_once(self, max_timeout: float) -> None:
        self._iterations += 1
        if self._timer_cancelled > 64 and 2 * self._timer_cancelled > len(self._heap):
            self._compact_timers()
        heap = self._heap
        while heap and heap[0][2]._cancelled:
            self._heap_pop()
            self._timer_cancelled -= 1
        if self._ready or self._stopping:
            timeout = 0.0
        elif heap:
            timeout = max(heap[0][0] - _time.monotonic(), 0.0)
            if 0 <= max_timeout < timeout:
                timeout = max_timeout
        else:
            timeout = max_timeout
        self._poll(timeout)
        heap = self._heap
        if heap:
            now = _time.monotonic()
            ready = self._ready
            while heap:
                when, _, t = heap[0]
                if t._cancelled:
                    self._heap_pop()
                    self._timer_cancelled -= 1
                elif when <= now:
                    ready.append(self._heap_pop())
                else:
                    break
        ready = self._ready
        for _ in range(len(ready)):
            h = ready.popleft()
            if not h._cancelled:
                self._run_handle(h)

    def _run_handle(self, h: Handle) -> None:
        try:
            h._callback(*h._args)  # type: ignore[misc]  # a handle run is never cancelled
        except Exception as exc:
            self._report(exc, "exception in callback", h)

    def _report(self, exc: BaseException, message: str, obj: object) -> None:
        try:
            self.call_exception_handler({"message": message, "exception": exc, "object": obj})
        except Exception:
            traceback.print_exc()

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        """Report an exception a callback raised (the loop logs; this prints)."""
        exc = context.get("exception")
        print(f"fastnet reactor: {context.get('message')} ({context.get('object')!r})", file=sys.stderr)
        if exc is not None:
            traceback.print_exception(type(exc), exc, exc.__traceback__)

    # -- polling ----------------------------------------------------------------

    def _poll(self, timeout: float) -> bool:
        """Wait up to timeout (< 0: forever), busy-polling first with ``spin``,
        and dispatch what is ready; True if anything was."""
        if timeout > 86400.0:
            timeout = 86400.0
        if self._spin_s > 0.0 and timeout != 0:
            left = self._spin(timeout)
            if left is None:
                return True
            timeout = left
        dispatch = self._dispatch
        if self._epoll is not None:
            IN = _select.EPOLLIN | _select.EPOLLERR | _select.EPOLLHUP
            OUT = _select.EPOLLOUT | _select.EPOLLERR | _select.EPOLLHUP
            events = self._epoll.poll(timeout if timeout >= 0 else -1, max(len(self._fds), 1))
            for fd, ev in events:
                dispatch(fd, (_READ if ev & IN else 0) | (_WRITE if ev & OUT else 0))
            return bool(events)
        if self._pollobj is not None:
            bad = _select.POLLERR | _select.POLLHUP | _select.POLLNVAL
            IN = _select.POLLIN | bad
            OUT = _select.POLLOUT | bad
            ms = None if timeout < 0 else int(timeout * 1000 + 0.999)
            pevents = self._pollobj.poll(ms)
            for fd, ev in pevents:
                dispatch(fd, (_READ if ev & IN else 0) | (_WRITE if ev & OUT else 0))
            return bool(pevents)
        r, w, _ = _select.select(self._rset, self._wset, [], None if timeout < 0 else timeout)
        if w:
            ws = set(w)
            for fd in r:
                dispatch(fd, _READ | (_WRITE if fd in ws else 0))
                ws.discard(fd)
            for fd in ws:
                dispatch(fd, _WRITE)
        else:
            for fd in r:
                dispatch(fd, _READ)
        return bool(r or w)

    def _spin(self, timeout: float) -> float | None:
        """Poll with a zero timeout until something is ready (dispatched; None
        returned) or min(spin, timeout) has passed (timeout < 0: forever, so
        the spin's whole budget); then return what is left of the wait, so a
        timer never fires late for the spin nor early for the wait after it."""
        start = now = _time.monotonic()
        until = start + (timeout if 0 <= timeout < self._spin_s else self._spin_s)
        poll = self._poll
        while True:
            if poll(0.0):
                return None
            os.sched_yield()    # as the framing kernel's spin: a peer sharing this CPU answers first
            now = _time.monotonic()
            if now >= until:
                break
        return max(start + timeout - now, 0.0) if timeout > 0 else timeout

    def _dispatch(self, fd: int, m: int) -> None:
        e = self._fds.get(fd)
        if e is None:
            return
        s = e.stream
        if s is not None:
            try:
                if m & _READ and s._want_read():
                    s._read_ready()
                if m & _WRITE and s._writing and not s._closed:
                    s._write_ready()
            except Exception as exc:
                self._report(exc, "exception in transport", s)
                s._finalize(exc)
            return
        if e.wake:
            self._drain_wake()
            return
        if m & _READ:
            h = e.reader
            if h is not None:
                self._run_handle(h)
        if m & _WRITE:
            h = e.writer
            if h is not None:
                self._run_handle(h)

    # -- streams ------------------------------------------------------------

    def add_stream(self, sock: _socket.socket, protocol: Any, max_message_size: int | None = None,
                   high_water: int | None = None, low_water: int | None = None) -> FramedTransport:
        """Run a framed ``protocol`` on a connected stream socket; returns its FramedTransport.

        The transport owns the socket from here on (it is made non-blocking
        and closed with the transport). ``protocol.message_received(bytes)``
        is called per frame; ``connection_made(transport)``,
        ``connection_lost(exc)``, ``pause_writing()`` and ``resume_writing()``
        are called when the protocol has them.
        """
        self._check_open()
        on_message = protocol.message_received
        sock.setblocking(False)
        fd = _fd_of(sock)
        e = self._entry(fd)
        if e.reader is not None or e.writer is not None or e.stream is not None or e.wake:
            raise ValueError(f"descriptor {fd} is already watched by this loop")
        t = FramedTransport.__new__(FramedTransport)
        t._setup(self, sock, fd, protocol, max_message_size, high_water, low_water)
        t._init(e, on_message)
        e.stream = t
        self._streams.add(t)
        made = getattr(protocol, "connection_made", None)
        if made is not None:
            try:
                made(t)
            except Exception as exc:
                self._report(exc, "exception in connection_made", t)
                t._finalize(exc)
                return t
        if not t._closed:
            self._update(e)
        return t

    @property
    def transports(self) -> list[Any]:
        """The open transports of this reactor (a new list)."""
        return list(self._streams)

    def close(self) -> None:
        """Abort every transport, drop callbacks and timers, release the backend."""
        if self._running:
            raise RuntimeError("cannot close a running event loop")
        if self._closed:
            return
        for t in list(self._streams):
            t._finalize(None)
        for _ in range(len(self._ready)):
            h = self._ready.popleft()
            if not h._cancelled and isinstance(h._callback, _LostCall):
                self._run_handle(h)
        with self._wake_lock:
            self._closed = True
        self._ready.clear()
        for item in self._heap:
            item[2]._scheduled = False
            item[2]._loop = None
        self._heap = []
        self._fds = {}
        if self._epoll is not None:
            self._epoll.close()
        self._pollobj = None
        self._rset.clear()
        self._wset.clear()
        if self._wake_socks is not None:
            for s in self._wake_socks:
                s.close()
            self._wake_socks = None
        elif self._wake_r >= 0:
            os.close(self._wake_r)
        self._wake_r = self._wake_w = -1

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._running else "idle")
        return f"<{type(self).__name__} backend={self._backend} {state}>"
