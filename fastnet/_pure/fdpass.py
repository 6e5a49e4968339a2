"""Pure-Python twin of src_c/fdpass.pyx: SCM_RIGHTS descriptor passing."""
import array
import os
import socket

from fastnet.errors import ProtocolError

#: Most descriptors one message may carry (Linux's SCM_MAX_FD).
MAX_FDS = 253
_INT = array.array("i").itemsize


def _sock_of(sock):
    if isinstance(sock, int):
        return socket.socket(fileno=sock), True
    if sock.fileno() < 0:
        raise OSError(9, "socket is closed")
    return sock, False


def send_fds(sock, fds, data=None):
    """Send descriptors ``fds`` with ``data`` (default: one byte, the count mod 256,
    as multiprocessing.reduction.sendfds does) in one sendmsg. Returns bytes sent."""
    fdl = array.array("i", [int(f) for f in fds])
    if not 1 <= len(fdl) <= MAX_FDS:
        raise ValueError(f"send between 1 and {MAX_FDS} descriptors")
    if data is None:
        data = bytes([len(fdl) % 256])
    view = memoryview(data).cast("B")
    if not len(view):
        raise ValueError("data must not be empty: a stream socket drops descriptors sent without bytes")
    s, borrowed = _sock_of(sock)
    try:
        r = s.sendmsg([view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fdl)], socket.MSG_NOSIGNAL)
        # the descriptors went with the first byte; the rest is plain data
        if r < len(view):
            s.sendall(view[r:])
        return len(view)
    finally:
        if borrowed:
            s.detach()


def recv_fds(sock, maxfds, bufsize=4096):
    """Receive up to ``bufsize`` bytes and up to ``maxfds`` descriptors: ``(data, fds)``.

    Descriptors arrive close-on-exec. EOFError if the peer closed and sent
    nothing; ProtocolError (after closing what arrived) if more descriptors
    came than ``maxfds`` allows.
    """
    if not 1 <= maxfds <= MAX_FDS:
        raise ValueError(f"maxfds must be between 1 and {MAX_FDS}")
    if bufsize < 1:
        raise ValueError("bufsize must be >= 1")
    s, borrowed = _sock_of(sock)
    try:
        data, anc, flags, _ = s.recvmsg(bufsize, socket.CMSG_SPACE(maxfds * _INT), socket.MSG_CMSG_CLOEXEC)
    finally:
        if borrowed:
            s.detach()
    fds = array.array("i")
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % _INT])
    fds = list(fds)
    if flags & socket.MSG_CTRUNC:
        for f in fds:
            os.close(f)
        raise ProtocolError(
            f"control message truncated: more than {maxfds} descriptors sent; "
            f"the {len(fds)} that arrived were closed")
    if not data and not fds:
        raise EOFError("connection closed")
    return data, fds


def send_fd(sock, fd):
    """Send one descriptor (interoperates with multiprocessing.reduction.recv_handle)."""
    send_fds(sock, [fd])


def recv_fd(sock):
    """Receive one descriptor (interoperates with multiprocessing.reduction.send_handle)."""
    data, fds = recv_fds(sock, 1, 1)
    if not fds:
        raise ProtocolError("expected a descriptor, got plain data")
    return fds[0]
