# cython: annotation_typing=False
"""The authkey HMAC challenge/response kernel.

This one source is both kernels: imported as is, it is the pure twin; setup.py
compiles it unchanged into ``fastnet._c.auth`` (Cython's pure-Python mode; its
annotations are for mypy only, so both accept the same arguments, and
``src_c/fastnet/_c/auth.pxd`` makes :class:`Handshake` a cdef class there).
:class:`Handshake` is the protocol as a sans-I/O state machine, which every
driver runs (``fastnet.auth``, the servers, TLS, ``fastnet.aio``).

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
from time import monotonic
from typing import Any

from fastnet.errors import (AuthenticationError, HandshakeMessageTooLarge, MessageTooLarge, ProtocolError,
                            TimeoutError, TruncatedFrameError)

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


try:
    from _hashlib import UnsupportedDigestmodError as _Unsupported, hmac_digest as _openssl_hmac
except ImportError:     # a CPython without OpenSSL's hashes: hmac.digest alone
    _openssl_hmac = None  # type: ignore[assignment]


def _hmac(key: bytes, msg: bytes, name: str) -> bytes:
    """hmac.digest(key, msg, name), calling OpenSSL's one-shot HMAC first as it does, without its Python frame."""
    if _openssl_hmac is not None:
        try:
            mac: bytes = _openssl_hmac(key, msg, name)
            return mac
        except _Unsupported:
            pass
    return hmac.digest(key, msg, name)


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
        return _hmac(authkey, nonce, "md5")
    if strict and name == "md5":
        raise AuthenticationError("peer asked for HMAC-MD5; strict mode refuses MD5")
    return b"{%s}%s" % (name.encode("ascii"), _hmac(authkey, nonce, name))


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
        expected = _hmac(authkey, nonce, name)
    except ValueError:
        raise AuthenticationError(f"digest {name!r} unsupported") from None
    if len(expected) != len(mac):
        raise AuthenticationError(f"expected {name!r} of length {len(expected)}, got {len(mac)}")
    if not hmac.compare_digest(expected, mac):
        raise AuthenticationError("digest received was wrong")


def handshake_failure(exc: BaseException) -> BaseException:
    """The error a handshake raises for ``exc``, raised by a receive during it.

    Every driver of :class:`Handshake` (``Handshake.run``, the asyncio
    face's) reports the same failures the same way.
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


# The handshake machine. Compiled, it is a cdef class (src_c/fastnet/_c/auth.pxd
# declares its attributes): it runs for every connection.
#
# The protocol (CPython's multiprocessing.connection, byte for byte)::
#
#     Each direction is one challenge: the challenger sends
#
#         #CHALLENGE# {digest} <40 random bytes>           (CPython 3.12+)
#         #CHALLENGE# <20 random bytes>                    (legacy, < 3.12)
#
#     the answerer sends, for the nonce (all after #CHALLENGE#),
#
#         {digest} HMAC(authkey, nonce, digest)            (3.12+)
#         HMAC-MD5(authkey, nonce), raw 16 bytes           (legacy, or a legacy
#                                                           peer's answer to a
#                                                           prefixed challenge)
#
#     and the challenger replies #WELCOME# if the MAC is right, else
#     #FAILURE# and closes. Every message is one frame of at most 256 bytes.
#
#     Listener.accept (server)            Client (client)
#         challenge              ---->
#                                <----    response
#         WELCOME / FAILURE      ---->
#                                <----    challenge
#         response               ---->
#                                <----    WELCOME / FAILURE
#
# fastnet pipelines the same frames in the same order: its client sends its
# challenge right behind its response, and its server sends WELCOME and its
# response in one write when that challenge is already there. A stdlib peer
# reads the same bytes; fastnet to fastnet costs two round trips, not four.
#
# The MAC covers the whole nonce, digest prefix included, so a peer cannot
# downgrade the digest. ``strict=True`` refuses HMAC-MD5 in either direction
# (CPython accepts it). Relay protection: a nonce a client of this process
# issued and has not yet seen answered is refused when a server hands it to
# another of our clients as its challenge (a relaying server wants the answer
# it lacks). A server's own nonces need no such record, since a server answers
# only after its peer has proved the key.

# What the machine waits for next.
_CHALLENGE, _RESPONSE, _WELCOME = "challenge", "response", "welcome"

# Nonces clients of this process issued and have not yet seen answered.
_outstanding: set[bytes] = set()


class Handshake:
    """The authkey handshake of one side of one connection, without I/O.

    ``Handshake(authkey, server_side, *, strict=False, digest="sha256",
    mutual=True)``. ``start()`` returns the frames (payloads) to send first,
    ``receive(payload)`` those a peer's frame calls for. Afterwards ``done``
    is True once the peer is authenticated, or ``error`` holds the exception
    the handshake failed with (send what was returned, then raise it). With
    ``mutual=False`` a server only challenges (deliver_challenge) and a
    client only answers (answer_challenge). ``digest=None`` challenges in
    the legacy MD5 form. A driver that gives up (timeout, closed socket)
    calls ``abandon()``.
    """

    def __init__(self, authkey: bytes, server_side: bool, *, strict: bool = False,
                 digest: str | None = "sha256", mutual: bool = True) -> None:
        if not isinstance(authkey, bytes):
            raise ValueError(f"Authkey must be bytes, not {type(authkey)!s}")
        self.authkey = authkey
        self.server_side = server_side
        self.strict = strict
        self.digest = digest
        self.done = False
        self.error: AuthenticationError | None = None
        #: True once there is a verdict (done or error).
        self.finished = False
        self._nonce: bytes | None = None
        if server_side:
            self._expect = [_RESPONSE, _CHALLENGE, _WELCOME] if mutual else [_RESPONSE]
        else:
            self._expect = [_CHALLENGE, _WELCOME, _RESPONSE] if mutual else [_CHALLENGE, _WELCOME]
        #: True if the peer's next frame may be on its way already, sent
        #: without waiting for this side's replies: a fastnet client sends its
        #: challenge right behind its response. A driver holding replies then
        #: looks for that frame first, and answers both in one write.
        self.next_pipelined = False
        #: How many frames the peer has still to send in this handshake. A
        #: driver may take that many from the stream at once: whatever
        #: follows them is not the handshake's.
        self.frames_left = len(self._expect)

    def start(self) -> list[bytes]:
        """The frames to send before anything is received: the server's challenge."""
        return [self._challenge()] if self.server_side else []

    def receive(self, payload: bytes) -> list[bytes]:
        """Take the payload of the peer's next frame; return the payloads to send."""
        if self.finished:
            raise RuntimeError("the handshake is over")
        expect = self._expect
        step = expect.pop(0)
        left = self.frames_left = len(expect)
        self.next_pipelined = left != 0 and self.server_side and expect[0] == _CHALLENGE
        out: list[bytes]
        if step == _RESPONSE:
            try:
                verify_response(self.authkey, self._nonce, payload, self.strict)  # type: ignore[arg-type]
            except AuthenticationError as exc:
                self._end(exc)
                return [FAILURE]
            out = [WELCOME]
        else:
            try:
                if step == _CHALLENGE:
                    nonce = parse_challenge(payload)
                    if not self.server_side and nonce in _outstanding:
                        raise AuthenticationError("peer relayed a challenge issued by this process")
                    out = [create_response(self.authkey, nonce, self.strict)]
                    if not self.server_side and _RESPONSE in expect:
                        out.append(self._challenge())     # pipelined behind the response
                elif payload != WELCOME:
                    raise AuthenticationError("digest sent was rejected")
                else:
                    out = []
            except AuthenticationError as exc:
                self._end(exc)
                return []
        if not left:
            self._end(None)
        return out

    def run(self, send: Any, send_many: Any, recv: Any, has_frame: Any, ack: Any, timeout: float | None) -> None:
        """Drive the machine over blocking I/O until its verdict: return when done, raise its error.

        ``send(frame)`` writes one frame and ``send_many(frames)`` several in
        one write (or None). ``recv(frames, maxlength, timeout)`` returns the
        peer's next frame, taking with it up to ``frames`` whole frames that
        arrived behind it (``frames_left``: nothing after the handshake).
        ``has_frame()`` says a frame is already taken (None if the reader
        takes one at a time); ``ack()`` ACKs the peer's last frame at once
        (None off TCP; see ``fastnet.handshake.quickack``). ``timeout``
        bounds the whole exchange; a receive's failure raises as
        ``handshake_failure`` says.

        Replies wait while the peer's next frame is here already, and go in
        one write: fastnet to fastnet, that is two round trips. Only a frame
        the peer may pipeline (``next_pipelined``) is looked for so: the
        others cannot be sent before this side's replies.
        """
        deadline = None if timeout is None else monotonic() + timeout
        out = self.start()
        try:
            while True:
                if out and (self.finished or has_frame is None or not self.next_pipelined or not has_frame()):
                    if send_many is None or len(out) == 1:
                        for frame in out:
                            send(frame)
                    else:
                        send_many(out)
                    out = []
                if self.finished:
                    if self.error is not None:
                        raise self.error
                    return
                try:
                    payload = recv(self.frames_left, MAX_HANDSHAKE_MESSAGE,
                                   None if deadline is None else max(0.0, deadline - monotonic()))
                except (TimeoutError, MessageTooLarge, EOFError, ProtocolError) as exc:
                    if isinstance(exc, ProtocolError) and not isinstance(exc, TruncatedFrameError):
                        raise handshake_failure(exc) from exc
                    raise handshake_failure(exc) from None
                reply = self.receive(payload)
                if not reply and ack is not None and self.error is None and (has_frame is None or not has_frame()):
                    ack()
                out += reply
        finally:
            if not self.finished:
                self.abandon()

    def abandon(self) -> None:
        """Forget this handshake's nonce: the driver gave up on it."""
        if not self.finished:
            self._end(AuthenticationError("handshake abandoned"))

    def _challenge(self) -> bytes:
        message, self._nonce = make_challenge(self.digest)
        if not self.server_side:
            _outstanding.add(self._nonce)
        return message

    def _end(self, error: AuthenticationError | None) -> None:
        if error is None:
            self.done = True
        else:
            self.error = error
        self.finished = True
        if self._nonce is not None:
            _outstanding.discard(self._nonce)
