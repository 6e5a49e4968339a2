# cython: language_level=3
"""File-descriptor passing over AF_UNIX sockets (SCM_RIGHTS).

Ancillary buffers are sized with CMSG_SPACE; received descriptors are
close-on-exec (MSG_CMSG_CLOEXEC); a truncated control message (MSG_CTRUNC),
or more descriptors than the caller asked for (CMSG_SPACE's alignment slack
can admit one more), closes every descriptor that did arrive before raising,
so none leaks.

The control buffer and small data buffers live on the stack; send_fd and
recv_fd have their own single-descriptor paths that build no Python list.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_ANY_CONTIGUOUS
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.ref cimport Py_INCREF
from libc.string cimport memset

from fastnet.errors import NoDescriptorError, ProtocolError

include "sockio.pxi"


#: Most descriptors one message may carry (Linux's SCM_MAX_FD).
MAX_FDS = 253
DEF _MAX_FDS = 253
# CMSG_SPACE(253 * sizeof(int)) on every ABI Linux runs on (1040 on LP64), rounded up
DEF _CTRL_SPACE = 1088
# Room for every int the largest control buffer can hold
DEF _FDV_SPACE = _CTRL_SPACE // 4
# Receives of at most this many bytes go through a stack buffer
DEF _STACK_DATA = 4096

# send_fd's data: the descriptor count, as multiprocessing.reduction sends it
cdef const char* _COUNT_BYTE = b"\x01"


cdef int _fd_of(sock) except -1:
    cdef int fd = sock if isinstance(sock, int) else sock.fileno()
    if fd < 0:
        raise OSError(9, "socket is closed")
    return fd


cdef double _deadline_of(sock) except? -2.0:
    t = None if isinstance(sock, int) else sock.gettimeout()
    return -1.0 if t is None else _now() + t


cdef int _sendmsg_fds(int fd, double deadline, const char* buf, Py_ssize_t n,
                      const int* fdv, Py_ssize_t nfds) except -1:
    """sendmsg buf[:n] with fdv[:nfds] as SCM_RIGHTS, then the rest of buf plainly."""
    cdef char ctrl[_CTRL_SPACE]
    cdef msghdr m
    cdef iovec iov
    cdef cmsghdr* c
    cdef int* fdp
    cdef Py_ssize_t i
    cdef size_t clen = CMSG_SPACE(nfds * sizeof(int))
    cdef ssize_t r
    memset(ctrl, 0, clen)
    iov.iov_base = <void*>buf
    iov.iov_len = n
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
        fdp[i] = fdv[i]
    while True:
        # a message this small goes at once or not at all: try it with the GIL
        # held and release the GIL only to wait (as _send_all does)
        r = sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT)
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
        return -1
    # the descriptors went with the first byte; the rest is plain data
    if r < n:
        _send_all(fd, buf + r, n - r)
    return 0


def send_fds(sock, fds, data=None):
    """Send descriptors ``fds`` with ``data`` (default: one byte, the count mod 256,
    as multiprocessing.reduction.sendfds does) in one sendmsg. Returns bytes sent."""
    cdef int fdv[_MAX_FDS]
    cdef Py_ssize_t nfds = 0
    cdef Py_buffer view
    cdef int fd
    cdef double deadline
    cdef char count
    for f in fds:
        if nfds == _MAX_FDS:
            raise ValueError(f"send between 1 and {MAX_FDS} descriptors")
        fdv[nfds] = int(f)
        nfds += 1
    if nfds == 0:
        raise ValueError(f"send between 1 and {MAX_FDS} descriptors")
    fd = _fd_of(sock)
    deadline = _deadline_of(sock)
    if data is None:
        count = <char>(nfds % 256)
        _sendmsg_fds(fd, deadline, &count, 1, fdv, nfds)
        return 1
    PyObject_GetBuffer(data, &view, PyBUF_ANY_CONTIGUOUS)
    try:
        if view.len == 0:
            raise ValueError("data must not be empty: a stream socket drops descriptors sent without bytes")
        _sendmsg_fds(fd, deadline, <const char*>view.buf, view.len, fdv, nfds)
        return view.len
    finally:
        PyBuffer_Release(&view)


cdef Py_ssize_t _recvmsg_fds(int fd, double deadline, char* buf, Py_ssize_t n,
                             Py_ssize_t maxfds, int* fdv, Py_ssize_t* nfds) except -1:
    """recvmsg into buf[:n] with room for maxfds descriptors, stored in fdv.

    Returns the byte count. A truncated control message, or more than maxfds
    descriptors, closes all that arrived and raises ProtocolError; nothing
    and no descriptor (a closed peer) raises EOFError.
    """
    cdef char ctrl[_CTRL_SPACE]
    cdef msghdr m
    cdef iovec iov
    cdef cmsghdr* c
    cdef int* fdp
    cdef size_t k, cnt
    cdef Py_ssize_t got = 0, i
    cdef ssize_t r
    while True:
        iov.iov_base = buf
        iov.iov_len = n
        m.msg_name = NULL
        m.msg_namelen = 0
        m.msg_iov = &iov
        m.msg_iovlen = 1
        m.msg_control = ctrl
        m.msg_controllen = CMSG_SPACE(maxfds * sizeof(int))
        m.msg_flags = 0
        if deadline >= 0:
            r = recvmsg(fd, &m, MSG_CMSG_CLOEXEC | MSG_DONTWAIT)
        else:
            with nogil:
                r = recvmsg(fd, &m, MSG_CMSG_CLOEXEC)
        if r >= 0:
            break
        if errno == EINTR:
            PyErr_CheckSignals()
            continue
        if errno == EAGAIN or errno == EWOULDBLOCK:
            # a deadline, or a descriptor made non-blocking behind our back
            if not _wait_fd(fd, POLLIN, deadline):
                raise FastnetTimeout("timed out waiting for descriptors")
            continue
        PyErr_SetFromErrno(OSError)
        return -1
    if m.msg_controllen:
        c = CMSG_FIRSTHDR(&m)
        while c != NULL:
            if c.cmsg_level == SOL_SOCKET and c.cmsg_type == SCM_RIGHTS:
                cnt = (c.cmsg_len - CMSG_LEN(0)) // sizeof(int)
                fdp = <int*>CMSG_DATA(c)
                for k in range(cnt):
                    if got < _FDV_SPACE:
                        fdv[got] = fdp[k]
                        got += 1
                    else:  # cannot happen: the control buffer holds fewer ints
                        close(fdp[k])
            c = CMSG_NXTHDR(&m, c)
    nfds[0] = got
    if (m.msg_flags & MSG_CTRUNC) or got > maxfds:
        for i in range(got):
            close(fdv[i])
        nfds[0] = 0
        raise ProtocolError(
            f"control message truncated: more than {maxfds} descriptors sent; "
            f"the {got} that arrived were closed")
    if r == 0 and got == 0:
        raise EOFError("connection closed")
    return r


cdef list _fd_list(const int* fdv, Py_ssize_t n):
    cdef list out = PyList_New(n)
    cdef Py_ssize_t i
    cdef object o
    for i in range(n):
        o = fdv[i]
        Py_INCREF(o)
        PyList_SET_ITEM(out, i, o)
    return out


def recv_fds(sock, Py_ssize_t maxfds, Py_ssize_t bufsize=4096):
    """Receive up to ``bufsize`` bytes and up to ``maxfds`` descriptors: ``(data, fds)``.

    Descriptors arrive close-on-exec. EOFError if the peer closed and sent
    nothing; ProtocolError (after closing what arrived) if more descriptors
    came than ``maxfds`` allows.
    """
    cdef int fdv[_FDV_SPACE]
    cdef char sbuf[_STACK_DATA]
    cdef Py_ssize_t nfds = 0, r, i
    cdef int fd
    cdef double deadline
    cdef object data
    if maxfds < 1 or maxfds > _MAX_FDS:
        raise ValueError(f"maxfds must be between 1 and {MAX_FDS}")
    if bufsize < 1:
        raise ValueError("bufsize must be >= 1")
    fd = _fd_of(sock)
    deadline = _deadline_of(sock)
    if bufsize <= _STACK_DATA:
        r = _recvmsg_fds(fd, deadline, sbuf, bufsize, maxfds, fdv, &nfds)
        try:
            data = PyBytes_FromStringAndSize(sbuf, r)
        except BaseException:
            for i in range(nfds):
                close(fdv[i])
            raise
    else:
        data = PyBytes_FromStringAndSize(NULL, bufsize)
        r = _recvmsg_fds(fd, deadline, PyBytes_AS_STRING(data), bufsize, maxfds, fdv, &nfds)
        if r < bufsize:
            try:
                data = data[:r]
            except BaseException:
                for i in range(nfds):
                    close(fdv[i])
                raise
    return data, _fd_list(fdv, nfds)


def send_fd(sock, int fd):
    """Send one descriptor (interoperates with multiprocessing.reduction.recv_handle)."""
    cdef int sfd = _fd_of(sock)
    _sendmsg_fds(sfd, _deadline_of(sock), _COUNT_BYTE, 1, &fd, 1)


def recv_fd(sock):
    """Receive one descriptor (interoperates with multiprocessing.reduction.send_handle)."""
    cdef int fdv[_FDV_SPACE]
    cdef char b
    cdef Py_ssize_t nfds = 0
    cdef int fd = _fd_of(sock)
    _recvmsg_fds(fd, _deadline_of(sock), &b, 1, 1, fdv, &nfds)
    if nfds == 0:
        raise NoDescriptorError("expected a descriptor, got plain data")
    return fdv[0]
