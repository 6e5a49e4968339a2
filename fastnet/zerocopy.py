"""Zero-copy bulk transfer: module-level helpers and the array wire header.

An array travels as two ordinary frames, so a stdlib peer can still read it as
bytes: a small header frame (dtype, shape, order) and a raw payload frame.
Header layout (little-endian)::

    b"\\x93FNA"  version:u8  kind:u8  order:u8  ndim:u8  shape:u64[ndim]  type:ascii

kind 0: ``type`` is a numpy dtype (``dtype.str``, or the repr of
``dtype.descr`` for structured dtypes); kind 1: ``type`` is a struct-module
format of a plain buffer. Version 2 (``SHM_VERSION``) is the same header for
an array whose bytes are in the shared-memory segment riding on the frame
(see :mod:`fastnet.shm`); no payload frame follows it.
"""
from __future__ import annotations

import ast
import struct
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy
    import numpy.typing as npt

from fastnet._kernels import zerocopy as _zc
from fastnet.errors import ProtocolError

_numpy_module: Any = None


def _numpy() -> Any:
    """numpy, imported on first use; None when it is not installed (it is optional)."""
    global _numpy_module
    if _numpy_module is None:
        try:
            import numpy
        except ImportError:
            _numpy_module = False
        else:
            _numpy_module = numpy
    return _numpy_module or None


def __getattr__(name: str) -> Any:
    # ``zerocopy._np`` for the layers above, without importing numpy at fastnet's import
    if name == "_np":
        return _numpy()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["send_from", "recv_into", "encode_array", "decode_array_header", "MAX_NDIM"]

send_from = _zc.send_from
recv_into = _zc.recv_into

MAGIC = b"\x93FNA"
VERSION = 1
SHM_VERSION = 2
#: The most dimensions an array header may declare.
MAX_NDIM = 64
MAX_HEADER = 8 + 8 * MAX_NDIM + 1024
_FIXED = struct.Struct("<4sBBcB")


def _numpy_type(dtype: numpy.dtype[Any]) -> str:
    if dtype.hasobject:
        raise TypeError("arrays holding Python objects cannot be sent raw; use send()")
    if dtype.fields is None and dtype.subdtype is None:
        return dtype.str
    return repr(_numpy().lib.format.dtype_to_descr(dtype))


def byte_view(arr: npt.NDArray[Any]) -> npt.NDArray[numpy.uint8]:
    """A flat uint8 view of a C- or Fortran-contiguous numpy array's memory, never a copy.

    Every dtype exports this, including datetime64/timedelta64, whose own
    buffer export fails whenever a format is asked for (memoryview(),
    PickleBuffer), as it always is from pure Python.
    """
    if not (arr.flags.c_contiguous or arr.flags.f_contiguous):
        raise BufferError("array is not contiguous")
    # order "A" walks a contiguous array in memory order, so this reshape is a view
    return arr.reshape(-1, order="A").view(_numpy().uint8)


def encode_array(obj: Any) -> tuple[bytes, Any]:
    """Return ``(header_bytes, payload)`` for a numpy array or any buffer.

    The payload is the object's own memory when it is C- or Fortran-
    contiguous; a non-contiguous array is copied once into C order.
    """
    np = sys.modules.get("numpy")   # an ndarray implies numpy is already imported
    if np is not None and isinstance(obj, np.ndarray):
        if obj.flags.c_contiguous:
            order = b"C"
        elif obj.flags.f_contiguous:
            order = b"F"
        else:
            obj = np.ascontiguousarray(obj)
            order = b"C"
        kind, tname, shape = 0, _numpy_type(obj.dtype), obj.shape
        payload: Any = byte_view(obj)
    else:
        m = memoryview(obj)
        if m.c_contiguous:
            order = b"C"
        elif m.f_contiguous:
            order = b"F"
        else:
            raise BufferError("a non-contiguous plain buffer cannot be sent; pass a numpy array")
        kind, tname, shape = 1, m.format, m.shape
        payload = m
    if len(shape) > MAX_NDIM:
        raise ValueError(f"at most {MAX_NDIM} dimensions")
    header = _FIXED.pack(MAGIC, VERSION, kind, order, len(shape)) + struct.pack(
        f"<{len(shape)}Q", *shape) + tname.encode("ascii")
    return header, payload


def decode_array_header(header: bytes, version: int = VERSION) -> tuple[int, str, tuple[int, ...], str]:
    """Parse an array header frame of the given version: ``(kind, type_name, shape, order)``."""
    if len(header) < _FIXED.size or header[:4] != MAGIC:
        raise ProtocolError("expected an array header frame")
    _, got, kind, order, ndim = _FIXED.unpack_from(header)
    if got != version:
        raise ProtocolError(f"unsupported array header version {got}")
    if kind not in (0, 1) or order not in (b"C", b"F") or ndim > MAX_NDIM:
        raise ProtocolError("malformed array header")
    end = _FIXED.size + 8 * ndim
    if len(header) < end:
        raise ProtocolError("truncated array header")
    shape = struct.unpack_from(f"<{ndim}Q", header, _FIXED.size)
    try:
        tname = header[end:].decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("malformed array type in header") from None
    return kind, tname, shape, order.decode()


def dtype_of(kind: int, tname: str) -> numpy.dtype[Any]:
    """The numpy dtype a header names (numpy required)."""
    np = _numpy()
    try:
        if kind == 0 and tname.startswith("["):
            dt: numpy.dtype[Any] = np.lib.format.descr_to_dtype(ast.literal_eval(tname))
        else:
            dt = np.dtype(tname)
    except (ValueError, TypeError, SyntaxError, MemoryError) as exc:
        raise ProtocolError(f"unknown array type {tname!r}: {exc}") from None
    if dt.hasobject:
        raise ProtocolError("peer sent an object array header")
    return dt


def itemsize_of(kind: int, tname: str) -> int:
    """Item size in bytes of a header's type, without numpy when possible."""
    if kind == 1:
        try:
            return struct.calcsize(tname)
        except struct.error:
            pass
    if _numpy() is None:
        raise ProtocolError(f"numpy is needed to receive arrays of type {tname!r}")
    return dtype_of(kind, tname).itemsize


def nbytes_of(shape: tuple[int, ...], itemsize: int) -> int:
    """Total payload size, refusing products that overflow 63 bits."""
    n = itemsize
    for d in shape:
        n *= d
        if n > (1 << 63) - 1:
            raise ProtocolError("array header claims an impossible size")
    return n
