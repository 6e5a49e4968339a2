"""The fastnet exception hierarchy.

Every class derives from :class:`FastnetError` and also from the stdlib
exception that code written for ``multiprocessing.connection`` already
catches, so fastnet drops in without changing ``except`` clauses.
"""
from __future__ import annotations

import builtins
import multiprocessing

__all__ = [
    "FastnetError",
    "AuthenticationError",
    "ProtocolError",
    "TruncatedFrameError",
    "NoDescriptorError",
    "MessageTooLarge",
    "HandshakeMessageTooLarge",
    "BufferTooShort",
    "RemoteError",
    "MethodNotFound",
    "ConnectionLost",
    "TimeoutError",
]


class FastnetError(Exception):
    """Base class of every error fastnet raises on its own account."""


class AuthenticationError(FastnetError, multiprocessing.AuthenticationError):
    """The authkey handshake failed: wrong key, garbage, or a refused digest."""


class ProtocolError(FastnetError, OSError):
    """The peer sent bytes that break the wire format (bad frame or handshake)."""


class TruncatedFrameError(ProtocolError, EOFError):
    """The peer closed the connection in the middle of a frame.

    ``missing`` is the number of bytes the frame still lacked. It is an
    ``EOFError`` too, because code ported from multiprocessing treats any
    end of stream as one.
    """

    def __init__(self, missing: int, msg: str | None = None) -> None:
        self.missing = missing
        super().__init__(msg or f"connection closed mid-frame: {missing} bytes missing")


class NoDescriptorError(ProtocolError, RuntimeError):
    """A descriptor was expected and the message carried none.

    A ``RuntimeError`` too, as ``multiprocessing.reduction.recv_handle``
    raises in that case.
    """


class MessageTooLarge(FastnetError, OSError):
    """A frame is larger than the receiver allows; nothing was allocated for it."""


class HandshakeMessageTooLarge(AuthenticationError, MessageTooLarge):
    """A handshake message over 256 bytes: an AuthenticationError, and the
    OSError ("bad message length") multiprocessing raises for it."""


class BufferTooShort(FastnetError, multiprocessing.BufferTooShort):
    """``recv_bytes_into`` got a message longer than the buffer.

    As in multiprocessing, ``args[0]`` is the whole message.
    """


class RemoteError(FastnetError):
    """An RPC call raised on the server.

    ``type_name``, ``message`` and ``traceback`` describe the remote exception.
    """

    def __init__(self, type_name: str, message: str, traceback: str = "") -> None:
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        super().__init__(f"{type_name}: {message}")

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str, str]]:
        return (type(self), (self.type_name, self.message, self.traceback))


class MethodNotFound(RemoteError, AttributeError):
    """An RPC call named a method the server does not expose."""


class ConnectionLost(FastnetError, ConnectionError):
    """An RPC connection closed or failed while calls were pending, or could not be re-opened.

    A call that fails this way may or may not have run on the server; the
    proxy never sends it again.
    """


class TimeoutError(FastnetError, builtins.TimeoutError):
    """A connect, handshake, call or receive did not finish in time."""
