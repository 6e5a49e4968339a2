# Syscall helpers shared by the kernels that touch sockets (included, not imported).
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from libc.errno cimport errno, EINTR, EAGAIN

from fastnet.errors import TimeoutError as FastnetTimeout

from syscalls cimport *

DEF IOV_BATCH = 512

cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline bint _spin_on(double until) noexcept nogil:
    """One more turn of a busy-poll, if time is left before ``until``.

    Each turn first lets a runnable task on this CPU run: when both ends of
    a connection share one CPU, that task is the peer being waited for, and
    a spin that kept the CPU would only delay its answer.
    """
    sched_yield()
    return _now() < until


cdef inline int _wait_fd(int fd, short events, double deadline) except -1:
    """Wait until fd is ready; deadline < 0 waits forever. Return 0 on timeout."""
    cdef pollfd p
    cdef int rc, ms
    cdef double left
    p.fd = fd
    p.events = events
    while True:
        if deadline < 0:
            ms = -1
        else:
            left = deadline - _now()
            if left <= 0:
                ms = 0
            elif left < 2000000.0:
                ms = <int>(left * 1000.0) + 1
            else:
                ms = 2000000000     # poll() takes an int; a far deadline is re-polled
        with nogil:
            rc = poll(&p, 1, ms)
        if rc > 0:
            return 1
        if rc == 0:
            if deadline >= 0 and _now() >= deadline:
                return 0
            continue
        if errno == EINTR:
            PyErr_CheckSignals()
            continue
        PyErr_SetFromErrno(OSError)
        return -1




cdef inline int _send_all(int fd, const char* p, Py_ssize_t n) except -1:
    """Send every byte; small writes are tried with the GIL held, waits release it."""
    cdef ssize_t r
    # A small write is tried at once, non-blocking and with the GIL held:
    # the socket buffer almost always has room, and a send that completes
    # is cheaper than dropping and retaking the GIL. Only on EAGAIN is the
    # GIL released, to wait in poll(). A large write releases the GIL for
    # the send itself, whose copy into the kernel then dominates.
    while n > 0:
        if n > 65536:
            with nogil:
                r = send(fd, p, n, MSG_NOSIGNAL)
        else:
            r = send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT)
        if r >= 0:
            p += r
            n -= r
            continue
        if errno == EAGAIN or errno == EWOULDBLOCK:
            if _wait_fd(fd, POLLOUT, -1.0) < 0:
                return -1
            continue
        if errno == EINTR:
            PyErr_CheckSignals()
            continue
        PyErr_SetFromErrno(OSError)
        return -1
    return 0


cdef inline int _sendv_all(int fd, iovec* iov, Py_ssize_t cnt) except -1:
    """sendmsg every byte of iov[0:cnt], resuming after partial writes (iov is consumed)."""
    cdef msghdr m
    cdef ssize_t r
    cdef size_t left
    cdef Py_ssize_t i = 0
    # Vectored writes carry a large payload (small frames go through
    # _send_all), so the GIL is released for the call at once; after a
    # partial write the iovecs are advanced past the bytes the kernel took.
    while i < cnt:
        m.msg_name = NULL
        m.msg_namelen = 0
        m.msg_iov = iov + i
        m.msg_iovlen = min(cnt - i, IOV_BATCH)
        m.msg_control = NULL
        m.msg_controllen = 0
        m.msg_flags = 0
        with nogil:
            r = sendmsg(fd, &m, MSG_NOSIGNAL)
        if r < 0:
            if errno == EINTR:
                PyErr_CheckSignals()
                continue
            if errno == EAGAIN or errno == EWOULDBLOCK:
                if _wait_fd(fd, POLLOUT, -1.0) < 0:
                    return -1
                continue
            PyErr_SetFromErrno(OSError)
            return -1
        left = <size_t>r
        while i < cnt and left >= iov[i].iov_len:
            left -= iov[i].iov_len
            i += 1
        if left:
            iov[i].iov_base = <char*>iov[i].iov_base + left
            iov[i].iov_len -= left
    return 0


cdef inline Py_ssize_t _recv_some(int fd, char* p, Py_ssize_t n, double deadline, bint waitall) except -1:
    """recv up to n bytes (MSG_WAITALL when waitall and no deadline); 0 means EOF.

    Without a deadline the blocking recv runs with the GIL released; with one,
    poll() waits (GIL released) and recv never blocks.
    """
    cdef ssize_t r
    cdef int flags
    while True:
        if deadline >= 0:
            r = recv(fd, p, n, MSG_DONTWAIT)
        else:
            flags = MSG_WAITALL if waitall else 0
            with nogil:
                r = recv(fd, p, n, flags)
        if r >= 0:
            return r
        if errno == EINTR:
            PyErr_CheckSignals()
            continue
        if errno == EAGAIN or errno == EWOULDBLOCK:
            # a deadline, or a descriptor made non-blocking behind our back
            if not _wait_fd(fd, POLLIN, deadline):
                raise FastnetTimeout("timed out waiting for data")
            continue
        PyErr_SetFromErrno(OSError)
        return -1


cdef class _MemRegion:
    """A flat byte buffer over memory that its owner keeps alive.

    FrameDecoder.get_buffer hands out a writable one over its own buffer; the
    reactor feeds a read-only one over its shared receive buffer.
    """
    cdef object owner
    cdef char* ptr
    cdef Py_ssize_t size
    cdef bint readonly
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]

    def __getbuffer__(self, Py_buffer* view, int flags):
        if self.readonly and (flags & 1):   # PyBUF_WRITABLE
            raise BufferError("region is read-only")
        self.shape[0] = self.size
        self.strides[0] = 1
        view.buf = self.ptr
        view.obj = self
        view.len = self.size
        view.readonly = self.readonly
        view.itemsize = 1
        if flags & 4:   # PyBUF_FORMAT
            view.format = "B"
        else:
            view.format = NULL
        view.ndim = 1
        view.shape = self.shape
        view.strides = self.strides
        view.suboffsets = NULL
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer* view):
        pass
