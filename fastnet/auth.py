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

import time
from typing import Any, cast

from fastnet.errors import (AuthenticationError, HandshakeMessageTooLarge, MessageTooLarge, ProtocolError,
                            TimeoutError, TruncatedFrameError)
from fastnet.handshake import DEFAULT_DIGEST, MAX_MESSAGE, Handshake
from fastnet.handshake import quickack as quickack  # re-exported for the asyncio driver

__all__ = [
    "deliver_challenge",
    "answer_challenge",
    "server_authenticate",
    "client_authenticate",
    "DEFAULT_DIGEST",
]

def _recv(conn: Any, deadline: float | None) -> bytes:
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


def _more(conn: Any) -> bool:
    """True if the peer's next frame is already here, received or waiting in the socket.

    A pipelining peer's next frame arrives with the one just read: the
    replies then wait for it and go out together, in one write.
    """
    ch = getattr(conn, "_ch", None)
    return ch is not None and (ch.has_frame() or ch.poll(0.0))


def _has_frame(conn: Any) -> bool:
    ch = getattr(conn, "_ch", None)
    return ch is not None and ch.has_frame()


def _drive(conn: Any, hs: Handshake, timeout: float | None) -> None:
    """Run hs over conn until its verdict: return when done, raise its error.

    Replies wait while the peer's next frame is already here (see _more), so
    a pipelining peer gets them in one write (fastnet's two round trips).
    """
    deadline = _deadline(timeout)
    out = hs.start()
    try:
        while True:
            if out and (hs.finished or not _more(conn)):
                _send_many(conn, out)
                out = []
            if hs.error is not None:
                raise hs.error
            if hs.done:
                return
            reply = hs.receive(_recv(conn, deadline))
            if not reply and hs.error is None and not _has_frame(conn):
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
