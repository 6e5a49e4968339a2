"""The RPC messages as both sides write and read them (the protocol is described in :mod:`fastnet.rpc`).

The message shapes, the out-of-band marker frame that precedes a payload
with buffers of its own, and the error field of a reply: made on the
server, turned back into an exception on the proxy.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import json

from fastnet._kernels import rpcwire
from fastnet.errors import AuthenticationError, MethodNotFound, ProtocolError, RemoteError

if TYPE_CHECKING:
    from fastnet.codecs import Codec

# public: fastnet.rpc exports and documents them
PROTOCOL_VERSION = 1
DEFAULT_RPC_MAX_MESSAGE_SIZE = 256 << 20

_REQUEST, _REPLY, _NOTIFY = 0, 1, 2
_OOB = 0xC1
_MAX_HELLO = 4096


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


#: Why a proxy failed when the server closed the connection during the hello.
HELLO_CLOSED = "the server closed the connection during the RPC hello (is it a fastnet RPCServer?)"


def hello_frame(codec_name: str) -> bytes:
    """The client's hello frame asking for ``codec_name`` (any proxy, blocking or asyncio)."""
    return json.dumps({"fastnet-rpc": PROTOCOL_VERSION, "codec": codec_name}).encode()


def check_hello_reply(data: Any, codec_name: str) -> None:
    """Raise unless ``data`` is a server's hello accepting ``codec_name``."""
    if bytes(data[:11]) == b"#CHALLENGE#":
        raise AuthenticationError("the RPC server requires an authkey and none was given")
    try:
        reply = json.loads(bytes(data).decode("utf-8"))
        version = reply["fastnet-rpc"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ProtocolError("the server's hello reply is not a fastnet RPC hello") from None
    if "error" in reply:
        raise ProtocolError(f"the RPC server refused this client: {reply['error']}")
    if version != PROTOCOL_VERSION or reply.get("codec") != codec_name:
        raise ProtocolError(f"RPC hello mismatch: server speaks version {version} "
                            f"with codec {reply.get('codec')!r}")


class ReplyReader:
    """Replies cut from the frames a server sends: out-of-band buffers gathered, each reply decoded.

    ``feed(frame)`` returns ``(msgid, error, result)`` once a reply is whole,
    else None; a malformed frame or reply raises ProtocolError (the
    connection is then unusable). ``reset()`` forgets a reply half read.
    Both proxies, blocking and asyncio, read with it.
    """

    __slots__ = ("codec", "wire", "partial", "left")

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.wire = rpcwire.Wire(codec)
        self.partial: list[Any] | None = None
        self.left = 0

    def reset(self) -> None:
        """Forget a reply half read (a new connection)."""
        self.partial = None

    def feed(self, frame: Any) -> tuple[Any, Any, Any] | None:
        """Take one frame; the reply ``(msgid, error, result)`` once it is whole."""
        part = self.partial
        if part is not None:
            part.append(frame)
            self.left -= 1
            if self.left:
                return None
            self.partial = None
            frames: Any = part
        elif frame[:1] == b"\xc1":
            n = _oob_count(frame)
            if n < 1:
                raise ProtocolError("bad out-of-band marker frame from the server")
            self.partial = []
            self.left = n + 1
            return None
        else:
            frames = (frame,)
        return self.wire.read_reply(frames)
