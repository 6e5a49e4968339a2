"""Argument conversions shared by the pure framing kernel's modules.

They mirror what the compiled kernel's C-typed arguments and buffer requests
accept, so both kernel sets raise the same errors for the same input.
"""
from __future__ import annotations

from operator import index as _index
from pickle import PickleBuffer
from typing import TYPE_CHECKING, Any, SupportsIndex

if TYPE_CHECKING:
    from typing_extensions import Buffer

_LLONG_MAX = 0x7fffffffffffffff


def _ssize(x: SupportsIndex) -> int:
    """Convert like a Py_ssize_t argument of the compiled kernel."""
    if type(x) is not int:
        x = _index(x)
    if not -_LLONG_MAX - 1 <= x <= _LLONG_MAX:
        raise OverflowError("Python int too large to convert to C ssize_t")
    return x


def _longlong(x: Any) -> int:
    """Convert like a C long long of the compiled kernel (which truncates floats)."""
    if not isinstance(x, int):
        conv = getattr(type(x), "__int__", None)
        if conv is None:
            raise TypeError("an integer is required")
        x = conv(x)
    if not -_LLONG_MAX - 1 <= x <= _LLONG_MAX:
        raise OverflowError("Python int too large to convert to C long")
    return int(x)


def _view(obj: Buffer) -> memoryview:
    """A flat unsigned-byte view of a C- or Fortran-contiguous buffer (PyBUF_ANY_CONTIGUOUS)."""
    v = memoryview(obj)
    if v.ndim == 1 and v.format == "B" and v.c_contiguous:
        return v
    v.release()
    # memoryview.cast() refuses Fortran order and non-native formats; raw() takes both
    return PickleBuffer(obj).raw()


def _wview(obj: Buffer) -> memoryview:
    """Like _view, for a buffer that will be written to."""
    v = memoryview(obj)
    if v.readonly:
        v.release()
        raise BufferError("Object is not writable.")
    if v.ndim == 1 and v.format == "B" and v.c_contiguous:
        return v
    v.release()
    return PickleBuffer(obj).raw()
