# cython: language_level=3
# The reactor's C-level interface: the extension types of fastnet._c.reactor
# with their attributes and C methods, and the system calls only the reactor
# makes. src_c/reactor.pyx is the module; its parts are the src_c/reactor_*.pxi
# files it includes, one per piece of the kernel (handles, timers, poller,
# loop, transport), all sharing these declarations. Cython looks a module's
# .pxd up by its full name, hence this file's path under src_c.
cimport cython
from libc.stdint cimport uint32_t, uint64_t

from syscalls cimport iovec, msghdr, pollfd

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


cdef class Handle:
    cdef object _callback
    cdef tuple _args
    cdef bint _cancelled


cdef class TimerHandle(Handle):
    cdef double _when
    cdef unsigned long long _seq
    cdef bint _scheduled
    cdef Reactor _loop


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
    cdef object _region        # a _MemRegion (sockio.pxi), typed where it is used
    cdef readonly unsigned long long ctl_calls
    cdef readonly unsigned long long iterations
    cdef readonly double spin      # busy-poll budget of a wait, microseconds as given
    cdef double _spin_s            # ... in seconds; 0: never spin

    cdef _FdEntry _entry(self, int fd)
    cdef inline _FdEntry _lookup(self, int fd)
    cdef int _update(self, _FdEntry e) except -1
    cdef int _check_open(self) except -1
    cdef TimerHandle _call_at(self, double when, callback, tuple args)
    cdef int _enter(self) except -1
    cdef int _run_once(self, double max_timeout) except -1
    cdef int _run_handle(self, Handle h) except -1
    cdef int _report(self, exc, str message, obj) except -1
    cdef int _dispatch(self, int fd, int m) except -1


cdef class _LostCall:
    cdef object protocol
    cdef object exc


# What every transport on a Reactor shares, FramedTransport and
# fastnet.tls.TLSTransport (a Python subclass) alike: the socket, the
# protocol, the write-buffer water marks and the pause flags, the counters.
# The attributes a Python subclass writes are public; those it only reads
# are readonly; the rest are for C alone.
cdef class TransportBase:
    cdef readonly Reactor _loop
    cdef readonly object _sock
    cdef readonly int _fd
    cdef readonly object protocol
    cdef long long _max_size
    cdef Py_ssize_t _high
    cdef Py_ssize_t _low
    cdef public Py_ssize_t _wq_bytes
    cdef bint _user_paused
    cdef bint _bp_paused
    cdef public bint _closing
    cdef public bint _closed
    cdef public bint _eof          # the peer ended its stream
    cdef unsigned long long _pauses

    cpdef _check_high(self)
    cpdef _check_low(self)
    cpdef _reading_changed(self)
    cpdef _schedule_drain(self)
    cpdef _flush_then_close(self)
    cpdef _finalize(self, exc)


# A function, not a method: FramedTransport's read path and the reactor call
# it per event and per frame, and Cython calls a base class's method through
# the vtable, not inlined.
cdef inline bint _want_read(TransportBase t) noexcept:
    return not (t._user_paused or t._bp_paused or t._closing or t._eof)


cdef class FramedTransport(TransportBase):
    cdef _FdEntry _entry
    cdef object _on_message
    cdef object _decoder
    cdef bint _dirty
    cdef list _wq
    cdef Py_ssize_t _wq_off
    cdef bint _writing
    cdef bint _drain_scheduled
    cdef readonly unsigned long long messages_received
    cdef readonly unsigned long long messages_sent
    cdef readonly unsigned long long bytes_received
    cdef readonly unsigned long long bytes_sent

    cdef int _read_ready(self, bint hup) except -1
    cdef int _read_once(self) except -1
    cdef int _read_direct(self) except -1
    cdef int _process(self, char* p, Py_ssize_t n) except -1
    cdef int _feed(self, char* p, Py_ssize_t n) except -2
    cdef int _drain(self) except -1
    cdef int _deliver(self, frame) except -1
    cdef int _on_eof(self) except -1
    cdef int _send_frame(self, char* p, Py_ssize_t n, owner) except -1
    cdef ssize_t _try_send(self, char* p, Py_ssize_t n) except -2
    cdef ssize_t _try_sendv(self, Py_ssize_t cnt) except -2
    cdef int _enqueue(self, object b, Py_ssize_t off) except -1
    cdef int _write_ready(self) except -1
    cpdef _reading_changed(self)
    cpdef _schedule_drain(self)
    cpdef _flush_then_close(self)
    cpdef _finalize(self, exc)
