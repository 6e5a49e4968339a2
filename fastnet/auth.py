"""The authkey handshake, spoken on a connection.

This is CPython's multiprocessing.connection protocol, byte for byte, so a
fastnet peer and a stdlib peer of Python 3.10-3.13 authenticate each other::

    server (deliver_challenge)              client (answer_challenge)
    #CHALLENGE#{sha256}<40 random>   --->
                                     <---   {sha256}HMAC(key, {sha256}<random>)
    #WELCOME# or #FAILURE#           --->
    then the roles swap, so both sides prove they hold the key.

fastnet pipelines the same messages without changing them: its client sends
its own challenge right behind its response, and its server sends WELCOME
and its response together when that challenge is already there. A stdlib
peer reads the same frames in the same order; the handshake costs two round
trips instead of four.

A legacy (< 3.12) peer sends ``#CHALLENGE#`` + 20 random bytes and expects a
raw 16-byte HMAC-MD5; it also answers our prefixed challenge with a raw
HMAC-MD5 over the whole nonce. Both are accepted unless ``strict=True``.
Every handshake message is refused above 256 bytes, and a ``timeout`` bounds
the whole exchange so a silent peer cannot hold it.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, cast

from fastnet._kernels import auth as _auth
from fastnet.errors import AuthenticationError, MessageTooLarge, ProtocolError, TimeoutError

__all__ = [
    "deliver_challenge",
    "answer_challenge",
    "server_authenticate",
    "client_authenticate",
    "DEFAULT_DIGEST",
]

DEFAULT_DIGEST = "sha256"

# Nonces our clients have issued (the second half of client_authenticate) and
# not yet seen answered. A server that hands one of them to another of our
# clients is relaying it to get the answer it lacks: refused. Server-side
# nonces are not tracked, since a server only answers after its peer has.
_outstanding: set[bytes] = set()


def _check_key(authkey: object) -> None:
    if not isinstance(authkey, bytes):
        raise ValueError(f"Authkey must be bytes, not {type(authkey)!s}")


def _recv(conn: Any, deadline: float | None) -> bytes:
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        recv = conn._recv_handshake
    except AttributeError:
        return cast(bytes, conn.recv_bytes(_auth.MAX_HANDSHAKE_MESSAGE))
    try:
        return cast(bytes, recv(_auth.MAX_HANDSHAKE_MESSAGE, timeout))
    except TimeoutError:
        raise TimeoutError("authentication handshake timed out") from None
    except MessageTooLarge as exc:
        raise AuthenticationError(f"handshake message too large: {exc}") from None
    except (ProtocolError, EOFError, ConnectionError) as exc:
        raise AuthenticationError(f"connection failed during the handshake: {str(exc) or 'closed'}") from exc


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _challenge(conn: Any, authkey: bytes, digest_name: str | None, strict: bool, deadline: float | None) -> None:
    """Send a challenge and verify the answer; on a wrong one send FAILURE and raise."""
    message, nonce = _auth.make_challenge(digest_name)
    conn.send_bytes(message)
    response = _recv(conn, deadline)
    try:
        _auth.verify_response(authkey, nonce, response, strict)
    except AuthenticationError:
        conn.send_bytes(_auth.FAILURE)
        raise


def deliver_challenge(conn: Any, authkey: bytes, digest_name: str | None = DEFAULT_DIGEST, *,
                      strict: bool = False, timeout: float | None = None) -> None:
    """Challenge the peer to prove it holds ``authkey``; send WELCOME or FAILURE.

    ``digest_name=None`` sends the legacy MD5 challenge of CPython < 3.12.
    """
    _check_key(authkey)
    _challenge(conn, authkey, digest_name, strict, _deadline(timeout))
    conn.send_bytes(_auth.WELCOME)


def answer_challenge(conn: Any, authkey: bytes, *, strict: bool = False, timeout: float | None = None) -> None:
    """Answer the peer's challenge with the HMAC of ``authkey``; expect WELCOME."""
    _check_key(authkey)
    deadline = _deadline(timeout)
    nonce = _auth.parse_challenge(_recv(conn, deadline))
    if nonce in _outstanding:
        raise AuthenticationError("peer relayed a challenge issued by this process")
    conn.send_bytes(_auth.create_response(authkey, nonce, strict))
    if _recv(conn, deadline) != _auth.WELCOME:
        raise AuthenticationError("digest sent was rejected")


def _send_many(conn: Any, frames: Iterable[bytes]) -> None:
    try:
        send_many = conn.send_many
    except AttributeError:
        for f in frames:
            conn.send_bytes(f)
    else:
        send_many(frames)


def _has_frame(conn: Any) -> bool:
    ch = getattr(conn, "_ch", None)
    return ch is not None and ch.has_frame()


def server_authenticate(conn: Any, authkey: bytes, *, strict: bool = False, timeout: float | None = None,
                        digest_name: str | None = DEFAULT_DIGEST) -> None:
    """The accepting side of the mutual handshake (as ``Listener.accept``)."""
    _check_key(authkey)
    deadline = _deadline(timeout)
    _challenge(conn, authkey, digest_name, strict, deadline)
    if _has_frame(conn):
        # a pipelining client already sent its challenge: answer with WELCOME
        challenge = _auth.parse_challenge(_recv(conn, deadline))
        _send_many(conn, (_auth.WELCOME, _auth.create_response(authkey, challenge, strict)))
    else:
        conn.send_bytes(_auth.WELCOME)
        challenge = _auth.parse_challenge(_recv(conn, deadline))
        conn.send_bytes(_auth.create_response(authkey, challenge, strict))
    if _recv(conn, deadline) != _auth.WELCOME:
        raise AuthenticationError("digest sent was rejected")


def client_authenticate(conn: Any, authkey: bytes, *, strict: bool = False, timeout: float | None = None,
                        digest_name: str | None = DEFAULT_DIGEST) -> None:
    """The connecting side of the mutual handshake (as ``multiprocessing.connection.Client``)."""
    _check_key(authkey)
    deadline = _deadline(timeout)
    challenge = _auth.parse_challenge(_recv(conn, deadline))
    if challenge in _outstanding:
        raise AuthenticationError("peer relayed a challenge issued by this process")
    answer = _auth.create_response(authkey, challenge, strict)
    message, nonce = _auth.make_challenge(digest_name)
    _outstanding.add(nonce)
    try:
        _send_many(conn, (answer, message))
        if _recv(conn, deadline) != _auth.WELCOME:
            raise AuthenticationError("digest sent was rejected")
        response = _recv(conn, deadline)
        try:
            _auth.verify_response(authkey, nonce, response, strict)
        except AuthenticationError:
            conn.send_bytes(_auth.FAILURE)
            raise
        conn.send_bytes(_auth.WELCOME)
    finally:
        _outstanding.discard(nonce)
