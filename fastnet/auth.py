"""The authkey handshake, spoken on a blocking connection.

The protocol is :class:`fastnet.handshake.Handshake`'s (CPython's
multiprocessing.connection handshake, byte for byte, so a fastnet peer and a
stdlib peer of Python 3.10-3.13 authenticate each other; its module comment
writes it down). These functions drive that machine over anything with
``send_bytes``/``recv_bytes``: a fastnet Connection, or a stdlib one.

A peer that closes cleanly during the handshake raises EOFError, as
multiprocessing does; wrong bytes raise AuthenticationError, and a
``timeout`` bounds the whole exchange so a silent peer cannot hold it.
"""
from __future__ import annotations

import socket
import ssl
import time
from typing import Any, cast

from fastnet.errors import (AuthenticationError, HandshakeMessageTooLarge, MessageTooLarge, ProtocolError,
                            TimeoutError, TruncatedFrameError)
from fastnet.handshake import DEFAULT_DIGEST, MAX_MESSAGE, Handshake, take_frames
from fastnet.handshake import quickack as quickack  # the drivers' one copy

__all__ = [
    "deliver_challenge",
    "answer_challenge",
    "server_authenticate",
    "client_authenticate",
    "DEFAULT_DIGEST",
]


def _recv(conn: Any, deadline: float | None) -> bytes:
    """The payload of the peer's next frame, read exactly (conn's own receive)."""
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        recv = conn._recv_handshake
    except AttributeError:
        return cast(bytes, conn.recv_bytes(MAX_MESSAGE))
    try:
        return cast(bytes, recv(MAX_MESSAGE, timeout))
    except (TimeoutError, MessageTooLarge, EOFError, ProtocolError) as exc:
        cause = exc if isinstance(exc, ProtocolError) and not isinstance(exc, TruncatedFrameError) else None
        raise handshake_failure(exc) from cause


def _peekable(conn: Any) -> tuple[socket.socket, Any] | None:
    """conn's plain socket and channel when frames can be peeked at and taken off it directly, else None.

    That is a fastnet Connection reading exactly over a socket without TLS:
    its channel holds nothing (no read-ahead), so every byte the handshake
    takes comes off the socket, and nothing else does.
    """
    sock, ch = getattr(conn, "_sock", None), getattr(conn, "_ch", None)
    if (ch is None or not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket)
            or ch.io is not None or ch.readahead):
        return None
    return sock, ch


def handshake_failure(exc: BaseException) -> BaseException:
    """The error a handshake raises for ``exc``, raised by a receive during it.

    Any driver of :class:`~fastnet.handshake.Handshake` (this module's, the
    asyncio face's) reports the same failures the same way.
    """
    if isinstance(exc, TimeoutError):
        return TimeoutError("authentication handshake timed out")
    if isinstance(exc, HandshakeMessageTooLarge):
        return exc
    if isinstance(exc, MessageTooLarge):
        return HandshakeMessageTooLarge(f"handshake message too large: {exc}")
    if isinstance(exc, TruncatedFrameError):
        # an OSError too, as multiprocessing's "got end of file during message"
        return TruncatedFrameError(exc.missing, f"connection failed during the handshake: {exc}")
    if isinstance(exc, EOFError):
        # a clean close: EOFError, as multiprocessing
        return EOFError("connection failed during the handshake: closed by the peer")
    if isinstance(exc, ProtocolError):
        return AuthenticationError(f"connection failed during the handshake: {exc}")
    return exc


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _send_many(conn: Any, frames: list[bytes]) -> None:
    """Send the frames in one write where conn can (send_many), one alone as send_bytes."""
    send_many = getattr(conn, "send_many", None)
    if send_many is None or len(frames) == 1:
        for f in frames:
            conn.send_bytes(f)
    else:
        send_many(frames)


def _frames(conn: Any, peek: tuple[socket.socket, Any] | None, hs: Handshake,
            deadline: float | None) -> list[bytes]:
    """The peer's next frames: all that have arrived, up to the handshake's last, or else the next one."""
    if peek is not None:
        sock, ch = peek
        if deadline is None:
            frames = take_frames(sock, hs.expecting, wait=True)
        elif ch.poll(max(0.0, deadline - time.monotonic())):
            frames = take_frames(sock, hs.expecting)
        else:
            frames = []
        if frames:
            return frames
        # nothing yet in time (the exact read reports it), or part of a frame: read it exactly
    frames = [_recv(conn, deadline)]
    ch = getattr(conn, "_ch", None)
    while ch is not None and len(frames) < hs.expecting and ch.has_frame():
        frames.append(_recv(conn, deadline))    # read ahead already (TLS, readahead=True)
    return frames


def _drive(conn: Any, hs: Handshake, timeout: float | None) -> None:
    """Run hs over conn until its verdict: return when done, raise its error.

    Replies wait while the peer's next frame is already received, so a
    pipelining peer gets them in one write (fastnet's two round trips).
    """
    deadline = _deadline(timeout)
    peek = _peekable(conn)
    out = hs.start()
    frames: list[bytes] = []
    try:
        while True:
            if out and (hs.finished or not frames):
                _send_many(conn, out)
                out = []
            if hs.error is not None:
                raise hs.error
            if hs.done:
                return
            if not frames:
                frames = _frames(conn, peek, hs, deadline)
            reply = hs.receive(frames.pop(0))
            if not reply and not frames and hs.error is None:
                quickack(conn)      # no reply carries the ACK of this frame
            out += reply
    finally:
        hs.abandon()


def deliver_challenge(conn: Any, authkey: bytes, digest_name: str | None = DEFAULT_DIGEST, *,
                      strict: bool = False, timeout: float | None = None) -> None:
    """Challenge the peer to prove it holds ``authkey``; send WELCOME or FAILURE.

    ``digest_name=None`` sends the legacy MD5 challenge of CPython < 3.12.
    """
    _drive(conn, Handshake(authkey, True, strict=strict, digest=digest_name, mutual=False), timeout)


def answer_challenge(conn: Any, authkey: bytes, *, strict: bool = False, timeout: float | None = None) -> None:
    """Answer the peer's challenge with the HMAC of ``authkey``; expect WELCOME."""
    _drive(conn, Handshake(authkey, False, strict=strict, mutual=False), timeout)


def server_authenticate(conn: Any, authkey: bytes, *, strict: bool = False, timeout: float | None = None,
                        digest_name: str | None = DEFAULT_DIGEST) -> None:
    """The accepting side of the mutual handshake (as ``Listener.accept``)."""
    _drive(conn, Handshake(authkey, True, strict=strict, digest=digest_name), timeout)


def client_authenticate(conn: Any, authkey: bytes, *, strict: bool = False, timeout: float | None = None,
                        digest_name: str | None = DEFAULT_DIGEST) -> None:
    """The connecting side of the mutual handshake (as ``multiprocessing.connection.Client``)."""
    _drive(conn, Handshake(authkey, False, strict=strict, digest=digest_name), timeout)
