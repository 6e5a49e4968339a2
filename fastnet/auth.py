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
from typing import Any

from fastnet.errors import (AuthenticationError, HandshakeMessageTooLarge, MessageTooLarge, ProtocolError,
                            TimeoutError, TruncatedFrameError)
from fastnet.handshake import DEFAULT_DIGEST, MAX_MESSAGE, Handshake
from fastnet.handshake import quickack as quickack  # re-exported for the asyncio driver
from fastnet.handshake import quickack_socket

__all__ = [
    "deliver_challenge",
    "answer_challenge",
    "server_authenticate",
    "client_authenticate",
    "DEFAULT_DIGEST",
]

def _recv(conn: Any, recv: Any, deadline: float | None, frames: int) -> bytes:
    data: bytes
    if recv is None:
        data = conn.recv_bytes(MAX_MESSAGE)
        return data
    try:
        data = recv(MAX_MESSAGE, None if deadline is None else max(0.0, deadline - time.monotonic()), frames)
        return data
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


def _drive(conn: Any, hs: Handshake, timeout: float | None) -> None:
    """Run hs over conn until its verdict: return when done, raise its error.

    conn is a fastnet Connection, or anything with send_bytes/recv_bytes (a
    stdlib one). A receive takes with its frame those that arrived behind
    it, up to the handshake's last (Handshake.frames_left), so a pipelining
    peer's frames come in together; replies then wait while the peer's next
    frame is already here, and go out together in one write (fastnet's two
    round trips). Only a frame the peer may pipeline (Handshake.next_pipelined)
    is waited for so: the others cannot be sent before this side's replies.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    ch = getattr(conn, "_ch", None)
    recv = getattr(conn, "_recv_handshake", None)
    out = hs.start()
    try:
        while True:
            if out and (hs.finished or ch is None or not hs.next_pipelined or not ch.has_frame()):
                _send(conn, out)
                out = []
            if hs.finished:
                if hs.error is not None:
                    raise hs.error
                return
            reply = hs.receive(_recv(conn, recv, deadline, hs.frames_left))
            if not reply and hs.error is None and (ch is None or not ch.has_frame()):
                _ack(conn, ch)
            out += reply
    finally:
        if not hs.finished:
            hs.abandon()


def _send(conn: Any, frames: list[bytes]) -> None:
    """The frames in one write where conn can (send_many), one alone as send_bytes."""
    if len(frames) == 1:
        conn.send_bytes(frames[0])
    else:
        send_many = getattr(conn, "send_many", None)
        if send_many is not None:
            send_many(frames)
        else:
            for f in frames:
                conn.send_bytes(f)


def _ack(conn: Any, ch: Any) -> None:
    """ACK at once a frame no reply carries the ACK of, on TCP, unless the peer's next frame is here.

    The peer's next write may be waiting for that ACK (see quickack); one
    already here was not held back.
    """
    sock = quickack_socket(conn)
    if sock is not None and (ch is None or not ch.poll(0.0)):
        quickack(sock)


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
