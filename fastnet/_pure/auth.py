# cython: annotation_typing=False
"""The authkey HMAC challenge/response kernel.

This one source is both kernels: imported as is, it is the pure twin; setup.py
compiles it unchanged into ``fastnet._c.auth`` (Cython's pure-Python mode; its
annotations are for mypy only, so both accept the same arguments).

The bytes on the wire are CPython's (multiprocessing.connection), both forms:
legacy ``#CHALLENGE#`` + 20 random bytes answered by a raw HMAC-MD5, and the
3.12+ ``#CHALLENGE#{sha256}`` + 40 random bytes answered by
``{sha256}`` + HMAC. A legacy peer answers a prefixed challenge with a raw
HMAC-MD5 over the whole message (prefix included), which is why the digest
of a response is read from its own prefix, or its length.
"""
from __future__ import annotations

import hmac
import os

from fastnet.errors import AuthenticationError

CHALLENGE = b"#CHALLENGE#"
WELCOME = b"#WELCOME#"
FAILURE = b"#FAILURE#"
MESSAGE_LENGTH = 40
LEGACY_MESSAGE_LENGTH = 20
MD5_DIGEST_LENGTH = 16
#: Handshake messages are refused above this size, as CPython does.
MAX_HANDSHAKE_MESSAGE = 256
ALLOWED_DIGESTS = frozenset({b"md5", b"sha256", b"sha384", b"sha3_256", b"sha3_384"})
_MAX_DIGEST_LEN = max(len(d) for d in ALLOWED_DIGESTS)
_LEGACY_LENGTHS = (LEGACY_MESSAGE_LENGTH, MD5_DIGEST_LENGTH)


def make_challenge(digest_name: str | None = "sha256") -> tuple[bytes, bytes]:
    """Return (message, nonce): the challenge frame to send and the part the MAC covers.

    ``digest_name=None`` makes the legacy 20-byte MD5 challenge of CPython < 3.12.
    """
    if digest_name is None:
        nonce = os.urandom(LEGACY_MESSAGE_LENGTH)
    else:
        name = digest_name.encode("ascii")
        if name not in ALLOWED_DIGESTS:
            raise ValueError(f"unsupported digest {digest_name!r}")
        nonce = b"{%s}%s" % (name, os.urandom(MESSAGE_LENGTH))
    return CHALLENGE + nonce, nonce


def digest_name_and_payload(message: bytes) -> tuple[str, bytes]:
    """Split b"{digest}payload"; ('', message) for the legacy unprefixed forms."""
    if len(message) in _LEGACY_LENGTHS:
        return "", message
    if message.startswith(b"{"):
        curly = message.find(b"}", 1, _MAX_DIGEST_LEN + 2)
        if curly > 0:
            digest = message[1:curly]
            if digest in ALLOWED_DIGESTS:
                return digest.decode("ascii"), message[curly + 1:]
    raise AuthenticationError(
        f"unsupported message length, missing digest prefix, or unsupported digest: {message[:64]!r}")


def parse_challenge(message: bytes) -> bytes:
    """Return the nonce of a challenge frame, checking its shape."""
    if not message.startswith(CHALLENGE):
        raise AuthenticationError(f"protocol error, expected a challenge: {message[:64]!r}")
    nonce = message[len(CHALLENGE):]
    if len(nonce) < LEGACY_MESSAGE_LENGTH:
        raise AuthenticationError(f"challenge too short: {len(nonce)} bytes")
    return nonce


def create_response(authkey: bytes, nonce: bytes, strict: bool = False) -> bytes:
    """Answer a challenge nonce: raw HMAC-MD5 for legacy, else b'{digest}' + HMAC."""
    name = digest_name_and_payload(nonce)[0]
    if not name:
        if strict:
            raise AuthenticationError("peer sent a legacy HMAC-MD5 challenge; strict mode refuses MD5")
        return hmac.digest(authkey, nonce, "md5")
    if strict and name == "md5":
        raise AuthenticationError("peer asked for HMAC-MD5; strict mode refuses MD5")
    return b"{%s}%s" % (name.encode("ascii"), hmac.digest(authkey, nonce, name))


def verify_response(authkey: bytes, nonce: bytes, response: bytes, strict: bool = False) -> None:
    """Check a peer's response to our nonce; raise AuthenticationError if wrong.

    The MAC covers the whole nonce including its digest prefix, so a peer
    cannot downgrade the digest; it may only answer a legacy challenge with a
    stronger one. Digests are compared in constant time.
    """
    name, mac = digest_name_and_payload(response)
    name = name or "md5"
    if strict and name == "md5":
        raise AuthenticationError("peer answered with HMAC-MD5; strict mode refuses MD5")
    try:
        expected = hmac.digest(authkey, nonce, name)
    except ValueError:
        raise AuthenticationError(f"digest {name!r} unsupported") from None
    if len(expected) != len(mac):
        raise AuthenticationError(f"expected {name!r} of length {len(expected)}, got {len(mac)}")
    if not hmac.compare_digest(expected, mac):
        raise AuthenticationError("digest received was wrong")
