# Syscall helpers shared by the kernels that touch sockets (included, not imported).
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from libc.errno cimport errno, EINTR, EAGAIN

cdef extern from "<errno.h>":
    int EWOULDBLOCK

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct iovec:
        void* iov_base
        size_t iov_len
    struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    ssize_t sendmsg(int fd, const msghdr* msg, int flags)
    int MSG_NOSIGNAL
    int MSG_DONTWAIT
    int MSG_WAITALL

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd* fds, unsigned long nfds, int timeout)
    short POLLIN
    short POLLOUT

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec* ts)
    int CLOCK_MONOTONIC

DEF IOV_BATCH = 512

cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef int _wait_fd(int fd, short events, double deadline) except -1:
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
            else:
                ms = <int>(left * 1000.0) + 1
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


