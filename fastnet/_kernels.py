"""The one place that picks the compiled kernels or their pure-Python twins.

``FASTNET_PURE=1`` selects ``fastnet._pure``; otherwise the compiled modules in
``fastnet._c`` must import, and a missing one is a loud ImportError: a silent
fallback to the slow path is a trap for HPC users.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING

KERNELS = ("framing", "zerocopy", "auth", "fdpass", "reactor", "rpcwire")

PURE = os.environ.get("FASTNET_PURE", "").strip().lower() not in ("", "0", "false", "no")

if PURE:
    backend = "python"
    _package = "fastnet._pure"
else:
    backend = "cython"
    _package = "fastnet._c"


def _load(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"{_package}.{name}")
    except ImportError as exc:
        if PURE:
            raise
        raise ImportError(
            f"fastnet's compiled kernel fastnet._c.{name} is not built ({exc}). "
            "Build it with `python -m pip install .` (needs a C compiler and Cython 3), "
            "or set FASTNET_PURE=1 to run the pure-Python kernels knowingly."
        ) from exc


if TYPE_CHECKING:
    # mypy sees the compiled kernels' stubs (fastnet/_c/*.pyi); the pure twins
    # in fastnet._pure have the same API
    from fastnet._c import auth, fdpass, framing, reactor, rpcwire, zerocopy
else:
    framing = _load("framing")
    zerocopy = _load("zerocopy")
    auth = _load("auth")
    fdpass = _load("fdpass")
    reactor = _load("reactor")
    rpcwire = _load("rpcwire")

__all__ = ["backend", "framing", "zerocopy", "auth", "fdpass", "reactor", "rpcwire", "KERNELS", "PURE"]
