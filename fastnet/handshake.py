"""The authkey handshake as one sans-I/O state machine.

:class:`Handshake` speaks the protocol and nothing else: it is fed the
payloads of the frames the peer sent and returns the payloads to send, and
says when it is done or why it failed. Whoever owns the socket drives it:
the blocking ``fastnet.auth`` functions (Listener.accept and Client), the
servers' on-loop handshake, the TLS transport and the asyncio face.
:class:`HandshakeReader` cuts the peer's frames out of a byte stream with
the framing kernel's decoder, reading exactly, so that nothing after the
last handshake message is consumed.

The protocol (CPython's multiprocessing.connection, byte for byte)::

    Each direction is one challenge: the challenger sends

        #CHALLENGE# {digest} <40 random bytes>           (CPython 3.12+)
        #CHALLENGE# <20 random bytes>                    (legacy, < 3.12)

    the answerer sends, for the nonce (all after #CHALLENGE#),

        {digest} HMAC(authkey, nonce, digest)            (3.12+)
        HMAC-MD5(authkey, nonce), raw 16 bytes           (legacy, or a legacy
                                                          peer's answer to a
                                                          prefixed challenge)

    and the challenger replies #WELCOME# if the MAC is right, else
    #FAILURE# and closes. Every message is one frame of at most 256 bytes.

    Listener.accept (server)            Client (client)
        challenge              ---->
                               <----    response
        WELCOME / FAILURE      ---->
                               <----    challenge
        response               ---->
                               <----    WELCOME / FAILURE

fastnet pipelines the same frames in the same order: its client sends its
challenge right behind its response, and its server sends WELCOME and its
response in one write when that challenge is already there. A stdlib peer
reads the same bytes; fastnet to fastnet costs two round trips, not four.

The MAC covers the whole nonce, digest prefix included, so a peer cannot
downgrade the digest. ``strict=True`` refuses HMAC-MD5 in either direction
(CPython accepts it). Relay protection: a nonce a client of this process
issued and has not yet seen answered is refused when a server hands it to
another of our clients as its challenge (a relaying server wants the answer
it lacks). A server's own nonces need no such record, since a server answers
only after its peer has proved the key.
"""
from __future__ import annotations

import _socket
import socket
from typing import Any

from fastnet._kernels import auth as _auth
from fastnet._kernels import framing as _framing
from fastnet.errors import (AuthenticationError, HandshakeMessageTooLarge, MessageTooLarge, ProtocolError,
                            TruncatedFrameError)

__all__ = ["Handshake", "HandshakeReader", "quickack", "quickack_socket", "DEFAULT_DIGEST", "MAX_MESSAGE"]

DEFAULT_DIGEST = "sha256"
#: Handshake messages are refused above this size, as CPython does.
MAX_MESSAGE: int = _auth.MAX_HANDSHAKE_MESSAGE

# the kernel's functions and messages, bound once: the machine runs per connection
_make_challenge = _auth.make_challenge
_parse_challenge = _auth.parse_challenge
_create_response = _auth.create_response
_verify_response = _auth.verify_response
_WELCOME_MSG = _auth.WELCOME
_FAILURE_MSG = _auth.FAILURE

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

    __slots__ = ("authkey", "server_side", "strict", "digest", "done", "error", "finished", "next_pipelined",
                 "frames_left", "_expect", "_nonce")

    def __init__(self, authkey: bytes, server_side: bool, *, strict: bool = False,
                 digest: str | None = DEFAULT_DIGEST, mutual: bool = True) -> None:
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
                _verify_response(self.authkey, self._nonce, payload, self.strict)  # type: ignore[arg-type]
            except AuthenticationError as exc:
                self._end(exc)
                return [_FAILURE_MSG]
            out = [_WELCOME_MSG]
        else:
            try:
                if step == _CHALLENGE:
                    nonce = _parse_challenge(payload)
                    if not self.server_side and nonce in _outstanding:
                        raise AuthenticationError("peer relayed a challenge issued by this process")
                    out = [_create_response(self.authkey, nonce, self.strict)]
                    if not self.server_side and _RESPONSE in expect:
                        out.append(self._challenge())     # pipelined behind the response
                elif payload != _WELCOME_MSG:
                    raise AuthenticationError("digest sent was rejected")
                else:
                    out = []
            except AuthenticationError as exc:
                self._end(exc)
                return []
        if not left:
            self._end(None)
        return out

    def abandon(self) -> None:
        """Forget this handshake's nonce: the driver gave up on it."""
        if not self.finished:
            self._end(AuthenticationError("handshake abandoned"))

    def _challenge(self) -> bytes:
        message, self._nonce = _make_challenge(self.digest)
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


class HandshakeReader:
    """Handshake frames cut from a byte stream, read exactly.

    ``want()`` is how many bytes to read next (the rest of a header, then
    the payload), so nothing past the frame is taken from the stream; give
    them to ``feed(chunk)``, which returns the payload once the frame is
    whole. A frame over :data:`MAX_MESSAGE` or a bad header raises
    AuthenticationError before its payload is read.
    """

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = _framing.FrameDecoder(MAX_MESSAGE, 64)

    def want(self) -> int:
        """The bytes to read next."""
        return self._decoder.needed or _framing.HEADER_SIZE

    def feed(self, chunk: bytes) -> bytes | None:
        """Take bytes read from the stream; the frame's payload once it is complete."""
        d = self._decoder
        try:
            d.feed(chunk)
            return d.next_frame()
        except MessageTooLarge as exc:
            raise HandshakeMessageTooLarge(f"handshake message too large: {exc}") from None
        except ProtocolError as exc:
            raise AuthenticationError(f"handshake message refused: {exc}") from None

    def eof(self) -> EOFError:
        """The error for the stream ending now: TruncatedFrameError inside a frame, else EOFError."""
        try:
            self._decoder.eof()
        except TruncatedFrameError as exc:
            return TruncatedFrameError(exc.missing, f"connection failed during the handshake: {exc}")
        return EOFError("connection failed during the handshake: closed by the peer")


_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
_TCP = (int(socket.AF_INET), int(socket.AF_INET6))
# the family as a plain int: socket.socket.family makes an enum member each time
_family = _socket.socket.family.__get__


def quickack(conn: Any) -> None:
    """ACK what the peer sent at once (TCP_QUICKACK, Linux) on conn, a socket or a connection's ``_sock``.

    A driver calls it when a frame it received leaves it nothing to send
    (the peer's WELCOME), so no reply carries the ACK. A stdlib peer writes
    without TCP_NODELAY: a stdlib Listener sends WELCOME and then its
    response as two small writes, a stdlib Client its WELCOME and then its
    first message. Nagle holds the second write until the first is ACKed,
    and a side that delays its ACK stalls the pair ~40 ms per connection.
    Every other handshake frame is answered at once, its ACK riding on the
    answer. Nothing happens off TCP or without TCP_QUICKACK.
    """
    sock = quickack_socket(conn)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)  # type: ignore[arg-type]
        except OSError:
            pass


def quickack_socket(conn: Any) -> socket.socket | None:
    """The socket :func:`quickack` acts on for conn, or None where it does nothing (not TCP)."""
    sock = conn if isinstance(conn, socket.socket) else getattr(conn, "_sock", None)
    if _QUICKACK is None or not isinstance(sock, socket.socket) or _family(sock) not in _TCP:
        return None
    return sock
