# cython: language_level=3
"""Reactor: readiness dispatch, timers and framed stream transports.

The readiness core under ``fastnet.EventLoop``. One ``Reactor`` owns a
backend (epoll through direct syscalls, poll or select), a table of watched
descriptors indexed by fd, a timer heap, a ready queue and a wake-up
descriptor (eventfd) for other threads. Interest is handed to the backend
only when it changes, so one event costs the same with ten or ten thousand
idle descriptors on epoll.

``FramedTransport`` is the hot path of message servers: on readability it
receives into one buffer shared by every connection of the reactor, cuts
whole frames out of it and hands each to ``protocol.message_received``; the
bytes of a partial frame go to a per-connection ``FrameDecoder``, which also
receives large frames straight into their final object. Sends try the
syscall at once and queue only what the kernel did not take; queued bytes
above a high-water mark pause reading on that connection.

Nothing here logs or chooses socket options: that is ``fastnet.loop``'s job.
"""
cimport cython
from cpython.bytes cimport (PyBytes_FromStringAndSize, PyBytes_AS_STRING,
                            PyBytes_GET_SIZE, PyBytes_CheckExact)
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE,
                             PyBUF_WRITABLE)
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from cpython.memoryview cimport PyMemoryView_GET_BUFFER
from libc.string cimport memcpy, strerror
from libc.stdint cimport uint32_t, uint64_t, int32_t
from libc.math cimport ceil
from posix.unistd cimport close as c_close, read as c_read, write as c_write

import collections
import socket as _socket
import sys
import traceback

from fastnet.errors import ProtocolError, MessageTooLarge, TruncatedFrameError
from fastnet._c.framing import FrameDecoder

include "sockio.pxi"

from framing cimport write_header, parse_header, header_error

cdef class Reactor
cdef class FramedTransport

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)
    enum:
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLET
        EPOLLRDHUP

cdef extern from "<poll.h>" nogil:
    enum:
        POLLERR
        POLLHUP
        POLLNVAL

cdef extern from "<sys/select.h>" nogil:
    ctypedef struct fd_set:
        pass
    struct timeval:
        long tv_sec
        long tv_usec
    int select(int nfds, fd_set* r, fd_set* w, fd_set* e, timeval* t)
    void FD_ZERO(fd_set* s)
    void FD_SET(int fd, fd_set* s)
    void FD_CLR(int fd, fd_set* s)
    int FD_ISSET(int fd, fd_set* s)
    enum:
        FD_SETSIZE

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC

# The hot syscalls go through syscall(2): libc's recv/send/epoll_wait are
# pthread cancellation points and wrap every call in cancel-state changes,
# which measured as ~1.5% of an echo server's CPU.
cdef extern from "<sys/syscall.h>" nogil:
    long syscall(long number, ...)
    enum:
        SYS_recvfrom
        SYS_sendto
        SYS_sendmsg
        SYS_epoll_pwait

cdef inline ssize_t _sys_recv(int fd, void* p, size_t n) noexcept nogil:
    return syscall(SYS_recvfrom, fd, p, n, 0, <void*>NULL, <void*>NULL)

cdef inline ssize_t _sys_send(int fd, const void* p, size_t n, int flags) noexcept nogil:
    return syscall(SYS_sendto, fd, p, n, flags, <void*>NULL, 0)

cdef inline ssize_t _sys_sendmsg(int fd, const msghdr* m, int flags) noexcept nogil:
    return syscall(SYS_sendmsg, fd, m, flags)

cdef inline int _sys_epoll_wait(int epfd, epoll_event* ev, int n, int ms) noexcept nogil:
    return <int>syscall(SYS_epoll_pwait, epfd, ev, n, ms, <void*>NULL, 8)

cdef extern from "<errno.h>":
    enum:
        EEXIST
        ENOENT
        EBADF

cdef enum:
    _READ = 1
    _WRITE = 2
    _HUP = 4          # the peer shut down its side: read on until EOF
    _K_EPOLL = 0
    _K_POLL = 1
    _K_SELECT = 2

BACKENDS = ("epoll", "poll", "select")
#: select() cannot watch a descriptor at or above this number.
SELECT_FD_LIMIT = FD_SETSIZE
#: Payloads up to this size are copied next to their header and sent with one
#: send(); larger ones go out as a two-iovec sendmsg without a copy.
COPY_THRESHOLD = 65536
DEFAULT_HIGH_WATER = 1 << 20
#: Bytes one recv() may take for a connection; one buffer serves them all.
RECV_BUFSIZE = 262144

cdef Py_ssize_t _COPY = COPY_THRESHOLD
cdef Py_ssize_t _IOV_MAX = 1024
cdef int _MAX_EVENTS = 65536
# the decoder of a connection starts small: ten thousand idle peers must not
# each hold a large buffer
cdef Py_ssize_t _DECODER_BUFSIZE = 1024
# a frame still missing this much is received straight into the decoder
cdef Py_ssize_t _DIRECT_READ = 65536


def default_backend():
    """The backend "auto" picks: epoll on Linux."""
    return "epoll"


cdef object _closed_error():
    return RuntimeError("the event loop is closed")


cdef int _fd_of(obj) except -1:
    cdef long fd
    if isinstance(obj, int):
        fd = obj
    else:
        fd = obj.fileno()
    if fd < 0:
        raise ValueError(f"invalid file descriptor {fd}")
    return <int>fd


@cython.freelist(256)
cdef class Handle:
    """A callback scheduled on a reactor; ``cancel()`` keeps it from running."""
    cdef object _callback
    cdef tuple _args
    cdef bint _cancelled

    def __init__(self, callback, args=()):
        self._callback = callback
        self._args = tuple(args)

    def cancel(self):
        """Do not run the callback (a no-op once it ran)."""
        if not self._cancelled:
            self._cancelled = True
            self._callback = None
            self._args = None

    def cancelled(self):
        return self._cancelled

    @property
    def callback(self):
        return self._callback

    @property
    def args(self):
        return self._args

    def __repr__(self):
        state = " cancelled" if self._cancelled else ""
        return f"<{type(self).__name__} {self._callback!r}{state}>"


cdef inline Handle _new_handle(callback, tuple args):
    cdef Handle h = Handle.__new__(Handle)
    h._callback = callback
    h._args = args
    return h


cdef class TimerHandle(Handle):
    """A callback scheduled for a point on the reactor's monotonic clock."""
    cdef double _when
    cdef unsigned long long _seq
    cdef bint _scheduled
    cdef Reactor _loop

    def __init__(self, *a):
        raise TypeError("TimerHandle is created by call_later/call_at")

    def when(self):
        """The monotonic time the callback is due."""
        return self._when

    def cancel(self):
        if not self._cancelled and self._scheduled and self._loop is not None:
            self._loop._timer_cancelled += 1
        Handle.cancel(self)


cdef inline bint _tlt(TimerHandle a, TimerHandle b) noexcept:
    return a._when < b._when or (a._when == b._when and a._seq < b._seq)


@cython.final
cdef class _FdEntry:
    cdef int fd
    cdef Handle reader
    cdef Handle writer
    cdef FramedTransport stream
    cdef int mask          # the interest the backend has now
    cdef Py_ssize_t pidx   # slot in the pollfd array (poll backend)
    cdef bint wake


cdef class Reactor:
    """Readiness dispatch, timers and a ready queue on one thread.

    ``Reactor(backend="auto")``; backend is "epoll", "poll" or "select".
    Every method except ``call_soon_threadsafe`` and ``stop`` belongs to the
    thread that runs the reactor.
    """
    cdef readonly str backend
    cdef int _kind
    cdef int _epfd
    cdef epoll_event* _events
    cdef int _nevents
    cdef pollfd* _pfds
    cdef Py_ssize_t _npfds
    cdef Py_ssize_t _pcap
    cdef fd_set _rset
    cdef fd_set _wset
    cdef int _maxfd
    cdef int* _rfd
    cdef int* _rmask
    cdef Py_ssize_t _rcap
    cdef list _fds
    cdef object _ready
    cdef list _heap
    cdef Py_ssize_t _timer_cancelled
    cdef unsigned long long _seq
    cdef int _wake_r
    cdef int _wake_w
    cdef bint _wake_is_eventfd
    cdef object _wake_socks
    cdef bint _woken
    cdef bint _stopping
    cdef bint _running
    cdef bint _closed
    cdef bint _ready_init
    cdef set _streams
    cdef char* _rbuf
    cdef Py_ssize_t _rbufsize
    cdef char* _wbuf
    cdef iovec* _iov
    cdef _MemRegion _region
    cdef readonly unsigned long long ctl_calls
    cdef readonly unsigned long long iterations

    def __cinit__(self, *args, **kwargs):
        self._epfd = -1
        self._wake_r = -1
        self._wake_w = -1
        self._events = NULL
        self._pfds = NULL
        self._rfd = NULL
        self._rmask = NULL
        self._rbuf = NULL
        self._wbuf = NULL
        self._iov = NULL
        self._maxfd = -1
        self._closed = True   # until __init__ succeeds

    def __init__(self, backend="auto"):
        if self._ready_init:
            raise RuntimeError("Reactor.__init__ called twice")
        if backend == "auto":
            backend = default_backend()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use 'auto', 'epoll', 'poll' or 'select'")
        self.backend = backend
        self._fds = []
        self._ready = collections.deque()
        self._heap = []
        self._streams = set()
        self._region = _MemRegion.__new__(_MemRegion)
        self._region.readonly = True
        self._rbufsize = RECV_BUFSIZE
        self._rbuf = <char*>PyMem_Malloc(self._rbufsize)
        self._wbuf = <char*>PyMem_Malloc(_COPY + 16)
        self._iov = <iovec*>PyMem_Malloc(_IOV_MAX * sizeof(iovec))
        if self._rbuf == NULL or self._wbuf == NULL or self._iov == NULL:
            raise MemoryError()
        if backend == "epoll":
            self._kind = _K_EPOLL
            self._epfd = epoll_create1(EPOLL_CLOEXEC)
            if self._epfd < 0:
                PyErr_SetFromErrno(OSError)
            self._nevents = 1024
            self._events = <epoll_event*>PyMem_Malloc(self._nevents * sizeof(epoll_event))
            if self._events == NULL:
                raise MemoryError()
        elif backend == "poll":
            self._kind = _K_POLL
            self._pcap = 64
            self._pfds = <pollfd*>PyMem_Malloc(self._pcap * sizeof(pollfd))
            self._rcap = 64
        else:
            self._kind = _K_SELECT
            FD_ZERO(&self._rset)
            FD_ZERO(&self._wset)
            self._rcap = FD_SETSIZE
        if self._kind != _K_EPOLL:
            self._rfd = <int*>PyMem_Malloc(self._rcap * sizeof(int))
            self._rmask = <int*>PyMem_Malloc(self._rcap * sizeof(int))
            if self._rfd == NULL or self._rmask == NULL or (self._kind == _K_POLL and self._pfds == NULL):
                raise MemoryError()
        self._ready_init = True
        self._closed = False
        self._open_wake()

    def __dealloc__(self):
        if self._epfd >= 0:
            c_close(self._epfd)
        if self._wake_is_eventfd and self._wake_r >= 0:
            c_close(self._wake_r)
        PyMem_Free(self._events)
        PyMem_Free(self._pfds)
        PyMem_Free(self._rfd)
        PyMem_Free(self._rmask)
        PyMem_Free(self._rbuf)
        PyMem_Free(self._wbuf)
        PyMem_Free(self._iov)

    # -- wake-up descriptor -------------------------------------------------

    cdef int _open_wake(self) except -1:
        cdef _FdEntry e
        fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if fd >= 0:
            self._wake_r = self._wake_w = fd
            self._wake_is_eventfd = True
        else:
            a, b = _socket.socketpair()
            a.setblocking(False)
            b.setblocking(False)
            self._wake_socks = (a, b)
            self._wake_r = a.fileno()
            self._wake_w = b.fileno()
        e = self._entry(self._wake_r)
        e.wake = True
        self._update(e)
        return 0

    cdef int _drain_wake(self) except -1:
        cdef uint64_t v
        cdef char buf[256]
        if self._wake_is_eventfd:
            c_read(self._wake_r, &v, 8)
        else:
            while c_read(self._wake_r, buf, 256) > 0:
                pass
        self._woken = False
        return 0

    cdef int _wakeup(self) except -1:
        # Called with the GIL held and never releasing it between the check
        # and the write, so close() cannot slip in and free the descriptor.
        cdef uint64_t one = 1
        if self._closed:
            raise _closed_error()
        if not self._woken:
            self._woken = True
            if self._wake_is_eventfd:
                c_write(self._wake_w, &one, 8)
            else:
                c_write(self._wake_w, b"x", 1)
        return 0

    # -- descriptor table and interest ----------------------------------------

    cdef _FdEntry _entry(self, int fd):
        """The entry for fd, created if missing."""
        cdef _FdEntry e
        cdef Py_ssize_t n = len(self._fds)
        if self._kind == _K_SELECT and fd >= FD_SETSIZE:
            raise ValueError(
                f"the select backend cannot watch descriptor {fd}: select() is limited to "
                f"descriptors below FD_SETSIZE={FD_SETSIZE}; use backend='epoll' or 'poll'")
        if fd < n:
            obj = self._fds[fd]
            if obj is not None:
                return <_FdEntry>obj
        else:
            self._fds.extend([None] * (fd + 1 - n + 16))
        e = _FdEntry.__new__(_FdEntry)
        e.fd = fd
        e.pidx = -1
        self._fds[fd] = e
        return e

    cdef inline _FdEntry _lookup(self, int fd):
        if fd < 0 or fd >= len(self._fds):
            return None
        return <_FdEntry>self._fds[fd]

    cdef int _update(self, _FdEntry e) except -1:
        """Hand the entry's interest to the backend if it changed."""
        cdef int want = 0
        cdef FramedTransport s = e.stream
        if e.wake or e.reader is not None or (s is not None and s._want_read()):
            want |= _READ
        if e.writer is not None or (s is not None and s._writing):
            want |= _WRITE
        if want != e.mask:
            if self._kind == _K_EPOLL:
                self._ctl_epoll(e, want)
            elif self._kind == _K_POLL:
                self._ctl_poll(e, want)
            else:
                self._ctl_select(e, want)
            e.mask = want
            self.ctl_calls += 1
        if want == 0 and e.reader is None and e.writer is None and s is None and not e.wake:
            if e.fd < len(self._fds) and self._fds[e.fd] is e:
                self._fds[e.fd] = None
        return 0

    cdef int _ctl_epoll(self, _FdEntry e, int want) except -1:
        cdef epoll_event ev
        cdef int op, rc
        ev.events = 0
        if want & _READ:
            ev.events |= EPOLLIN
        if want & _WRITE:
            ev.events |= EPOLLOUT
        if e.stream is not None:
            ev.events |= EPOLLET | EPOLLRDHUP
        ev.data.u64 = 0
        ev.data.fd = e.fd
        if e.mask == 0:
            op = EPOLL_CTL_ADD
        elif want == 0:
            op = EPOLL_CTL_DEL
        else:
            op = EPOLL_CTL_MOD
        rc = epoll_ctl(self._epfd, op, e.fd, &ev)
        if rc < 0:
            if op == EPOLL_CTL_DEL and (errno == ENOENT or errno == EBADF):
                return 0    # closed behind our back: the kernel dropped it already
            if op == EPOLL_CTL_ADD and errno == EEXIST:
                rc = epoll_ctl(self._epfd, EPOLL_CTL_MOD, e.fd, &ev)
            elif op == EPOLL_CTL_MOD and errno == ENOENT:
                rc = epoll_ctl(self._epfd, EPOLL_CTL_ADD, e.fd, &ev)
            if rc < 0:
                PyErr_SetFromErrno(OSError)
                return -1
        return 0

    cdef int _ctl_poll(self, _FdEntry e, int want) except -1:
        cdef short ev = 0
        cdef pollfd* np
        cdef Py_ssize_t last
        cdef _FdEntry moved
        if want & _READ:
            ev |= POLLIN
        if want & _WRITE:
            ev |= POLLOUT
        if e.mask == 0:
            if self._npfds == self._pcap:
                np = <pollfd*>PyMem_Realloc(self._pfds, 2 * self._pcap * sizeof(pollfd))
                if np == NULL:
                    raise MemoryError()
                self._pfds = np
                self._pcap *= 2
            e.pidx = self._npfds
            self._pfds[e.pidx].fd = e.fd
            self._pfds[e.pidx].events = ev
            self._pfds[e.pidx].revents = 0
            self._npfds += 1
            if self._npfds > self._rcap:
                self._grow_ready(self._pcap)
        elif want == 0:
            last = self._npfds - 1
            if e.pidx != last:
                self._pfds[e.pidx] = self._pfds[last]
                moved = self._lookup(self._pfds[e.pidx].fd)
                if moved is not None:
                    moved.pidx = e.pidx
            self._npfds -= 1
            e.pidx = -1
        else:
            self._pfds[e.pidx].events = ev
        return 0

    cdef int _grow_ready(self, Py_ssize_t cap) except -1:
        cdef int* a = <int*>PyMem_Realloc(self._rfd, cap * sizeof(int))
        if a == NULL:
            raise MemoryError()
        self._rfd = a
        a = <int*>PyMem_Realloc(self._rmask, cap * sizeof(int))
        if a == NULL:
            raise MemoryError()
        self._rmask = a
        self._rcap = cap
        return 0

    cdef int _ctl_select(self, _FdEntry e, int want) except -1:
        if want & _READ:
            FD_SET(e.fd, &self._rset)
        else:
            FD_CLR(e.fd, &self._rset)
        if want & _WRITE:
            FD_SET(e.fd, &self._wset)
        else:
            FD_CLR(e.fd, &self._wset)
        if want and e.fd > self._maxfd:
            self._maxfd = e.fd
        elif not want and e.fd == self._maxfd:
            while self._maxfd >= 0 and not (FD_ISSET(self._maxfd, &self._rset) or
                                            FD_ISSET(self._maxfd, &self._wset)):
                self._maxfd -= 1
        return 0

    cdef int _check_open(self) except -1:
        if self._closed:
            raise _closed_error()
        return 0

    # -- readiness API ----------------------------------------------------

    def add_reader(self, fd, callback, *args):
        """Call ``callback(*args)`` whenever fd is readable (replaces a previous reader)."""
        cdef int f = _fd_of(fd)
        cdef _FdEntry e
        self._check_open()
        if not callable(callback):
            raise TypeError("callback must be callable")
        e = self._entry(f)
        if e.stream is not None or e.wake:
            raise ValueError(f"descriptor {f} is owned by a transport of this loop")
        e.reader = _new_handle(callback, args)
        self._update(e)

    def add_writer(self, fd, callback, *args):
        """Call ``callback(*args)`` whenever fd is writable (replaces a previous writer)."""
        cdef int f = _fd_of(fd)
        cdef _FdEntry e
        self._check_open()
        if not callable(callback):
            raise TypeError("callback must be callable")
        e = self._entry(f)
        if e.stream is not None or e.wake:
            raise ValueError(f"descriptor {f} is owned by a transport of this loop")
        e.writer = _new_handle(callback, args)
        self._update(e)

    def remove_reader(self, fd):
        """Stop watching fd for reading; True if it was watched."""
        cdef _FdEntry e
        if self._closed:
            return False
        e = self._lookup(_fd_of(fd))
        if e is None or e.reader is None:
            return False
        e.reader = None
        self._update(e)
        return True

    def remove_writer(self, fd):
        """Stop watching fd for writing; True if it was watched."""
        cdef _FdEntry e
        if self._closed:
            return False
        e = self._lookup(_fd_of(fd))
        if e is None or e.writer is None:
            return False
        e.writer = None
        self._update(e)
        return True

    def interest(self, fd):
        """The events registered for fd now: a subset of {"read", "write"}."""
        cdef _FdEntry e = self._lookup(_fd_of(fd))
        out = set()
        if e is not None:
            if e.mask & _READ:
                out.add("read")
            if e.mask & _WRITE:
                out.add("write")
        return out

    @property
    def registered(self):
        """Number of descriptors the backend watches now (the wake-up one included)."""
        cdef Py_ssize_t n = 0
        for obj in self._fds:
            if obj is not None and (<_FdEntry>obj).mask:
                n += 1
        return n

    # -- time and callbacks ---------------------------------------------------

    def time(self):
        """The reactor's clock: monotonic seconds (time.monotonic())."""
        return _now()

    def call_soon(self, callback, *args):
        """Run ``callback(*args)`` on the next iteration, in call order; returns a Handle."""
        cdef Handle h
        self._check_open()
        if not callable(callback):
            raise TypeError("callback must be callable")
        h = _new_handle(callback, args)
        self._ready.append(h)
        return h

    def call_soon_threadsafe(self, callback, *args):
        """call_soon from any thread: queues the callback and wakes the reactor."""
        cdef Handle h
        if not callable(callback):
            raise TypeError("callback must be callable")
        h = _new_handle(callback, args)
        if self._closed:
            raise _closed_error()
        self._ready.append(h)
        self._wakeup()
        return h

    def call_later(self, double delay, callback, *args):
        """Run ``callback(*args)`` after delay seconds; returns a cancellable TimerHandle."""
        return self._call_at(_now() + delay, callback, args)

    def call_at(self, double when, callback, *args):
        """Run ``callback(*args)`` at ``when`` on the reactor's clock (see time())."""
        return self._call_at(when, callback, args)

    cdef TimerHandle _call_at(self, double when, callback, tuple args):
        cdef TimerHandle t
        self._check_open()
        if not callable(callback):
            raise TypeError("callback must be callable")
        t = TimerHandle.__new__(TimerHandle)
        t._callback = callback
        t._args = args
        t._when = when
        t._seq = self._seq
        self._seq += 1
        t._scheduled = True
        t._loop = self
        self._heap_push(t)
        return t

    cdef int _heap_push(self, TimerHandle t) except -1:
        cdef list heap = self._heap
        cdef Py_ssize_t i, parent
        cdef TimerHandle p
        heap.append(t)
        i = len(heap) - 1
        while i > 0:
            parent = (i - 1) >> 1
            p = <TimerHandle>heap[parent]
            if not _tlt(t, p):
                break
            heap[i] = p
            i = parent
        heap[i] = t
        return 0

    cdef int _sift_down(self, Py_ssize_t i) except -1:
        cdef list heap = self._heap
        cdef Py_ssize_t n = len(heap), c
        cdef TimerHandle t = <TimerHandle>heap[i]
        cdef TimerHandle ch
        while True:
            c = 2 * i + 1
            if c >= n:
                break
            if c + 1 < n and _tlt(<TimerHandle>heap[c + 1], <TimerHandle>heap[c]):
                c += 1
            ch = <TimerHandle>heap[c]
            if not _tlt(ch, t):
                break
            heap[i] = ch
            i = c
        heap[i] = t
        return 0

    cdef TimerHandle _heap_pop(self):
        cdef list heap = self._heap
        cdef TimerHandle top = <TimerHandle>heap[0]
        last = heap.pop()
        if heap:
            heap[0] = last
            self._sift_down(0)
        top._scheduled = False
        top._loop = None
        return top

    cdef int _compact_timers(self) except -1:
        cdef list keep = []
        cdef TimerHandle t
        cdef Py_ssize_t i
        for obj in self._heap:
            t = <TimerHandle>obj
            if t._cancelled:
                t._scheduled = False
                t._loop = None
            else:
                keep.append(t)
        self._heap = keep
        self._timer_cancelled = 0
        i = len(keep) // 2 - 1
        while i >= 0:
            self._sift_down(i)
            i -= 1
        return 0

    @property
    def timers(self):
        """Number of timers scheduled and not cancelled."""
        return len(self._heap) - self._timer_cancelled

    # -- running ------------------------------------------------------------

    def is_running(self):
        return self._running

    def is_closed(self):
        return self._closed

    def stop(self):
        """Return from run_forever/run_until after the current iteration (any thread)."""
        self._stopping = True
        if not self._closed:
            self._wakeup()

    cdef int _enter(self) except -1:
        self._check_open()
        if self._running:
            raise RuntimeError("the event loop is already running")
        self._running = True
        return 0

    def run_forever(self):
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

    def run_until(self, predicate=None, timeout=None, interval=0.05):
        """Run until ``predicate()`` is true or ``timeout`` seconds pass.

        ``run_until(5.0)`` runs for five seconds. The predicate is checked
        after every iteration and at least every ``interval`` seconds, so it
        may watch things the loop does not (a thread, a child process).
        Returns True if the predicate became true (or, without one, if
        stop() was called) and False if the timeout passed first.
        """
        cdef double deadline = -1.0, left = -1.0, wait, step
        if predicate is not None and not callable(predicate):
            if timeout is not None:
                raise TypeError("predicate must be callable")
            timeout, predicate = predicate, None
        if timeout is not None:
            deadline = _now() + max(float(timeout), 0.0)
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
                    left = deadline - _now()
                    if left <= 0:
                        return False
                    if wait < 0 or left < wait:
                        wait = left
                self._run_once(wait)
        finally:
            self._stopping = False
            self._running = False

    def run_once(self, timeout=None):
        """One iteration: wait up to timeout (None: until something happens), dispatch."""
        self._enter()
        try:
            self._run_once(-1.0 if timeout is None else max(float(timeout), 0.0))
        finally:
            self._running = False

    cdef int _run_once(self, double max_timeout) except -1:
        cdef double timeout, now, when
        cdef TimerHandle t
        cdef Handle h
        cdef Py_ssize_t ntodo, i
        cdef list heap
        self.iterations += 1
        if self._timer_cancelled > 64 and 2 * self._timer_cancelled > len(self._heap):
            self._compact_timers()
        heap = self._heap
        while heap and (<TimerHandle>heap[0])._cancelled:
            self._heap_pop()
            self._timer_cancelled -= 1
            heap = self._heap
        if self._ready or self._stopping:
            timeout = 0.0
        elif heap:
            timeout = (<TimerHandle>heap[0])._when - _now()
            if timeout < 0:
                timeout = 0.0
            if max_timeout >= 0 and max_timeout < timeout:
                timeout = max_timeout
        else:
            timeout = max_timeout
        self._poll(timeout)
        heap = self._heap
        if heap:
            now = _now()
            while heap:
                t = <TimerHandle>heap[0]
                if t._cancelled:
                    self._heap_pop()
                    self._timer_cancelled -= 1
                elif t._when <= now:
                    self._heap_pop()
                    self._ready.append(t)
                else:
                    break
                heap = self._heap
        ntodo = len(self._ready)
        for i in range(ntodo):
            h = <Handle>self._ready.popleft()
            if not h._cancelled:
                self._run_handle(h)
        return 0

    cdef int _run_handle(self, Handle h) except -1:
        try:
            h._callback(*h._args)
        except Exception as exc:
            self._report(exc, "exception in callback", h)
        return 0

    cdef int _report(self, exc, str message, obj) except -1:
        try:
            self.call_exception_handler({"message": message, "exception": exc, "object": obj})
        except Exception:
            traceback.print_exc()
        return 0

    def call_exception_handler(self, context):
        """Report an exception a callback raised (the loop logs; this prints)."""
        exc = context.get("exception")
        print(f"fastnet reactor: {context.get('message')} ({context.get('object')!r})", file=sys.stderr)
        if exc is not None:
            traceback.print_exception(type(exc), exc, exc.__traceback__)

    # -- polling ----------------------------------------------------------------

    cdef int _poll(self, double timeout) except -1:
        cdef int ms, n, i, fd, m
        cdef uint32_t ev
        cdef epoll_event* np
        if timeout < 0:
            ms = -1
        elif timeout == 0:
            ms = 0
        elif timeout > 86400.0:
            ms = 86400000
        else:
            ms = <int>ceil(timeout * 1000.0)
        if self._kind == _K_EPOLL:
            if ms == 0:
                n = _sys_epoll_wait(self._epfd, self._events, self._nevents, 0)
            else:
                with nogil:
                    n = _sys_epoll_wait(self._epfd, self._events, self._nevents, ms)
            if n < 0:
                if errno == EINTR:
                    PyErr_CheckSignals()
                    return 0
                PyErr_SetFromErrno(OSError)
                return -1
            for i in range(n):
                ev = self._events[i].events
                m = 0
                if ev & (EPOLLIN | EPOLLERR | EPOLLHUP):
                    m = _READ
                if ev & (EPOLLOUT | EPOLLERR | EPOLLHUP):
                    m |= _WRITE
                if ev & (EPOLLRDHUP | EPOLLERR | EPOLLHUP):
                    m |= _HUP
                self._dispatch(self._events[i].data.fd, m)
            if n == self._nevents and self._nevents < _MAX_EVENTS:
                np = <epoll_event*>PyMem_Realloc(self._events, 2 * self._nevents * sizeof(epoll_event))
                if np != NULL:
                    self._events = np
                    self._nevents *= 2
            return 0
        if self._kind == _K_POLL:
            n = self._poll_poll(ms)
        else:
            n = self._poll_select(timeout)
        for i in range(n):
            self._dispatch(self._rfd[i], self._rmask[i])
        return 0

    cdef int _poll_poll(self, int ms) except -1:
        cdef int n, i, k = 0, m
        cdef short rev
        if ms == 0:
            n = poll(self._pfds, self._npfds, 0)
        else:
            with nogil:
                n = poll(self._pfds, self._npfds, ms)
        if n < 0:
            if errno == EINTR:
                PyErr_CheckSignals()
                return 0
            PyErr_SetFromErrno(OSError)
            return -1
        i = 0
        while k < n and i < self._npfds:
            rev = self._pfds[i].revents
            if rev:
                m = 0
                if rev & (POLLIN | POLLERR | POLLHUP | POLLNVAL):
                    m = _READ
                if rev & (POLLOUT | POLLERR | POLLHUP | POLLNVAL):
                    m |= _WRITE
                self._rfd[k] = self._pfds[i].fd
                self._rmask[k] = m
                k += 1
            i += 1
        return k

    cdef int _poll_select(self, double timeout) except -1:
        cdef fd_set r, w
        cdef timeval tv
        cdef timeval* tvp = NULL
        cdef int n, fd, k = 0, m, nfds = self._maxfd + 1
        r = self._rset
        w = self._wset
        if timeout >= 0:
            if timeout > 86400.0:
                timeout = 86400.0
            tv.tv_sec = <long>timeout
            tv.tv_usec = <long>((timeout - tv.tv_sec) * 1e6) + 1
            if timeout == 0:
                tv.tv_usec = 0
            if tv.tv_usec >= 1000000:
                tv.tv_sec += 1
                tv.tv_usec -= 1000000
            tvp = &tv
        if timeout == 0:
            n = select(nfds, &r, &w, NULL, tvp)
        else:
            with nogil:
                n = select(nfds, &r, &w, NULL, tvp)
        if n < 0:
            if errno == EINTR:
                PyErr_CheckSignals()
                return 0
            PyErr_SetFromErrno(OSError)
            return -1
        fd = 0
        while k < n and fd < nfds:
            m = 0
            if FD_ISSET(fd, &r):
                m = _READ
            if FD_ISSET(fd, &w):
                m |= _WRITE
            if m:
                self._rfd[k] = fd
                self._rmask[k] = m
                k += 1
            fd += 1
        return k

    cdef int _dispatch(self, int fd, int m) except -1:
        cdef _FdEntry e = self._lookup(fd)
        cdef FramedTransport s
        cdef Handle h
        if e is None:
            return 0
        s = e.stream
        if s is not None:
            try:
                if m & _READ and s._want_read():
                    s._read_ready(m & _HUP)
                if m & _WRITE and s._writing and not s._closed:
                    s._write_ready()
            except Exception as exc:
                self._report(exc, "exception in transport", s)
                s._finalize(exc)
            return 0
        if e.wake:
            self._drain_wake()
            return 0
        if m & _READ:
            h = e.reader
            if h is not None:
                self._run_handle(h)
        if m & _WRITE:
            h = e.writer
            if h is not None:
                self._run_handle(h)
        return 0

    # -- streams ------------------------------------------------------------

    def add_stream(self, sock, protocol, max_message_size=None, high_water=None, low_water=None):
        """Run a framed ``protocol`` on a connected stream socket; returns its FramedTransport.

        The transport owns the socket from here on (it is made non-blocking
        and closed with the transport). ``protocol.message_received(bytes)``
        is called per frame; ``connection_made(transport)``,
        ``connection_lost(exc)``, ``pause_writing()`` and ``resume_writing()``
        are called when the protocol has them.
        """
        cdef FramedTransport t
        cdef _FdEntry e
        cdef int fd
        self._check_open()
        on_message = protocol.message_received
        sock.setblocking(False)
        fd = _fd_of(sock)
        e = self._entry(fd)
        if e.reader is not None or e.writer is not None or e.stream is not None or e.wake:
            raise ValueError(f"descriptor {fd} is already watched by this loop")
        t = FramedTransport.__new__(FramedTransport)
        t._loop = self
        t._sock = sock
        t._fd = fd
        t.protocol = protocol
        t._on_message = on_message
        t._max_size = -1 if max_message_size is None else max_message_size
        t._wq = []
        t.set_write_buffer_limits(high_water, low_water)
        t._entry = e
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
    def transports(self):
        """The open transports of this reactor (a new list)."""
        return list(self._streams)

    def close(self):
        """Abort every transport, drop callbacks and timers, release the backend."""
        cdef FramedTransport t
        if self._running:
            raise RuntimeError("cannot close a running event loop")
        if self._closed:
            return
        for obj in list(self._streams):
            t = <FramedTransport>obj
            t._finalize(None)
        # the transports' connection_lost callbacks are the last to run
        ntodo = len(self._ready)
        for i in range(ntodo):
            h = <Handle>self._ready.popleft()
            if not h._cancelled and isinstance(h._callback, _LostCall):
                self._run_handle(h)
        self._closed = True
        self._ready.clear()
        for obj in self._heap:
            (<TimerHandle>obj)._scheduled = False
            (<TimerHandle>obj)._loop = None
        self._heap = []
        self._fds = []
        if self._epfd >= 0:
            c_close(self._epfd)
            self._epfd = -1
        if self._wake_socks is not None:
            for s in self._wake_socks:
                s.close()
            self._wake_socks = None
        elif self._wake_r >= 0:
            c_close(self._wake_r)
        self._wake_r = self._wake_w = -1
        self._npfds = 0
        self._maxfd = -1

    def __repr__(self):
        state = "closed" if self._closed else ("running" if self._running else "idle")
        return f"<{type(self).__name__} backend={self.backend} {state}>"


@cython.final
# Write-queue entries are bytes or, for large buffers handed to send_many,
# a C-contiguous memoryview cast to "B": those go out without a copy.
cdef inline char* _qptr(object o):
    if PyBytes_CheckExact(o):
        return PyBytes_AS_STRING(o)
    return <char*>PyMemoryView_GET_BUFFER(o).buf


cdef inline Py_ssize_t _qlen(object o):
    if PyBytes_CheckExact(o):
        return PyBytes_GET_SIZE(o)
    return PyMemoryView_GET_BUFFER(o).len


cdef object _as_frame(object b):
    """bytes as they are; another buffer as a flat byte view of it, copied only if not contiguous."""
    cdef object mv
    if PyBytes_CheckExact(b):
        return b
    mv = memoryview(b)
    if not mv.c_contiguous:
        return mv.tobytes()
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


cdef class _LostCall:
    """Calls protocol.connection_lost(exc) once, then forgets the protocol."""
    cdef object protocol
    cdef object exc

    def __call__(self):
        p = self.protocol
        exc = self.exc
        self.protocol = None
        self.exc = None
        lost = getattr(p, "connection_lost", None)
        if lost is not None:
            lost(exc)


cdef class FramedTransport:
    """Length-prefixed frames over a non-blocking stream socket on a Reactor.

    Created by ``Reactor.add_stream``. ``send_bytes`` / ``send_many`` try the
    send syscall at once and queue only what the kernel did not take; more
    than the high-water mark queued pauses reading until the queue drains to
    the low-water mark. ``close()`` sends what is queued, then closes;
    ``abort()`` closes now. ``protocol.connection_lost(exc)`` is called once,
    with the error (a bad frame from the peer, a socket error) or None.
    """
    cdef Reactor _loop
    cdef _FdEntry _entry
    cdef int _fd
    cdef object _sock
    cdef readonly object protocol
    cdef object _on_message
    cdef object _decoder
    cdef bint _dirty
    cdef long long _max_size
    cdef list _wq
    cdef Py_ssize_t _wq_off
    cdef Py_ssize_t _wq_bytes
    cdef Py_ssize_t _high
    cdef Py_ssize_t _low
    cdef bint _user_paused
    cdef bint _bp_paused
    cdef bint _writing
    cdef bint _closing
    cdef bint _closed
    cdef bint _eof
    cdef bint _drain_scheduled
    cdef readonly unsigned long long messages_received
    cdef readonly unsigned long long messages_sent
    cdef readonly unsigned long long bytes_received
    cdef readonly unsigned long long bytes_sent
    cdef readonly unsigned long long pauses

    def __init__(self, *a, **k):
        raise TypeError("FramedTransport is created by Reactor.add_stream")

    cdef inline bint _want_read(self) noexcept:
        return not (self._user_paused or self._bp_paused or self._closing or self._eof)

    # -- reading ------------------------------------------------------------

    cdef int _read_ready(self, bint hup) except -1:
        # Streams are edge-triggered on epoll (one readiness check per event
        # in the kernel instead of two): read on while a recv filled the
        # buffer, since no new edge comes for bytes already queued, and after
        # the peer's FIN (hup) until recv says EOF, since the FIN's edge may
        # have come with the data just read.
        cdef int rounds = 0, r
        while True:
            if self._dirty and self._decoder.needed >= _DIRECT_READ:
                r = self._read_direct()
            else:
                r = self._read_once()
            if r == 2 or (r == 0 and not hup) or self._closed or not self._want_read():
                return 0
            rounds += 1
            if rounds == 16:
                # let other connections run; finish on the next iteration
                self._loop._ready.append(_new_handle(self._read_later, (hup,)))
                return 0

    def _read_later(self, hup):
        if not self._closed and self._want_read():
            try:
                self._read_ready(hup)
            except Exception as exc:
                self._loop._report(exc, "exception in transport", self)
                self._finalize(exc)

    cdef int _read_once(self) except -1:
        """One recv into the shared buffer: 1 if it filled the buffer, 0 if not, 2 on EAGAIN or EOF."""
        cdef Reactor loop = self._loop
        cdef ssize_t n
        cdef int err
        n = _sys_recv(self._fd, loop._rbuf, loop._rbufsize)
        if n > 0:
            self.bytes_received += n
            self._process(loop._rbuf, n)
            return 1 if n == loop._rbufsize else 0
        if n == 0:
            self._on_eof()
            return 2
        err = errno
        if err == EAGAIN or err == EWOULDBLOCK:
            return 2
        if err == EINTR:
            return 1
        self._finalize(OSError(err, strerror(err).decode("utf-8", "replace")))
        return 2

    cdef int _read_direct(self) except -1:
        """Receive the rest of a large frame straight into the decoder's target."""
        cdef Py_buffer view
        cdef ssize_t n
        cdef Py_ssize_t want
        cdef int err
        region = self._decoder.get_buffer()
        PyObject_GetBuffer(region, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        want = view.len
        try:
            with nogil:
                n = _sys_recv(self._fd, view.buf, view.len)
            err = errno
        finally:
            PyBuffer_Release(&view)
        if n > 0:
            self.bytes_received += n
            self._decoder.buffer_updated(n)
            self._drain()
            return 1 if n == want else 0
        if n == 0:
            self._on_eof()
            return 2
        if err == EAGAIN or err == EWOULDBLOCK:
            return 2
        if err == EINTR:
            return 1
        self._finalize(OSError(err, strerror(err).decode("utf-8", "replace")))
        return 0

    cdef int _process(self, char* p, Py_ssize_t n) except -1:
        """Deliver every whole frame in p[0:n]; keep the rest in the decoder."""
        cdef Py_ssize_t off = 0, hdr
        cdef long long length
        if self._dirty:
            if self._feed(p, n) < 0:
                return 0
            return self._drain()
        # whole frames are cut straight out of the read buffer; only a tail
        # goes through the decoder
        while True:
            hdr = parse_header(<const unsigned char*>(p + off), n - off, &length)
            if hdr == 0:
                break
            if hdr < 0:
                self._finalize(header_error(<int>hdr, length))
                return 0
            if self._max_size >= 0 and length > self._max_size:
                self._finalize(MessageTooLarge(
                    f"frame of {length} bytes exceeds max_message_size={self._max_size}"))
                return 0
            if n - off - hdr < length:
                break
            frame = PyBytes_FromStringAndSize(p + off + hdr, <Py_ssize_t>length)
            off += hdr + <Py_ssize_t>length
            self.messages_received += 1
            self._deliver(frame)
            if not self._want_read():
                break
        if off < n and not self._closed:
            self._feed(p + off, n - off)
        return 0

    cdef int _feed(self, char* p, Py_ssize_t n) except -2:
        """Give bytes to the decoder; -1 if they broke the stream (transport finalized)."""
        cdef _MemRegion r = self._loop._region
        if self._decoder is None:
            self._decoder = FrameDecoder(None if self._max_size < 0 else self._max_size,
                                         _DECODER_BUFSIZE)
        r.ptr = p
        r.size = n
        self._dirty = True
        try:
            self._decoder.feed(r)
        except (ProtocolError, MessageTooLarge) as exc:
            self._finalize(exc)
            return -1
        finally:
            r.ptr = NULL
            r.size = 0
        return 0

    cdef int _drain(self) except -1:
        """Deliver the decoder's whole frames while reading is wanted."""
        d = self._decoder
        while self._want_read():
            try:
                frame = d.next_frame()
            except (ProtocolError, MessageTooLarge) as exc:
                self._finalize(exc)
                return 0
            if frame is None:
                break
            self.messages_received += 1
            self._deliver(frame)
        if not self._closed and d.buffered == 0 and d.needed == 0:
            self._dirty = False
        return 0

    def _drain_later(self):
        self._drain_scheduled = False
        if self._dirty and not self._closed and self._want_read():
            try:
                self._drain()
            except Exception as exc:
                self._loop._report(exc, "exception in transport", self)
                self._finalize(exc)

    cdef int _deliver(self, frame) except -1:
        try:
            self._on_message(frame)
        except Exception as exc:
            self._loop._report(exc, "exception in message_received", self)
            self._finalize(exc)
        return 0

    cdef int _on_eof(self) except -1:
        self._eof = True
        if self._dirty:
            try:
                self._decoder.eof()
            except TruncatedFrameError as exc:
                self._finalize(exc)
                return 0
        if self._wq:
            self._closing = True
            self._loop._update(self._entry)
        else:
            self._finalize(None)
        return 0

    # -- writing ------------------------------------------------------------

    def send_bytes(self, data):
        """Send one frame holding the bytes of ``data`` (any contiguous buffer)."""
        cdef Py_buffer view
        if self._closing or self._closed:
            raise ConnectionError("send on a closed transport")
        if PyBytes_CheckExact(data):
            self._send_frame(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), data)
            return
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._send_frame(<char*>view.buf, view.len, None)
        finally:
            PyBuffer_Release(&view)

    cdef int _send_frame(self, char* p, Py_ssize_t n, owner) except -1:
        cdef Reactor loop = self._loop
        cdef char hdr[12]
        cdef Py_ssize_t h, total
        cdef ssize_t r
        cdef iovec* iov
        self.messages_sent += 1
        if n <= _COPY:
            # A small frame is copied behind its header into the loop's
            # scratch buffer: one send() and no Python object on the common
            # path. Bytes go out in order, so with a queue we must join it.
            h = write_header(loop._wbuf, n)
            memcpy(loop._wbuf + h, p, n)
            total = h + n
            if self._wq:
                return self._enqueue(PyBytes_FromStringAndSize(loop._wbuf, total), 0)
            # Try the syscall first: the socket buffer is almost always
            # free, so most sends finish here without a writer registration
            # (an epoll_ctl) and a later wake-up. Only the unsent tail is
            # queued, as an object of its own: the scratch buffer is reused.
            r = self._try_send(loop._wbuf, total)
            if r >= 0 and r < total:
                self._enqueue(PyBytes_FromStringAndSize(loop._wbuf + r, total - r), 0)
            return 0
        # A large frame is not copied: header and payload go out as one
        # vectored write, tried at once for the same reason as above; what
        # the kernel did not take is queued, the payload by reference to
        # its owner when there is one (bytes are immutable), else copied.
        h = write_header(hdr, n)
        if not self._wq:
            iov = loop._iov
            iov[0].iov_base = hdr
            iov[0].iov_len = h
            iov[1].iov_base = p
            iov[1].iov_len = n
            r = self._try_sendv(2)
            if r < 0:
                return 0
            total = h + n
            if r == total:
                return 0
        else:
            r = 0
        if r < h:
            self._enqueue(PyBytes_FromStringAndSize(hdr + r, h - r), 0)
            r = h
        if owner is not None:
            self._enqueue(owner, r - h)
        else:
            self._enqueue(PyBytes_FromStringAndSize(p + (r - h), n - (r - h)), 0)
        return 0

    def send_many(self, buffers):
        """Send each buffer of ``buffers`` as its own frame, in one syscall when they fit.

        Large buffers other than bytes are sent from their own memory, not
        copied: leave them unchanged until they are sent.
        """
        cdef Reactor loop = self._loop
        cdef list items = []
        cdef Py_ssize_t total = 0, h, n, k, i, cnt
        cdef char* w
        cdef ssize_t r
        if self._closing or self._closed:
            raise ConnectionError("send on a closed transport")
        for b in buffers:
            b = _as_frame(b)
            items.append(b)
            n = _qlen(b)
            total += n + (4 if n <= 0x7fffffff else 12)
        if not items:
            return
        self.messages_sent += len(items)
        if total <= _COPY:
            # the whole batch in the scratch buffer: one send() for many frames
            w = loop._wbuf
            k = 0
            for b in items:
                n = _qlen(b)
                k += write_header(w + k, n)
                memcpy(w + k, _qptr(b), n)
                k += n
            if self._wq:
                return self._enqueue(PyBytes_FromStringAndSize(w, k), 0)
            r = self._try_send(w, k)
            if r >= 0 and r < k:
                self._enqueue(PyBytes_FromStringAndSize(w + r, k - r), 0)
            return
        # large batches: headers as small bytes objects, then a vectored write
        # of as much as the kernel takes; the rest is queued
        pieces = []
        for b in items:
            h = write_header(loop._wbuf, _qlen(b))
            pieces.append(PyBytes_FromStringAndSize(loop._wbuf, h))
            pieces.append(b)
        r = 0
        if not self._wq:
            cnt = min(len(pieces), _IOV_MAX)
            for i in range(cnt):
                loop._iov[i].iov_base = _qptr(pieces[i])
                loop._iov[i].iov_len = _qlen(pieces[i])
            r = self._try_sendv(cnt)
            if r < 0:
                return
        i = 0
        while i < len(pieces) and r >= _qlen(pieces[i]):
            r -= _qlen(pieces[i])
            i += 1
        first = True
        while i < len(pieces):
            self._enqueue(pieces[i], r if first else 0)
            first = False
            i += 1

    cdef ssize_t _try_send(self, char* p, Py_ssize_t n) except -2:
        """send() once; bytes taken, 0 on EAGAIN, -1 if the transport failed.

        MSG_DONTWAIT, not the socket's mode: the descriptor may be shared
        with code that made it blocking, and the loop must never block.
        MSG_NOSIGNAL turns a closed peer into EPIPE for this transport
        instead of a SIGPIPE for the process. Small sends keep the GIL: the
        syscall is shorter than releasing and retaking it.
        """
        cdef ssize_t r
        cdef int err
        while True:
            r = _sys_send(self._fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT)
            if r >= 0:
                self.bytes_sent += r
                return r
            err = errno
            if err == EINTR:
                continue
            if err == EAGAIN or err == EWOULDBLOCK:
                return 0
            self._finalize(OSError(err, strerror(err).decode("utf-8", "replace")))
            return -1

    cdef ssize_t _try_sendv(self, Py_ssize_t cnt) except -2:
        """sendmsg() of the loop's iovecs once, as _try_send; large, so without the GIL."""
        cdef msghdr m
        cdef ssize_t r
        cdef int err
        m.msg_name = NULL
        m.msg_namelen = 0
        m.msg_iov = self._loop._iov
        m.msg_iovlen = cnt
        m.msg_control = NULL
        m.msg_controllen = 0
        m.msg_flags = 0
        while True:
            with nogil:
                r = _sys_sendmsg(self._fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT)
            if r >= 0:
                self.bytes_sent += r
                return r
            err = errno
            if err == EINTR:
                continue
            if err == EAGAIN or err == EWOULDBLOCK:
                return 0
            self._finalize(OSError(err, strerror(err).decode("utf-8", "replace")))
            return -1

    cdef int _enqueue(self, object b, Py_ssize_t off) except -1:
        if self._closed:
            return 0
        if not self._wq:
            self._wq_off = off
        self._wq.append(b)
        self._wq_bytes += _qlen(b) - off
        if not self._writing:
            self._writing = True
            self._loop._update(self._entry)
        if not self._bp_paused and self._wq_bytes > self._high:
            self._bp_paused = True
            self.pauses += 1
            self._loop._update(self._entry)
            pw = getattr(self.protocol, "pause_writing", None)
            if pw is not None:
                try:
                    pw()
                except Exception as exc:
                    self._loop._report(exc, "exception in pause_writing", self)
        return 0

    cdef int _write_ready(self) except -1:
        # Edge-triggered: write until the queue is empty or the kernel takes
        # less than offered (then its buffer is full and a new edge will come).
        cdef Reactor loop = self._loop
        cdef list wq
        cdef Py_ssize_t cnt, i, sz, off, offered
        cdef ssize_t r
        cdef object b
        cdef bint took_all
        while True:
            wq = self._wq
            cnt = min(len(wq), _IOV_MAX)
            if cnt == 0:
                break
            off = self._wq_off
            offered = 0
            for i in range(cnt):
                b = wq[i]
                loop._iov[i].iov_base = _qptr(b) + off
                loop._iov[i].iov_len = _qlen(b) - off
                offered += _qlen(b) - off
                off = 0
            r = self._try_sendv(cnt)
            if r <= 0:
                return 0
            took_all = r == offered
            self._wq_bytes -= r
            off = self._wq_off
            i = 0
            while i < len(wq):
                sz = _qlen(wq[i]) - off
                if r >= sz:
                    r -= sz
                    off = 0
                    i += 1
                else:
                    off += r
                    break
            del wq[:i]
            self._wq_off = off
            if self._bp_paused and self._wq_bytes <= self._low:
                self._resume_from_backpressure()
                if self._closed:
                    return 0
            if not took_all:
                break
        if not self._wq and not self._closed:
            self._writing = False
            self._wq_off = 0
            if self._closing:
                self._finalize(None)
                return 0
            loop._update(self._entry)
        return 0

    cdef int _resume_from_backpressure(self) except -1:
        cdef Reactor loop = self._loop
        self._bp_paused = False
        loop._update(self._entry)
        rw = getattr(self.protocol, "resume_writing", None)
        if rw is not None:
            try:
                rw()
            except Exception as exc:
                loop._report(exc, "exception in resume_writing", self)
        self._schedule_drain()
        return 0

    cdef int _schedule_drain(self) except -1:
        if self._dirty and not self._drain_scheduled and not self._closed:
            self._drain_scheduled = True
            self._loop._ready.append(_new_handle(self._drain_later, ()))
        return 0

    # -- control ------------------------------------------------------------

    def pause_reading(self):
        """Stop calling message_received until resume_reading()."""
        if self._closed or self._user_paused:
            return
        self._user_paused = True
        self._loop._update(self._entry)

    def resume_reading(self):
        """Undo pause_reading(); frames received meanwhile are delivered first."""
        if self._closed or not self._user_paused:
            return
        self._user_paused = False
        self._loop._update(self._entry)
        self._schedule_drain()

    def set_write_buffer_limits(self, high=None, low=None):
        """Queued bytes above ``high`` pause reading; at or below ``low`` it resumes."""
        if high is None:
            high = DEFAULT_HIGH_WATER if low is None else max(4 * low, DEFAULT_HIGH_WATER)
        if low is None:
            low = high // 4
        if not 0 <= low <= high:
            raise ValueError(f"need 0 <= low ({low}) <= high ({high})")
        self._high = high
        self._low = low

    def get_write_buffer_limits(self):
        return (self._low, self._high)

    def get_write_buffer_size(self):
        """Bytes queued and not yet taken by the kernel."""
        return self._wq_bytes

    @property
    def reading_paused(self):
        """True while reading is paused (by pause_reading or by backpressure)."""
        return self._user_paused or self._bp_paused

    @property
    def max_message_size(self):
        return None if self._max_size < 0 else self._max_size

    @property
    def socket(self):
        return self._sock

    @property
    def loop(self):
        return self._loop

    def fileno(self):
        return self._fd if not self._closed else -1

    def get_extra_info(self, name, default=None):
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

    def is_closing(self):
        return self._closing or self._closed

    @property
    def closed(self):
        return self._closed

    def close(self):
        """Stop reading, send what is queued, then close."""
        if self._closing or self._closed:
            return
        self._closing = True
        if not self._wq:
            self._finalize(None)
        else:
            self._loop._update(self._entry)

    def abort(self):
        """Close now, dropping queued bytes."""
        self._finalize(None)

    cdef int _finalize(self, exc) except -1:
        cdef Reactor loop = self._loop
        cdef _FdEntry e = self._entry
        cdef _LostCall lost
        if self._closed:
            return 0
        self._closed = True
        self._closing = True
        self._writing = False
        self._wq = []
        self._wq_bytes = 0
        self._decoder = None
        self._dirty = False
        if e is not None:
            e.stream = None
            if not loop._closed:
                loop._update(e)
            self._entry = None
        loop._streams.discard(self)
        try:
            self._sock.close()
        except OSError:
            pass
        self._on_message = None
        lost = _LostCall.__new__(_LostCall)
        lost.protocol = self.protocol
        lost.exc = exc
        loop._ready.append(_new_handle(lost, ()))
        return 0

    def __repr__(self):
        state = "closed" if self._closed else ("closing" if self._closing else f"fd={self._fd}")
        return f"<FramedTransport {state} queued={self._wq_bytes}>"
