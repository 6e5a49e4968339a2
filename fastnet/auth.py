"""The authkey handshake, spoken on a connection.

This is CPython's multiprocessing.connection protocol, byte for byte, so a
fastnet peer and a stdlib peer of Python 3.10-3.13 authenticate each other::

    server (deliver_challenge)              client (answer_challenge)
    #CHALLENGE#{sha256}<40 random>   --->
                                     <---   {sha256}HMAC(key, {sha256}<random>)
    #WELCOME# or #FAILURE#           --->
    then the roles swap, so both sides prove they hold the key.

A legacy (< 3.12) peer sends ``#CHALLENGE#`` + 20 random bytes and expects a
raw 16-byte HMAC-MD5; it also answers our prefixed challenge with a raw
HMAC-MD5 over the whole nonce. Both are accepted unless ``strict=True``.
Every handshake message is refused above 256 bytes, and a ``timeout`` bounds
the whole exchange so a silent peer cannot hold it.
"""
import time

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
_outstanding = set()


def _check_key(authkey):
    if not isinstance(authkey, bytes):
        raise ValueError(f"Authkey must be bytes, not {type(authkey)!s}")


def _recv(conn, deadline):
    timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        recv = conn._recv_handshake
    except AttributeError:
        return conn.recv_bytes(_auth.MAX_HANDSHAKE_MESSAGE)
    try:
        return recv(_auth.MAX_HANDSHAKE_MESSAGE, timeout)
    except TimeoutError:
        raise TimeoutError("authentication handshake timed out") from None
    except MessageTooLarge as exc:
        raise AuthenticationError(f"handshake message too large: {exc}") from None
    except (ProtocolError, EOFError) as exc:
        raise AuthenticationError(f"connection failed during the handshake: {exc or 'closed'}") from exc


def _deadline(timeout):
    return None if timeout is None else time.monotonic() + timeout


def deliver_challenge(conn, authkey, digest_name=DEFAULT_DIGEST, *, strict=False, timeout=None,
                      _deadline_at=None, _track=False):
    """Challenge the peer to prove it holds ``authkey``; send WELCOME or FAILURE.

    ``digest_name=None`` sends the legacy MD5 challenge of CPython < 3.12.
    """
    _check_key(authkey)
    deadline = _deadline_at if _deadline_at is not None else _deadline(timeout)
    message, nonce = _auth.make_challenge(digest_name)
    if _track:
        _outstanding.add(nonce)
    try:
        conn.send_bytes(message)
        response = _recv(conn, deadline)
        try:
            _auth.verify_response(authkey, nonce, response, strict)
        except AuthenticationError:
            conn.send_bytes(_auth.FAILURE)
            raise
        conn.send_bytes(_auth.WELCOME)
    finally:
        _outstanding.discard(nonce)


def answer_challenge(conn, authkey, *, strict=False, timeout=None, _deadline_at=None, _client=False):
    """Answer the peer's challenge with the HMAC of ``authkey``; expect WELCOME."""
    _check_key(authkey)
    deadline = _deadline_at if _deadline_at is not None else _deadline(timeout)
    nonce = _auth.parse_challenge(_recv(conn, deadline))
    if _client and nonce in _outstanding:
        raise AuthenticationError("peer relayed a challenge issued by this process")
    conn.send_bytes(_auth.create_response(authkey, nonce, strict))
    if _recv(conn, deadline) != _auth.WELCOME:
        raise AuthenticationError("digest sent was rejected")


def server_authenticate(conn, authkey, *, strict=False, timeout=None, digest_name=DEFAULT_DIGEST):
    """The accepting side of the mutual handshake (as ``Listener.accept``)."""
    deadline = _deadline(timeout)
    deliver_challenge(conn, authkey, digest_name, strict=strict, _deadline_at=deadline)
    answer_challenge(conn, authkey, strict=strict, _deadline_at=deadline)


def client_authenticate(conn, authkey, *, strict=False, timeout=None, digest_name=DEFAULT_DIGEST):
    """The connecting side of the mutual handshake (as ``multiprocessing.connection.Client``)."""
    deadline = _deadline(timeout)
    answer_challenge(conn, authkey, strict=strict, _deadline_at=deadline, _client=True)
    deliver_challenge(conn, authkey, digest_name, strict=strict, _deadline_at=deadline, _track=True)
