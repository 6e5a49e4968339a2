# cython: language_level=3
"""File-descriptor passing over AF_UNIX sockets (SCM_RIGHTS).

Ancillary buffers are sized with CMSG_SPACE; received descriptors are
close-on-exec (MSG_CMSG_CLOEXEC); a truncated control message (MSG_CTRUNC)
closes every descriptor that did arrive before raising, so none leaks.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_ANY_CONTIGUOUS
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.string cimport memcpy, memset

from fastnet.errors import ProtocolError

include "sockio.pxi"

cdef extern from "<sys/socket.h>" nogil:
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    ssize_t recvmsg(int fd, msghdr* msg, int flags)
    size_t CMSG_SPACE(size_t n)
    size_t CMSG_LEN(size_t n)
    cmsghdr* CMSG_FIRSTHDR(msghdr* m)
    cmsghdr* CMSG_NXTHDR(msghdr* m, cmsghdr* c)
    unsigned char* CMSG_DATA(cmsghdr* c)
    int SOL_SOCKET
    int SCM_RIGHTS
    int MSG_CTRUNC
    int MSG_CMSG_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    int close(int fd)

#: Most descriptors one message may carry (Linux's SCM_MAX_FD).
MAX_FDS = 253


cdef int _fd_of(sock) except -1:
    cdef int fd = sock if isinstance(sock, int) else sock.fileno()
    if fd < 0:
        raise OSError(9, "socket is closed")
    return fd


cdef double _deadline_of(sock) except? -2.0:
    t = None if isinstance(sock, int) else sock.gettimeout()
    return -1.0 if t is None else _now() + t


def send_fds(sock, fds, data=None):
    """Send descriptors ``fds`` with ``data`` (default: one byte, the count mod 256,
    as multiprocessing.reduction.sendfds does) in one sendmsg. Returns bytes sent."""
    cdef list fdl = [int(f) for f in fds]
    cdef Py_ssize_t nfds = len(fdl), i
    cdef int fd = _fd_of(sock)
    cdef double deadline = _deadline_of(sock)
    cdef Py_buffer view
    cdef msghdr m
    cdef iovec iov
    cdef char* ctrl = NULL
    cdef size_t clen
    cdef cmsghdr* c
    cdef int* fdp
    cdef ssize_t r
    if nfds == 0 or nfds > MAX_FDS:
        raise ValueError(f"send between 1 and {MAX_FDS} descriptors")
    if data is None:
        data = bytes([nfds % 256])
    PyObject_GetBuffer(data, &view, PyBUF_ANY_CONTIGUOUS)
    try:
        if view.len == 0:
            raise ValueError("data must not be empty: a stream socket drops descriptors sent without bytes")
        clen = CMSG_SPACE(nfds * sizeof(int))
        ctrl = <char*>PyMem_Malloc(clen)
        if ctrl == NULL:
            raise MemoryError()
        memset(ctrl, 0, clen)
        iov.iov_base = view.buf
        iov.iov_len = view.len
        m.msg_name = NULL
        m.msg_namelen = 0
        m.msg_iov = &iov
        m.msg_iovlen = 1
        m.msg_control = ctrl
        m.msg_controllen = clen
        m.msg_flags = 0
        c = CMSG_FIRSTHDR(&m)
        c.cmsg_level = SOL_SOCKET
        c.cmsg_type = SCM_RIGHTS
        c.cmsg_len = CMSG_LEN(nfds * sizeof(int))
        fdp = <int*>CMSG_DATA(c)
        for i in range(nfds):
            fdp[i] = fdl[i]
        while True:
            with nogil:
                r = sendmsg(fd, &m, MSG_NOSIGNAL)
            if r >= 0:
                break
            if errno == EINTR:
                PyErr_CheckSignals()
                continue
            if errno == EAGAIN or errno == EWOULDBLOCK:
                if not _wait_fd(fd, POLLOUT, deadline):
                    raise FastnetTimeout("timed out sending descriptors")
                continue
            PyErr_SetFromErrno(OSError)
        # the descriptors went with the first byte; the rest is plain data
        if r < view.len:
            _send_all(fd, <char*>view.buf + r, view.len - r)
        return view.len
    finally:
        PyMem_Free(ctrl)
        PyBuffer_Release(&view)


cdef list _collect(msghdr* m, Py_ssize_t* count):
    cdef cmsghdr* c = CMSG_FIRSTHDR(m)
    cdef list out = []
    cdef size_t n, i
    cdef int* fdp
    while c != NULL:
        if c.cmsg_level == SOL_SOCKET and c.cmsg_type == SCM_RIGHTS:
            n = (c.cmsg_len - CMSG_LEN(0)) // sizeof(int)
            fdp = <int*>CMSG_DATA(c)
            for i in range(n):
                out.append(fdp[i])
        c = CMSG_NXTHDR(m, c)
    count[0] = len(out)
    return out


def recv_fds(sock, Py_ssize_t maxfds, Py_ssize_t bufsize=4096):
    """Receive up to ``bufsize`` bytes and up to ``maxfds`` descriptors: ``(data, fds)``.

    Descriptors arrive close-on-exec. EOFError if the peer closed and sent
    nothing; ProtocolError (after closing what arrived) if more descriptors
    came than ``maxfds`` allows.
    """
    cdef int fd = _fd_of(sock)
    cdef double deadline = _deadline_of(sock)
    cdef msghdr m
    cdef iovec iov
    cdef char* ctrl = NULL
    cdef size_t clen
    cdef ssize_t r
    cdef Py_ssize_t nfds = 0
    cdef object data
    cdef list fds
    if maxfds < 1 or maxfds > MAX_FDS:
        raise ValueError(f"maxfds must be between 1 and {MAX_FDS}")
    if bufsize < 1:
        raise ValueError("bufsize must be >= 1")
    clen = CMSG_SPACE(maxfds * sizeof(int))
    ctrl = <char*>PyMem_Malloc(clen)
    data = PyBytes_FromStringAndSize(NULL, bufsize)
    if ctrl == NULL:
        raise MemoryError()
    try:
        while True:
            iov.iov_base = PyBytes_AS_STRING(data)
            iov.iov_len = bufsize
            m.msg_name = NULL
            m.msg_namelen = 0
            m.msg_iov = &iov
            m.msg_iovlen = 1
            m.msg_control = ctrl
            m.msg_controllen = clen
            m.msg_flags = 0
            with nogil:
                r = recvmsg(fd, &m, MSG_CMSG_CLOEXEC)
            if r >= 0:
                break
            if errno == EINTR:
                PyErr_CheckSignals()
                continue
            if errno == EAGAIN or errno == EWOULDBLOCK:
                if not _wait_fd(fd, POLLIN, deadline):
                    raise FastnetTimeout("timed out waiting for descriptors")
                continue
            PyErr_SetFromErrno(OSError)
        fds = _collect(&m, &nfds) if m.msg_controllen else []
        if m.msg_flags & MSG_CTRUNC:
            for f in fds:
                close(f)
            raise ProtocolError(
                f"control message truncated: more than {maxfds} descriptors sent; "
                f"the {nfds} that arrived were closed")
        if r == 0 and not fds:
            raise EOFError("connection closed")
        return data[:r], fds
    finally:
        PyMem_Free(ctrl)


def send_fd(sock, int fd):
    """Send one descriptor (interoperates with multiprocessing.reduction.recv_handle)."""
    send_fds(sock, [fd])


def recv_fd(sock):
    """Receive one descriptor (interoperates with multiprocessing.reduction.send_handle)."""
    data, fds = recv_fds(sock, 1, 1)
    if not fds:
        raise ProtocolError("expected a descriptor, got plain data")
    return fds[0]
