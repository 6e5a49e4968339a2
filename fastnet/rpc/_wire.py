"""The RPC messages as both sides write and read them (the protocol is described in :mod:`fastnet.rpc`).

The message shapes, the out-of-band marker frame that precedes a payload
with buffers of its own, and the error field of a reply: made on the
server, turned back into an exception on the proxy.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastnet.errors import MethodNotFound, ProtocolError, RemoteError

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from fastnet.codecs import Codec

# public: fastnet.rpc exports and documents them
PROTOCOL_VERSION = 1
DEFAULT_RPC_MAX_MESSAGE_SIZE = 256 << 20

_REQUEST, _REPLY, _NOTIFY = 0, 1, 2
_OOB = 0xC1
_MAX_HELLO = 4096


def _oob_marker(n: int) -> bytes:
    return b"\xc1" + n.to_bytes(4, "big")


def _encode(codec: Codec, msg: Any) -> list[Buffer]:
    frames = codec.dumps(msg)
    if len(frames) == 1:
        return frames
    return [_oob_marker(len(frames) - 1)] + frames


def _oob_count(frame: Any) -> int:
    """The buffer count of an out-of-band marker frame, else -1."""
    if len(frame) == 5 and frame[0] == _OOB:
        return int.from_bytes(frame[1:5], "big")
    return -1


def _type_name(exc: BaseException) -> str:
    t = type(exc)
    mod = t.__module__
    return t.__qualname__ if mod in ("builtins", "__main__") else f"{mod}.{t.__qualname__}"


def _remote_exception(error: Any, codec: Codec) -> BaseException:
    """The exception to raise for a reply's error field."""
    if not isinstance(error, (list, tuple)) or len(error) < 2:
        return ProtocolError(f"malformed error in an RPC reply: {error!r}")
    type_name, message = str(error[0]), str(error[1])
    tb = str(error[2]) if len(error) > 2 and error[2] is not None else ""
    cls = MethodNotFound if type_name.rpartition(".")[2] == "MethodNotFound" else RemoteError
    remote = cls(type_name, message, tb)
    if len(error) > 3 and isinstance(error[3], BaseException):
        exc = error[3]
        exc.__cause__ = remote
        return exc
    return remote
