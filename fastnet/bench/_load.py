"""Load fastnet.bench's modules by file path, without importing fastnet.

The benchmark children (and the scripts in bench/) run the anchor rows even
when the fastnet package does not import: a half-built tree, a broken
kernel.  So they never ``import fastnet.bench``; they load this file by its
path and call :func:`load`, which registers this directory as the package
``_fastnet_bench`` (its ``__init__`` is not run) and imports a module of it.
The modules import one another relatively, so they work under either name.
This file uses the standard library only.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

PACKAGE = "_fastnet_bench"


def load(name: str) -> ModuleType:
    """Import ``name`` (``"runner"``, ``"child"``, a case...) of this directory as ``_fastnet_bench.<name>``."""
    if PACKAGE not in sys.modules:
        spec = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
        spec.submodule_search_locations = [os.path.dirname(os.path.abspath(__file__))]
        sys.modules[PACKAGE] = importlib.util.module_from_spec(spec)
    return importlib.import_module(f"{PACKAGE}.{name}")
