"""The authkey handshake as one sans-I/O state machine.

:class:`Handshake` speaks the protocol and nothing else: it is fed the
payloads of the frames the peer sent and returns the payloads to send, and
says when it is done or why it failed. Whoever owns the socket drives it:
the blocking ``fastnet.auth`` functions (Listener.accept and Client), the
servers' on-loop handshake, the TLS transport and the asyncio face.
:class:`HandshakeReader` cuts the peer's frames out of a byte stream with
the framing kernel's decoder, reading exactly, so that nothing after the
last handshake message is consumed.

The protocol, CPython's multiprocessing.connection byte for byte, is written
down beside the machine, in the auth kernel (``fastnet/_pure/auth.py``, the
one source of both kernel sets; compiled, the machine is a cdef class).
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

#: The authkey handshake machine of the active kernel set.
Handshake = _auth.Handshake
# nonces clients of this process issued and have not yet seen answered
_outstanding = _auth._outstanding


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
