"""Message codecs for the RPC layer: a registry of named ``dumps``/``loads`` pairs.

A :class:`Codec` turns an object into a list of frames (buffers) and back,
because pickle protocol 5 sends large buffers out of band as frames of their
own. Built in:

``msgpack`` (the default)
    bytes travel as msgpack bin, tuples arrive as lists, map keys may be
    non-str scalars (int, bytes, None, ...). numpy arrays and scalars travel as ext type
    :data:`NUMPY_EXT_CODE` (42), payload::

        version:u8  flags:u8  ndim:u8  dlen:u16  shape:u64[ndim]  dtype:utf8[dlen]
        zero padding to a multiple of 16 bytes, then the raw data

    (little-endian; flags bit 0: Fortran order, bit 1: numpy scalar, bit 2:
    ``dtype`` is the JSON of a structured dtype's ``descr``, else ``dtype.str``).
    A decoded array is a **read-only view** over the received ext payload
    (no copy; call ``.copy()`` to modify it). Object dtypes raise TypeError.
``json``
    UTF-8 text (ASCII-escaped, so any str round-trips). What json cannot
    encode -- bytes included -- raises TypeError naming the type; nothing is
    silently ``str()``-ed. Dict keys follow the json module (int, float, bool
    and None keys become strings).
``pickle``
    Protocol 5. Contiguous numpy arrays (anything pickled through
    ``PickleBuffer``) of at least :data:`PICKLE_OUT_OF_BAND_THRESHOLD` bytes
    become frames of their own that are views of the arrays' memory, not
    copies: keep those arrays unchanged until the frames are sent. Decoded
    arrays are views over the received frames. ``bytes``, ``bytearray`` and
    non-contiguous arrays travel inside the pickle (one copy). ``requires_auth`` is True: the RPC layer accepts it only on an
    authenticated connection, since unpickling runs arbitrary code.

numpy and msgpack are optional and imported only when first needed.
"""
from __future__ import annotations

import json as _json
import pickle as _pickle
import struct as _struct
import sys as _sys
import threading as _threading
from collections.abc import Callable, Sequence
from io import BytesIO as _BytesIO
from types import ModuleType
from typing import IO, TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "Codec",
    "DEFAULT_CODEC",
    "NUMPY_EXT_CODE",
    "PICKLE_OUT_OF_BAND_THRESHOLD",
    "available_codecs",
    "get_codec",
    "register_codec",
]

#: The codec RPC servers and proxies use unless told otherwise.
DEFAULT_CODEC = "msgpack"
#: The msgpack extension type code that carries numpy arrays and scalars.
NUMPY_EXT_CODE = 42
#: Array buffers at least this large (bytes) travel as out-of-band frames with pickle.
PICKLE_OUT_OF_BAND_THRESHOLD = 64 * 1024


class Codec:
    """A named codec: ``dumps(obj) -> list of frames``, ``loads(frames) -> obj``.

    ``binary`` is False for text codecs; ``requires_auth`` marks codecs that
    must only be used on authenticated connections.
    """

    __slots__ = ("name", "dumps", "loads", "binary", "requires_auth", "builtin")

    def __init__(self, name: str, dumps: Callable[[Any], list[Buffer]],
                 loads: Callable[[Sequence[Buffer]], Any], *, binary: bool = True,
                 requires_auth: bool = False, builtin: bool = False) -> None:
        self.name = name
        self.dumps = dumps
        self.loads = loads
        self.binary = binary
        self.requires_auth = requires_auth
        self.builtin = builtin

    def __repr__(self) -> str:
        return (f"<Codec {self.name!r} binary={self.binary} "
                f"requires_auth={self.requires_auth}>")


_registry: dict[str, Codec] = {}
_registry_lock = _threading.Lock()


def _single_frame(name: str, frames: Sequence[Buffer]) -> Buffer:
    if len(frames) != 1:
        raise ValueError(f"{name} codec expects 1 frame, got {len(frames)}")
    return frames[0]


def register_codec(name: str, dumps: Callable[[Any], Any], loads: Callable[[Any], Any], *,
                   binary: bool = True, requires_auth: bool = False,
                   multiframe: bool = False, replace: bool = False) -> Codec:
    """Register a codec under ``name`` and return its :class:`Codec`.

    By default ``dumps(obj)`` returns one bytes-like object and ``loads(data)``
    takes one; with ``multiframe=True`` they produce and take a list of frames.
    A name already registered (built-in or not) raises ValueError unless
    ``replace=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("codec name must be a non-empty str")
    if not (callable(dumps) and callable(loads)):
        raise TypeError("dumps and loads must be callable")
    if multiframe:
        c_dumps, c_loads = dumps, loads
    else:
        def c_dumps(obj: Any) -> list[Buffer]:
            return [dumps(obj)]

        def c_loads(frames: Sequence[Buffer]) -> Any:
            return loads(_single_frame(name, frames))
    codec = Codec(name, c_dumps, c_loads, binary=binary, requires_auth=requires_auth)
    with _registry_lock:
        old = _registry.get(name)
        if old is not None and not replace:
            kind = "built-in " if old.builtin else ""
            raise ValueError(f"{kind}codec {name!r} is already registered (pass replace=True)")
        _registry[name] = codec
    return codec


def get_codec(name: str | Codec) -> Codec:
    """The :class:`Codec` registered as ``name``; ValueError naming the known ones if none."""
    if isinstance(name, Codec):
        return name
    try:
        return _registry[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(available_codecs())}") from None


def available_codecs() -> list[str]:
    """Names of the registered codecs, sorted."""
    return sorted(_registry)


def _type_name(obj: object) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


# ---- numpy ext type (msgpack) -------------------------------------------------

_HDR = _struct.Struct("<BBBH")
_HDR_VERSION = 1
_F_FORTRAN, _F_SCALAR, _F_JSON_DESCR = 1, 2, 4


def _numpy_or_raise() -> Any:
    try:
        import numpy
    except ImportError:
        raise ImportError("decoding a numpy array needs numpy installed") from None
    return numpy


def _encode_array(np: Any, arr: Any, flags: int) -> bytes:
    dt = arr.dtype
    if dt.hasobject:
        raise TypeError(f"cannot encode a numpy array of dtype {dt} (object dtypes are refused)")
    if arr.flags.c_contiguous:
        order = "C"
    elif arr.flags.f_contiguous:
        order, flags = "F", flags | _F_FORTRAN
    else:
        arr, order = np.ascontiguousarray(arr), "C"
    if dt.fields is None:
        descr: str = dt.str
    else:
        flags |= _F_JSON_DESCR
        descr = _json.dumps(np.lib.format.dtype_to_descr(dt))
    d = descr.encode()
    head = _HDR.pack(_HDR_VERSION, flags, arr.ndim, len(d)) + _struct.pack(f"<{arr.ndim}Q", *arr.shape) + d
    # pad so the data starts 16-byte aligned in the received payload object
    head += b"\0" * (-len(head) % 16)
    return cast(bytes, head + arr.tobytes(order=order))


def _tuplify(descr: Any) -> Any:
    # JSON turned the descr's tuples into lists; numpy wants tuples for fields
    if isinstance(descr, str):
        return descr
    out = []
    for field in descr:
        name, sub = field[0], _tuplify(field[1])
        name = tuple(name) if isinstance(name, list) else name
        out.append((name, sub) if len(field) == 2 else (name, sub, tuple(field[2])))
    return out


def _decode_array(data: bytes) -> Any:
    np = _numpy_or_raise()
    if len(data) < _HDR.size:
        raise ValueError("numpy ext payload too short")
    version, flags, ndim, dlen = _HDR.unpack_from(data)
    if version != _HDR_VERSION:
        raise ValueError(f"unsupported numpy ext version {version}")
    off = _HDR.size
    shape = _struct.unpack_from(f"<{ndim}Q", data, off)
    off += 8 * ndim
    descr = bytes(data[off:off + dlen]).decode()
    off += dlen
    off += -off % 16
    if flags & _F_JSON_DESCR:
        dt = np.lib.format.descr_to_dtype(_tuplify(_json.loads(descr)))
    else:
        dt = np.dtype(descr)
    if dt.hasobject:
        raise TypeError(f"refusing a numpy array of dtype {dt} (object dtypes are refused)")
    count = 1
    for n in shape:
        count *= n
    if off > len(data) or count * dt.itemsize != len(data) - off:
        raise ValueError("numpy ext payload size does not match its shape and dtype")
    order = "F" if flags & _F_FORTRAN else "C"
    if count == 0 or dt.itemsize == 0:
        arr = np.empty(shape, dt, order=order)
        arr.flags.writeable = False
    else:
        arr = np.frombuffer(data, dt, count, off).reshape(shape, order=order)
    return arr[()] if flags & _F_SCALAR else arr


# ---- msgpack ------------------------------------------------------------------

_msgpack_module: ModuleType | None = None


def _msgpack() -> ModuleType:
    global _msgpack_module
    if _msgpack_module is None:
        try:
            import msgpack
        except ImportError:
            raise ImportError("the msgpack codec needs the msgpack package (pip install msgpack)") from None
        _msgpack_module = msgpack
    return _msgpack_module


def _msgpack_default(obj: object) -> Any:
    # numpy arrays can only exist if numpy was imported, so no import is needed here
    np = _sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.ndarray):
            return _msgpack().ExtType(NUMPY_EXT_CODE, _encode_array(np, obj, 0))
        if isinstance(obj, np.generic):
            return _msgpack().ExtType(NUMPY_EXT_CODE, _encode_array(np, np.asarray(obj), _F_SCALAR))
    raise TypeError(f"msgpack codec cannot encode {_type_name(obj)} object")


def _msgpack_ext_hook(code: int, data: bytes) -> Any:
    if code == NUMPY_EXT_CODE:
        return _decode_array(data)
    return _msgpack().ExtType(code, data)


_packers = _threading.local()


def _msgpack_dumps(obj: Any) -> list[Buffer]:
    # a Packer per thread: building one per call costs as much as the packing
    try:
        pack = _packers.pack
    except AttributeError:
        pack = _packers.pack = _msgpack().Packer(use_bin_type=True, default=_msgpack_default).pack
    return [pack(obj)]


def _msgpack_loads(frames: Sequence[Buffer]) -> Any:
    if len(frames) != 1:
        _single_frame("msgpack", frames)
    return (_unpackb or _msgpack_unpackb())(frames[0], raw=False, strict_map_key=False,
                                            ext_hook=_msgpack_ext_hook)


def _msgpack_unpackb() -> Callable[..., Any]:
    global _unpackb
    if _unpackb is None:
        _unpackb = _msgpack().unpackb
    return _unpackb


_unpackb: Callable[..., Any] | None = None


# ---- json ---------------------------------------------------------------------

def _json_default(obj: object) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        raise TypeError(f"json codec cannot encode {_type_name(obj)} object; "
                        "use msgpack or pickle for bytes")
    raise TypeError(f"json codec cannot encode {_type_name(obj)} object")


# ensure_ascii keeps output valid UTF-8 even for lone surrogates
_json_encoder = _json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), default=_json_default)


def _json_dumps(obj: Any) -> list[Buffer]:
    return [_json_encoder.encode(obj).encode("ascii")]


def _json_loads(frames: Sequence[Buffer]) -> Any:
    data = _single_frame("json", frames)
    if not isinstance(data, (bytes, bytearray)):
        data = bytes(data)
    return _json.loads(data.decode("utf-8"))


# ---- pickle -------------------------------------------------------------------

def _pickle_dumps(obj: Any) -> list[Buffer]:
    """Protocol 5; large buffers pickle offers out of band (numpy array data) become frames.

    ``bytes`` and ``bytearray`` stay in the pickle: pickle never offers them
    out of band, and catching them with ``persistent_id`` would tax every
    object pickled (6x slower on a list of 100k ints).
    """
    frames: list[Any] = [None]

    def out_of_band(pb: _pickle.PickleBuffer) -> bool:
        raw = pb.raw()
        if raw.nbytes < PICKLE_OUT_OF_BAND_THRESHOLD:
            return True  # small: serialized in-band
        frames.append(raw)
        return False

    frames[0] = _pickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
    return frames


def _pickle_loads(frames: Sequence[Buffer]) -> Any:
    if not frames:
        raise ValueError("pickle codec expects at least 1 frame, got 0")
    return _pickle.loads(frames[0], buffers=frames[1:])


def _register_builtins() -> None:
    for codec in (
        Codec("msgpack", _msgpack_dumps, _msgpack_loads, builtin=True),
        Codec("json", _json_dumps, _json_loads, binary=False, builtin=True),
        Codec("pickle", _pickle_dumps, _pickle_loads, requires_auth=True, builtin=True),
    ):
        _registry[codec.name] = codec


_register_builtins()
