"""Pure-Python twin of src_c/zerocopy.pyx: the Cookbook 11.13 loops."""
import select
import socket
import time

from fastnet.errors import TimeoutError as FastnetTimeout, TruncatedFrameError

_CHUNK = 1 << 30


def _sock_of(sock):
    if isinstance(sock, int):
        return socket.socket(fileno=sock), True
    if sock.fileno() < 0:
        raise OSError(9, "socket is closed")
    return sock, False


def _wait(fd, events, deadline):
    p = select.poll()
    p.register(fd, events)
    left = deadline - time.monotonic()
    if left <= 0 or not p.poll(left * 1000.0 + 1):
        if time.monotonic() >= deadline:
            return False
    return True


def send_from(buf, sock):
    """Send every byte of a contiguous buffer (bytes, bytearray, numpy array...).

    ``sock`` is a socket object or a descriptor. Returns the number of bytes
    sent. A socket with a timeout is honoured: the whole transfer must finish
    within it.
    """
    view = memoryview(buf)
    if not view.contiguous:
        raise BufferError("buffer is not contiguous")
    view = view.cast("B")
    s, borrowed = _sock_of(sock)
    try:
        timeout = s.gettimeout()
        n = len(view)
        if timeout is None:
            s.sendall(view)
            return n
        deadline = time.monotonic() + timeout
        fd = s.fileno()
        sent = 0
        while sent < n:
            try:
                sent += s.send(view[sent:sent + _CHUNK], socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                if not _wait(fd, select.POLLOUT, deadline):
                    raise FastnetTimeout(f"timed out with {n - sent} bytes left to send") from None
        return n
    finally:
        if borrowed:
            s.detach()


def recv_into(buf, sock):
    """Fill a writable contiguous buffer completely from the socket.

    Returns the number of bytes received (the buffer's size). A close before
    the buffer is full raises EOFError if nothing arrived, else
    TruncatedFrameError saying how many bytes were missing.
    """
    view = memoryview(buf)
    if view.readonly:
        raise BufferError("buffer is not writable")
    if not view.contiguous:
        raise BufferError("buffer is not contiguous")
    view = view.cast("B")
    n = len(view)
    s, borrowed = _sock_of(sock)
    try:
        timeout = s.gettimeout()
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = s.fileno()
        got = 0
        while got < n:
            try:
                if deadline is None:
                    r = s.recv_into(view[got:], n - got, socket.MSG_WAITALL)
                else:
                    r = s.recv_into(view[got:], n - got, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError, socket.timeout):
                if deadline is None or not _wait(fd, select.POLLIN, deadline):
                    if deadline is not None:
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
        if borrowed:
            s.detach()
