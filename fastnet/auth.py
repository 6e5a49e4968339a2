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

from typing import Any

from fastnet._kernels import auth as _auth
from fastnet.handshake import DEFAULT_DIGEST, Handshake
from fastnet.handshake import quickack as quickack  # re-exported for the asyncio driver
from fastnet.handshake import quickack_socket

__all__ = [
    "deliver_challenge",
    "answer_challenge",
    "server_authenticate",
    "client_authenticate",
    "DEFAULT_DIGEST",
]

#: The error a handshake raises for an exception a receive raised during it.
handshake_failure = _auth.handshake_failure


def _drive(conn: Any, hs: Handshake, timeout: float | None) -> None:
    """Run hs over conn until its verdict (Handshake.run): return when done, raise its error.

    conn is a fastnet Connection, whose channel the machine drives directly,
    or anything with send_bytes/recv_bytes (a stdlib one, or a one-way
    fastnet Connection, whose verbs raise as they would for the user).
    """
    ch = getattr(conn, "_ch", None)
    if ch is not None and conn._readable and conn._writable:
        hs.run(ch.send_frame, ch.send_frames, ch.recv_frame_peeking, ch.has_frame, _acker(conn, ch), timeout)
        return
    recv_bytes = conn.recv_bytes

    def recv(frames: int, maxlength: int, timeout: float | None) -> bytes:
        data: bytes = recv_bytes(maxlength)
        return data
    hs.run(conn.send_bytes, getattr(conn, "send_many", None), recv, None, _acker(conn, None), timeout)


def _acker(conn: Any, ch: Any) -> Any:
    """ACK at once, on TCP, a frame no reply carries the ACK of, unless the peer's next frame is here.

    The peer's next write may be waiting for that ACK (see quickack); one
    already here was not held back. None off TCP.
    """
    sock = quickack_socket(conn)
    if sock is None:
        return None
    if ch is None:
        return lambda: quickack(sock)
    poll = ch.poll

    def ack() -> None:
        if not poll(0.0):
            quickack(sock)
    return ack


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
