"""The kernel set really loaded is the one the environment asked for.

Without FASTNET_PURE (as in the compiled CI run) every kernel must be the
compiled extension; a silent fallback to the pure twins must fail here.
"""
import importlib
import os
import subprocess
import sys
import textwrap

import pytest

import fastnet
from fastnet import _kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(fastnet.__file__)))
# Decided here, independently of fastnet._kernels, from the environment alone.
EXPECT_PURE = os.environ.get("FASTNET_PURE", "").strip().lower() not in ("", "0", "false", "no")
KERNELS = ("framing", "zerocopy", "auth")


def _child(code, **env_changes):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    for k, v in env_changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_backend_matches_the_environment():
    assert fastnet.backend == ("python" if EXPECT_PURE else "cython")


def test_every_kernel_module_is_the_expected_implementation():
    assert set(KERNELS) <= set(_kernels.KERNELS)
    for name in _kernels.KERNELS:
        mod = getattr(_kernels, name)
        if EXPECT_PURE:
            assert mod.__name__ == f"fastnet._pure.{name}"
            assert mod.__file__.endswith(".py")
        else:
            assert mod.__name__ == f"fastnet._c.{name}", f"{name}: {mod.__name__} loaded"
            assert mod.__file__.endswith(".so"), f"{name}: {mod.__file__} is not a compiled extension"
            assert "/_pure/" not in mod.__file__


def test_the_layers_above_use_the_selected_kernels():
    from fastnet import connection, zerocopy, handshake
    pkg = "fastnet._pure" if EXPECT_PURE else "fastnet._c"
    assert connection._framing.__name__ == f"{pkg}.framing"
    assert zerocopy._zc.__name__ == f"{pkg}.zerocopy"
    assert handshake._auth.__name__ == f"{pkg}.auth"
    assert fastnet.send_from.__module__ == f"{pkg}.zerocopy"
    assert fastnet.recv_into.__module__ == f"{pkg}.zerocopy"


def test_compiled_kernels_are_machine_code():
    if EXPECT_PURE:
        pytest.skip("the pure kernel run")
    for name in KERNELS:
        mod = importlib.import_module(f"fastnet._c.{name}")
        with open(mod.__file__, "rb") as f:
            assert f.read(4) == b"\x7fELF"


REPORT = """
    import fastnet
    from fastnet import _kernels
    print(fastnet.backend)
    for name in _kernels.KERNELS:
        print(getattr(_kernels, name).__file__)
"""


def test_a_fresh_process_without_the_variable_loads_compiled_kernels():
    if EXPECT_PURE:
        pytest.skip("the pure kernel run may not have built the extensions")
    r = _child(REPORT, FASTNET_PURE=None)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[0] == "cython"
    assert len(lines) == 1 + len(_kernels.KERNELS)
    assert all(path.endswith(".so") for path in lines[1:])


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_a_fresh_process_with_the_variable_loads_the_pure_twins(value):
    r = _child(REPORT, FASTNET_PURE=value)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[0] == "python"
    assert all(path.endswith(".py") and "/_pure/" in path for path in lines[1:])


@pytest.mark.parametrize("value", ["0", ""])
def test_a_false_value_means_compiled(value):
    if EXPECT_PURE:
        pytest.skip("the pure kernel run may not have built the extensions")
    r = _child(REPORT, FASTNET_PURE=value)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "cython"


def test_a_missing_compiled_kernel_is_a_loud_import_error():
    """No silent fallback: hide one extension and importing fastnet must fail, saying how to build."""
    code = """
        import importlib.abc, sys

        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "fastnet._c.framing":
                    raise ImportError("hidden by the test")
                return None

        sys.meta_path.insert(0, Hide())
        try:
            import fastnet
        except ImportError as exc:
            print("IMPORT-ERROR:", exc)
        else:
            print("LOADED:", fastnet.backend)
    """
    r = _child(code, FASTNET_PURE=None)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("IMPORT-ERROR:"), r.stdout
    assert "FASTNET_PURE" in r.stdout
    assert "pip install" in r.stdout
