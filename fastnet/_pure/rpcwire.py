"""The RPC envelope: a request framed in one step, a reply read, a request served.

Pure-Python twin of the compiled kernel ``fastnet._c.rpcwire``; both write
the same bytes. The messages are the shapes of :mod:`fastnet.rpc`::

    request       [0, msgid, method, args, kwargs]
    reply         [1, msgid, error, result]
    notification  [2, method, args, kwargs]

With the built-in msgpack codec the envelope (array header, kind, msgid,
method name, a nil) is written here and only the arguments or the result go
through the codec's packer: msgpack has no C API outside its Cython classes,
and one ``pack`` call per message costs more than the envelope. The bytes are
those the codec gives for the whole list. Other codecs encode the whole list.

A single-frame message under 2 GiB comes back from :meth:`Wire.request`
framed: its header (the one frame codec, ``framing.encode_header``) and its
payload in one bytes object, ready for :func:`send_framed`. A message with
out-of-band buffers is a list of unframed frames: the marker frame, the
payload and the buffers.
"""
from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastnet._pure.framing import encode_header
from fastnet.errors import ProtocolError

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from fastnet.codecs import Codec

_REQUEST, _REPLY, _NOTIFY = 0, 1, 2
_SMALL_MAX = 0x7FFFFFFF         # the largest payload a 4-byte header carries
_U64_MAX = 0xFFFFFFFFFFFFFFFF
_NOSIGNAL = int(socket.MSG_NOSIGNAL)
_perf_counter = time.perf_counter


def _msgpack_uint(n: int) -> bytes:
    # the smallest form, as msgpack's packer chooses for a non-negative int
    if n < 0x80:
        return bytes((n,))
    if n <= 0xFF:
        return b"\xcc" + n.to_bytes(1, "big")
    if n <= 0xFFFF:
        return b"\xcd" + n.to_bytes(2, "big")
    if n <= 0xFFFFFFFF:
        return b"\xce" + n.to_bytes(4, "big")
    return b"\xcf" + n.to_bytes(8, "big")


def _msgpack_str(s: str) -> bytes:
    b = s.encode("utf-8")
    n = len(b)
    if n < 32:
        return bytes((0xA0 | n,)) + b
    if n <= 0xFF:
        return b"\xd9" + n.to_bytes(1, "big") + b
    if n <= 0xFFFF:
        return b"\xda" + n.to_bytes(2, "big") + b
    return b"\xdb" + n.to_bytes(4, "big") + b


def _msgpack_pack() -> Any:
    """This thread's packer of the msgpack codec (a Packer is not safe across threads)."""
    from fastnet import codecs
    try:
        return codecs._packers.pack
    except AttributeError:
        codecs._msgpack_dumps(None)     # makes this thread's packer
        return codecs._packers.pack


def _framed(frames: list[Buffer]) -> bytes | list[Buffer]:
    if len(frames) != 1:
        return [b"\xc1" + (len(frames) - 1).to_bytes(4, "big")] + frames
    payload = frames[0]
    n = memoryview(payload).nbytes
    if n > _SMALL_MAX:
        return frames
    return encode_header(n) + payload


def _unframed(frames: list[Buffer]) -> list[Buffer]:
    if len(frames) == 1:
        return frames
    return [b"\xc1" + (len(frames) - 1).to_bytes(4, "big")] + frames


class Wire:
    """The RPC messages of one codec, encoded and decoded (see the module's text)."""

    __slots__ = ("codec", "msgpack")

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        # only the built-in msgpack codec's bytes are known well enough to write by hand
        self.msgpack = codec.name == "msgpack" and codec.builtin

    def request(self, msgid: int, method: str, args: Sequence[Any],
                kwargs: dict[str, Any] | None) -> bytes | list[Buffer]:
        """``[0, msgid, method, args, kwargs or None]``: framed bytes, or a list of unframed frames."""
        return self._call(_REQUEST, msgid, method, args, kwargs)

    def notification(self, method: str, args: Sequence[Any],
                     kwargs: dict[str, Any] | None) -> bytes | list[Buffer]:
        """``[2, method, args, kwargs or None]``: framed bytes, or a list of unframed frames."""
        return self._call(_NOTIFY, None, method, args, kwargs)

    def _call(self, kind: int, msgid: Any, method: str, args: Sequence[Any],
              kwargs: dict[str, Any] | None) -> bytes | list[Buffer]:
        # a request (kind 0, with its id) or a notification (kind 2, no id)
        if type(args) is not list and type(args) is not tuple:
            args = list(args)
        if not kwargs:
            kwargs = None
        if self.msgpack and type(method) is str and (
                kind == _NOTIFY or (type(msgid) is int and 0 <= msgid <= _U64_MAX)):
            pack = _msgpack_pack()
            head = b"\x95\x00" + _msgpack_uint(msgid) if kind == _REQUEST else b"\x94\x02"
            body: bytes = (head + _msgpack_str(method) + pack(args)
                           + (b"\xc0" if kwargs is None else pack(kwargs)))
            if len(body) <= _SMALL_MAX:
                return encode_header(len(body)) + body
            return [body]
        if kind == _REQUEST:
            return _framed(self.codec.dumps([kind, msgid, method, list(args), kwargs]))
        return _framed(self.codec.dumps([kind, method, list(args), kwargs]))

    def reply(self, msgid: Any, result: Any) -> list[Buffer]:
        """``[1, msgid, None, result]`` as unframed frames (the marker frame first if out of band)."""
        if self.msgpack and type(msgid) is int and 0 <= msgid <= _U64_MAX:
            return [b"\x94\x01" + _msgpack_uint(msgid) + b"\xc0" + _msgpack_pack()(result)]
        return _unframed(self.codec.dumps([_REPLY, msgid, None, result]))

    def error_reply(self, msgid: Any, error: list[Any]) -> list[Buffer]:
        """``[1, msgid, error, None]`` as unframed frames."""
        return _unframed(self.codec.dumps([_REPLY, msgid, error, None]))

    def read_reply(self, frames: Sequence[Buffer]) -> tuple[Any, Any, Any]:
        """``(msgid, error, result)`` of a whole reply; ProtocolError if it is not one."""
        try:
            msg = self.codec.loads(frames)
            if type(msg) is not list:
                msg = list(msg)
            if len(msg) != 4:
                raise ValueError(f"{len(msg)} fields, not 4")
            if msg[0] != _REPLY:
                raise ValueError(f"message kind {msg[0]!r}")
        except Exception as e:
            raise ProtocolError(f"malformed reply from the server ({e})") from None
        return msg[1], msg[2], msg[3]

    def serve(self, handler: Any, frames: Sequence[Buffer], methods: dict[str, Any]) -> None:
        """Decode a request, run its method and queue the reply on ``handler``.

        A well-formed request for a registered method that runs on the event
        loop is answered here: ``handler._queue(frames)`` with the reply, or
        ``handler._send_exc(msgid, exc)`` when the method raised, or
        ``handler._unencodable(msgid, exc)`` when its result does not encode.
        The method's ``record(seconds, failed)`` counts the call. Everything
        else (a notification, a blocking method, an unknown method, a
        malformed message) goes to ``handler._message(msg)``, and a payload
        the codec cannot decode to ``handler._undecodable(exc)``.
        """
        try:
            msg = self.codec.loads(frames)
        except Exception as e:
            handler._undecodable(e)
            return
        if type(msg) is list and len(msg) == 5:
            kind, msgid, method, args, kwargs = msg
            if kind == _REQUEST and type(msgid) is int and type(method) is str and type(args) is list \
                    and (kwargs is None or type(kwargs) is dict):
                m = methods.get(method)
                if m is not None and not m.blocking:
                    func = m.func
                    t0 = _perf_counter()
                    try:
                        result = func(*args, **kwargs) if kwargs else func(*args)
                    except BaseException as e:    # SystemExit from a method must not stop the server
                        m.record(_perf_counter() - t0, True)
                        handler._send_exc(msgid, e)
                        return
                    m.record(_perf_counter() - t0, False)
                    try:
                        out = self.reply(msgid, result)
                    except Exception as e:
                        handler._unencodable(msgid, e)
                        return
                    handler._queue(out)
                    return
        handler._message(msg)


def send_framed(sock: socket.socket, data: Buffer) -> None:
    """Send bytes already framed (:meth:`Wire.request`) whole on a blocking stream socket."""
    sock.sendall(data, _NOSIGNAL)
