"""Fixtures shared by the whole suite.

* ``kernels``: every kernel of one set, compiled (``fastnet._c``) or pure
  (``fastnet._pure``), imported directly whatever FASTNET_PURE says; a test
  that takes it runs once per set in the same process.
* ``watchdog`` (automatic): in a module that sets ``WATCHDOG_SECONDS``, dumps
  every thread's stack and exits when one of its tests runs longer than that.
* ``serve``: servers started for a test and stopped after it.
* ``import fastnet_soak`` loads ``tools/soak.py`` (server hosts, checked
  workloads, figures) once for every module that needs it; ``hosts`` makes
  its server hosts and kills them after the test.
"""
import faulthandler
import importlib
import importlib.abc
import importlib.util
import os
import signal
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = ("framing", "zerocopy", "auth", "fdpass", "reactor", "rpcwire")
KERNEL_SETS = {"c": "fastnet._c", "pure": "fastnet._pure"}
# Decided from the environment alone, as tests/test_backend.py does: without
# FASTNET_PURE the compiled set is what users get, and it must be there.
EXPECT_PURE = os.environ.get("FASTNET_PURE", "").strip().lower() not in ("", "0", "false", "no")


def load_kernel_set(name):
    """The kernel set ``name`` ("c" or "pure") as a namespace: ``.framing``, ``.auth``, ...

    A compiled kernel that does not import fails the test, except in a
    FASTNET_PURE run outside CI, where the compiled set was not asked for.
    """
    package = KERNEL_SETS[name]
    try:
        modules = {k: importlib.import_module(f"{package}.{k}") for k in KERNELS}
    except ImportError as exc:
        if name == "c" and EXPECT_PURE and not os.environ.get("CI"):
            pytest.skip(f"the compiled kernels are not built ({exc}); this run asked for the pure set")
        raise
    return types.SimpleNamespace(name=name, package=package, **modules)


@pytest.fixture(scope="module", params=sorted(KERNEL_SETS))
def kernels(request):
    """All kernels of one set; the test runs once with the compiled set and once with the pure twins."""
    return load_kernel_set(request.param)


@pytest.fixture(autouse=True)
def watchdog(request):
    """Last resort against a hung run: dump every thread's stack and exit (modules with WATCHDOG_SECONDS)."""
    seconds = getattr(request.module, "WATCHDOG_SECONDS", None)
    if seconds is None:
        yield
        return
    faulthandler.dump_traceback_later(seconds, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


class Servers:
    """serve(cls, address, handler, **kw) -> a started server; serve.keep(srv) -> srv, for one built elsewhere.

    After the test each one has its gates (tests/rpcutil.py) released, is shut
    down and closed, and leaves no prefork worker behind.
    """

    def __init__(self):
        self.made = []

    def __call__(self, cls, address, handler, **kw):
        return self.keep(cls(address, handler, **kw)).start()

    def keep(self, srv):
        self.made.append(srv)
        return srv

    def close(self):
        for srv in self.made:
            for gate in getattr(srv, "gates", ()):
                gate.release.set()
            srv.shutdown(timeout=5)
            srv.server_close()
            for pid in srv.worker_pids:   # never leave a child behind
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def serve():
    """Servers started for the test (see Servers), stopped afterwards."""
    servers = Servers()
    yield servers
    servers.close()


class _SoakFinder(importlib.abc.MetaPathFinder):
    """Makes ``import fastnet_soak`` load tools/soak.py (a script, not part of the package)."""

    def find_spec(self, name, path=None, target=None):
        if name == "fastnet_soak":
            return importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", "soak.py"))
        return None


sys.meta_path.append(_SoakFinder())


@pytest.fixture
def hosts():
    """Factory of tools/soak.py ServerHosts (server processes), every one killed at teardown."""
    import fastnet_soak as soak
    made = []

    def make(cfg, **kw):
        h = soak.ServerHost(cfg, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()
