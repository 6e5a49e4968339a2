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
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from fastnet._pure.framing import FrameDecoder

from fastnet._pure.framing import _header
from fastnet.errors import ProtocolError, MessageTooLarge, TruncatedFrameError

BACKENDS = ("epoll", "poll", "select")
SELECT_FD_LIMIT = 1024
COPY_THRESHOLD = 65536
DEFAULT_HIGH_WATER = 1 << 20
RECV_BUFSIZE = 262144

_READ = 1
_WRITE = 2
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


class Reactor:
    """Readiness dispatch, timers and a ready queue on one thread.

    ``Reactor(backend="auto")``; backend is "epoll", "poll" or "select".
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

    def __init__(self, backend: str = "auto") -> None:
        if getattr(self, "_ready_init", False):
            raise RuntimeError("Reactor.__init__ called twice")
        self._closed = True
        if backend == "auto":
            backend = default_backend()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use 'auto', 'epoll', 'poll' or 'select'")
        self._backend = backend
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

    def _poll(self, timeout: float) -> None:
        if timeout > 86400.0:
            timeout = 86400.0
        dispatch = self._dispatch
        if self._epoll is not None:
            IN = _select.EPOLLIN | _select.EPOLLERR | _select.EPOLLHUP
            OUT = _select.EPOLLOUT | _select.EPOLLERR | _select.EPOLLHUP
            for fd, ev in self._epoll.poll(timeout if timeout >= 0 else -1, max(len(self._fds), 1)):
                dispatch(fd, (_READ if ev & IN else 0) | (_WRITE if ev & OUT else 0))
        elif self._pollobj is not None:
            bad = _select.POLLERR | _select.POLLHUP | _select.POLLNVAL
            IN = _select.POLLIN | bad
            OUT = _select.POLLOUT | bad
            ms = None if timeout < 0 else int(timeout * 1000 + 0.999)
            for fd, ev in self._pollobj.poll(ms):
                dispatch(fd, (_READ if ev & IN else 0) | (_WRITE if ev & OUT else 0))
        else:
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
        t._init(self, e, sock, fd, protocol, on_message, max_message_size)
        t.set_write_buffer_limits(high_water, low_water)
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




def _as_frame(b: Buffer) -> bytes | memoryview:
    """bytes as they are; another buffer as a flat byte view of it, copied only if not contiguous."""
    if type(b) is bytes:
        return b
    mv = memoryview(b)
    if not mv.c_contiguous:
        return mv.tobytes()
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


class FramedTransport:
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

    def _init(self, loop: Reactor, entry: _FdEntry, sock: _socket.socket, fd: int, protocol: Any,
              on_message: Callable[[bytes], object], max_message_size: int | None) -> None:
        self._loop = loop
        self._entry = entry
        self._sock = sock
        self._fd = fd
        self._protocol = protocol
        self._on_message = on_message
        self._max_size = -1 if max_message_size is None else max_message_size
        self._decoder = None
        self._dirty = False
        self._wq = collections.deque()
        self._wq_off = 0
        self._wq_bytes = 0
        self._user_paused = self._bp_paused = self._writing = False
        self._closing = self._closed = self._eof = self._drain_scheduled = False
        self._messages_received = self._messages_sent = 0
        self._bytes_received = self._bytes_sent = 0
        self._pauses = 0

    def _want_read(self) -> bool:
        return not (self._user_paused or self._bp_paused or self._closing or self._eof)

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
        items = [_as_frame(b) for b in buffers]
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
        if not self._bp_paused and self._wq_bytes > self._high:
            self._bp_paused = True
            self._pauses += 1
            self._loop._update(self._entry)
            pw = getattr(self._protocol, "pause_writing", None)
            if pw is not None:
                try:
                    pw()
                except Exception as exc:
                    self._loop._report(exc, "exception in pause_writing", self)

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
        if self._bp_paused and self._wq_bytes <= self._low:
            self._bp_paused = False
            loop._update(self._entry)
            rw = getattr(self._protocol, "resume_writing", None)
            if rw is not None:
                try:
                    rw()
                except Exception as exc:
                    loop._report(exc, "exception in resume_writing", self)
            self._schedule_drain()

    def _schedule_drain(self) -> None:
        if self._dirty and not self._drain_scheduled and not self._closed:
            self._drain_scheduled = True
            self._loop._ready.append(_new_handle(self._drain_later, ()))

    # -- control ------------------------------------------------------------

    def pause_reading(self) -> None:
        """Stop calling message_received until resume_reading()."""
        if self._closed or self._user_paused:
            return
        self._user_paused = True
        self._loop._update(self._entry)

    def resume_reading(self) -> None:
        """Undo pause_reading(); frames received meanwhile are delivered first."""
        if self._closed or not self._user_paused:
            return
        self._user_paused = False
        self._loop._update(self._entry)
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

    # read-only, as the compiled FramedTransport's ``readonly`` attributes
    @property
    def protocol(self) -> Any:
        return self._protocol

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

    @property
    def pauses(self) -> int:
        """Times the write queue went over the high-water mark and paused the protocol's writing."""
        return self._pauses

    @property
    def reading_paused(self) -> bool:
        """True while reading is paused (by pause_reading or by backpressure)."""
        return self._user_paused or self._bp_paused

    @property
    def max_message_size(self) -> int | None:
        return None if self._max_size < 0 else self._max_size

    @property
    def socket(self) -> _socket.socket:
        return self._sock

    @property
    def loop(self) -> Reactor:
        return self._loop

    @property
    def closed(self) -> bool:
        return self._closed

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

    def close(self) -> None:
        """Stop reading, send what is queued, then close."""
        if self._closing or self._closed:
            return
        self._closing = True
        if not self._wq:
            self._finalize(None)
        else:
            self._loop._update(self._entry)

    def abort(self) -> None:
        """Close now, dropping queued bytes."""
        self._finalize(None)

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
