"""Pure-Python twin of src_c/fdpass.pyx: SCM_RIGHTS descriptor passing.

Same behaviour as the compiled kernel: a socket's own timeout (or a
descriptor given as an int: no timeout) bounds the wait and raises
fastnet.TimeoutError; a truncated control message, or more descriptors than
the caller asked for (CMSG_SPACE's alignment slack can admit one more),
closes every descriptor that arrived and raises ProtocolError.
"""
from __future__ import annotations

import array
import os
import select
import socket
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, SupportsInt

if TYPE_CHECKING:
    from typing_extensions import Buffer

from fastnet import _scm
from fastnet.errors import NoDescriptorError, ProtocolError, TimeoutError as FastnetTimeout

#: Most descriptors one message may carry (Linux's SCM_MAX_FD).
MAX_FDS = _scm.MAX_FDS
_INT = _scm.INT_SIZE
_NOSIGNAL = int(socket.MSG_NOSIGNAL)
_DONTWAIT = int(socket.MSG_DONTWAIT)
_CLOEXEC = _scm.CLOEXEC
_CTRUNC = _scm.CTRUNC
_CTRL = [socket.CMSG_SPACE(n * _INT) for n in range(MAX_FDS + 1)]


def _open(sock: socket.socket | int) -> tuple[int, float, socket.socket, bool]:
    """``(fd, deadline, s, temp)``: the descriptor, the deadline its socket's
    timeout sets (-1.0: none; an int descriptor has none), and a socket object
    on it in Python's blocking mode (``temp``: made here, to be detached), so
    the deadline is ours to keep and Python never waits on its own."""
    if isinstance(sock, int):
        if sock < 0:
            raise OSError(9, "socket is closed")
        return sock, -1.0, socket.socket(fileno=sock), True
    fd = sock.fileno()
    if fd < 0:
        raise OSError(9, "socket is closed")
    t = sock.gettimeout()
    if t is None:
        return fd, -1.0, sock, False
    return fd, time.monotonic() + t, socket.socket(fileno=fd), True


def _wait_fd(fd: int, events: int, deadline: float) -> bool:
    """Wait until fd is ready; deadline < 0 waits forever. False on timeout."""
    p = select.poll()
    p.register(fd, events)
    while True:
        if deadline < 0:
            ms = None
        else:
            left = deadline - time.monotonic()
            ms = 0 if left <= 0 else int(left * 1000.0) + 1
        if p.poll(ms):
            return True
        if deadline >= 0 and time.monotonic() >= deadline:
            return False


def _sendmsg_fds(s: socket.socket, fd: int, deadline: float, data: bytes | memoryview, fdl: array.array[int]) -> None:
    """sendmsg data with fdl as SCM_RIGHTS, then the rest of data plainly."""
    anc = _scm.scm_rights(fdl)
    while True:
        try:
            # a message this small goes at once or not at all; wait only on EAGAIN
            r = s.sendmsg([data], anc, _NOSIGNAL | _DONTWAIT)
            break
        except BlockingIOError:
            if not _wait_fd(fd, select.POLLOUT, deadline):
                raise FastnetTimeout("timed out sending descriptors") from None
    # the descriptors went with the first byte; the rest is plain data
    n = len(data)
    if r < n:
        view = memoryview(data).cast("B")
        while r < n:
            try:
                r += s.send(view[r:], _NOSIGNAL | _DONTWAIT)
            except BlockingIOError:
                _wait_fd(fd, select.POLLOUT, -1.0)


def send_fds(sock: socket.socket | int, fds: Iterable[SupportsInt], data: Buffer | None = None) -> int:
    """Send descriptors ``fds`` with ``data`` (default: one byte, the count mod 256,
    as multiprocessing.reduction.sendfds does) in one sendmsg. Returns bytes sent."""
    fdl = array.array("i", [int(f) for f in fds])
    if not 1 <= len(fdl) <= MAX_FDS:
        raise ValueError(f"send between 1 and {MAX_FDS} descriptors")
    fd, deadline, s, temp = _open(sock)
    try:
        if data is None:
            data = bytes([len(fdl) % 256])
        else:
            data = memoryview(data).cast("B")
            if not len(data):
                raise ValueError("data must not be empty: a stream socket drops descriptors sent without bytes")
        _sendmsg_fds(s, fd, deadline, data, fdl)
        return len(data)
    finally:
        if temp:
            s.detach()


def _recvmsg_fds(s: socket.socket, fd: int, deadline: float, bufsize: int, maxfds: int) -> tuple[bytes, list[int]]:
    """recvmsg up to bufsize bytes with room for maxfds descriptors: ``(data, fds)``.

    A truncated control message, or more than maxfds descriptors, closes all
    that arrived and raises ProtocolError; nothing and no descriptor (a
    closed peer) raises EOFError.
    """
    while True:
        try:
            if deadline >= 0:
                data, anc, flags, _ = s.recvmsg(bufsize, _CTRL[maxfds], _CLOEXEC | _DONTWAIT)
            else:
                data, anc, flags, _ = s.recvmsg(bufsize, _CTRL[maxfds], _CLOEXEC)
            break
        except BlockingIOError:
            # a deadline, or a descriptor made non-blocking behind our back
            if not _wait_fd(fd, select.POLLIN, deadline):
                raise FastnetTimeout("timed out waiting for descriptors") from None
    fds = _scm.scm_fds(anc)
    if flags & _CTRUNC or len(fds) > maxfds:
        for f in fds:
            os.close(f)
        raise ProtocolError(
            f"control message truncated: more than {maxfds} descriptors sent; "
            f"the {len(fds)} that arrived were closed")
    if not data and not fds:
        raise EOFError("connection closed")
    return data, fds


def recv_fds(sock: socket.socket | int, maxfds: int, bufsize: int = 4096) -> tuple[bytes, list[int]]:
    """Receive up to ``bufsize`` bytes and up to ``maxfds`` descriptors: ``(data, fds)``.

    Descriptors arrive close-on-exec. EOFError if the peer closed and sent
    nothing; ProtocolError (after closing what arrived) if more descriptors
    came than ``maxfds`` allows.
    """
    if not 1 <= maxfds <= MAX_FDS:
        raise ValueError(f"maxfds must be between 1 and {MAX_FDS}")
    if bufsize < 1:
        raise ValueError("bufsize must be >= 1")
    fd, deadline, s, temp = _open(sock)
    try:
        return _recvmsg_fds(s, fd, deadline, bufsize, maxfds)
    finally:
        if temp:
            s.detach()


def send_fd(sock: socket.socket | int, fd: int) -> None:
    """Send one descriptor (interoperates with multiprocessing.reduction.recv_handle)."""
    fdl = array.array("i", (fd,))
    sfd, deadline, s, temp = _open(sock)
    try:
        _sendmsg_fds(s, sfd, deadline, b"\x01", fdl)
    finally:
        if temp:
            s.detach()


def recv_fd(sock: socket.socket | int) -> int:
    """Receive one descriptor (interoperates with multiprocessing.reduction.send_handle)."""
    fd, deadline, s, temp = _open(sock)
    try:
        fds = _recvmsg_fds(s, fd, deadline, 1, 1)[1]
    finally:
        if temp:
            s.detach()
    if not fds:
        raise NoDescriptorError("expected a descriptor, got plain data")
    return fds[0]
