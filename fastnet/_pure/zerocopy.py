"""Pure-Python twin of src_c/zerocopy.pyx: the Cookbook 11.13 loops."""
from __future__ import annotations

import select
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Buffer

from fastnet.errors import TimeoutError as FastnetTimeout, TruncatedFrameError

_CHUNK = 1 << 30


def _sock_of(sock: socket.socket | int) -> tuple[socket.socket, bool]:
    if isinstance(sock, int):
        return socket.socket(fileno=sock), True
    if sock.fileno() < 0:
        raise OSError(9, "socket is closed")
    return sock, False


def _wait(fd: int, events: int, deadline: float) -> bool:
    p = select.poll()
    p.register(fd, events)
    left = deadline - time.monotonic()
    if left <= 0 or not p.poll(left * 1000.0 + 1):
        if time.monotonic() >= deadline:
            return False
    return True


def _byte_view(buf: Buffer, writable: bool) -> memoryview:
    """A flat byte view of a C- or Fortran-contiguous buffer, like PyBUF_ANY_CONTIGUOUS.

    memoryview.cast() only works on C-contiguous views; a Fortran-contiguous
    numpy array's transpose is C-contiguous over the same bytes in the same order.
    """
    view = memoryview(buf)
    if writable and view.readonly:
        raise BufferError("buffer is not writable")
    if view.nbytes == 0:  # cast() refuses zeros in the shape
        return memoryview(bytearray())
    if not view.c_contiguous and view.f_contiguous:
        t = getattr(buf, "T", None)
        if t is not None and memoryview(t).c_contiguous:
            view = memoryview(t)
    if not view.c_contiguous:
        raise BufferError("buffer is not contiguous")
    return view.cast("B")


def _nonblocking(s: socket.socket) -> socket.socket:
    """A timeout-0 socket object over ``s``'s descriptor (detach it after use).

    A socket object with a timeout waits up to its whole timeout inside every
    send/recv call, which would overrun the transfer's deadline and raise the
    builtin timeout; the twin's calls return at once and ``_wait`` honours the
    deadline. A socket with a timeout is already O_NONBLOCK, so nothing changes
    for the caller's object.
    """
    raw = socket.socket(s.family, s.type, s.proto, fileno=s.fileno())
    raw.settimeout(0.0)
    return raw


def send_from(buf: Buffer, sock: socket.socket | int) -> int:
    """Send every byte of a contiguous buffer (bytes, bytearray, numpy array...).

    ``sock`` is a socket object or a descriptor. Returns the number of bytes
    sent. A socket with a timeout is honoured: the whole transfer must finish
    within it.
    """
    view = _byte_view(buf, False)
    s, borrowed = _sock_of(sock)
    try:
        timeout = s.gettimeout()
        n = len(view)
        if timeout is None:
            s.sendall(view)
            return n
        deadline = time.monotonic() + timeout
        fd = s.fileno()
        raw = _nonblocking(s)
        try:
            sent = 0
            while sent < n:
                try:
                    sent += raw.send(view[sent:sent + _CHUNK], socket.MSG_NOSIGNAL)
                except (BlockingIOError, InterruptedError):
                    if not _wait(fd, select.POLLOUT, deadline):
                        raise FastnetTimeout(f"timed out with {n - sent} bytes left to send") from None
        finally:
            raw.detach()
        return n
    finally:
        if borrowed:
            s.detach()


def recv_into(buf: Buffer, sock: socket.socket | int) -> int:
    """Fill a writable contiguous buffer completely from the socket.

    Returns the number of bytes received (the buffer's size). A close before
    the buffer is full raises EOFError if nothing arrived, else
    TruncatedFrameError saying how many bytes were missing.
    """
    view = _byte_view(buf, True)
    n = len(view)
    s, borrowed = _sock_of(sock)
    try:
        timeout = s.gettimeout()
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = s.fileno()
        raw = s if deadline is None else _nonblocking(s)
        try:
            got = 0
            while got < n:
                try:
                    if deadline is None:
                        r = raw.recv_into(view[got:], n - got, socket.MSG_WAITALL)
                    else:
                        r = raw.recv_into(view[got:], n - got)
                except (BlockingIOError, InterruptedError):
                    if deadline is None:  # a descriptor made non-blocking behind our back
                        p = select.poll()
                        p.register(fd, select.POLLIN)
                        p.poll()
                    elif not _wait(fd, select.POLLIN, deadline):
                        raise FastnetTimeout("timed out waiting for data") from None
                    continue
                if r == 0:
                    if got == 0:
                        raise EOFError("connection closed")
                    raise TruncatedFrameError(
                        n - got, f"connection closed with {n - got} of {n} bytes still to receive")
                got += r
            return got
        finally:
            if raw is not s:
                raw.detach()
    finally:
        if borrowed:
            s.detach()
