"""The package type-checks: ``mypy --strict fastnet`` is clean, and the stubs
of the kernels (``fastnet/_c/*.pyi``) match both the built extensions and
their pure twins in ``fastnet._pure``: one API, two implementations.

mypy is in the ``test`` extra, so the suite runs it wherever it was installed
as the README says. Elsewhere the checks are skipped, except under CI (``CI``
set), where a missing mypy fails: CI must keep the package typed.
"""
import importlib
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNELS = ("framing", "zerocopy", "auth", "fdpass", "reactor", "rpcwire")
TIMEOUT = 600


def _require_mypy():
    try:
        import mypy  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("mypy is not installed, and CI must type-check the package: "
                        "python3 -m pip install -e '.[test]' installs it")
        pytest.skip("mypy is not installed (python3 -m pip install -e '.[test]')")


def _run(*args, env=None):
    # from the repository root, so pyproject.toml's [tool.mypy] applies; the
    # cache (.mypy_cache, ignored by git) makes the second kernel run cheap
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT, env=env)


def test_mypy_strict_is_clean():
    _require_mypy()
    proc = _run("mypy", "--strict", "fastnet")
    assert proc.returncode == 0, f"mypy --strict fastnet found errors:\n{proc.stdout}\n{proc.stderr}"
    assert "Success: no issues found" in proc.stdout


def test_kernel_stubs_match_both_kernel_sets(tmp_path):
    _require_mypy()
    for name in KERNELS:
        # CI builds the kernels (even for the FASTNET_PURE run); elsewhere a
        # missing build leaves nothing to compare the stubs with
        try:
            importlib.import_module(f"fastnet._c.{name}")
        except ImportError:
            if os.environ.get("CI"):
                raise
            pytest.skip(f"fastnet._c.{name} is not built")
    # the same .pyi files serve as the stubs of fastnet._c and of fastnet._pure
    stubs = tmp_path / "stubs" / "fastnet"
    for package in ("_c", "_pure"):
        (stubs / package).mkdir(parents=True)
        (stubs / package / "__init__.pyi").write_text("")
        for name in KERNELS:
            shutil.copy(ROOT / "fastnet" / "_c" / f"{name}.pyi", stubs / package / f"{name}.pyi")
    (stubs / "__init__.pyi").write_text("")
    proc = _run("mypy.stubtest", "--allowlist", str(ROOT / "tests" / "stubtest_allowlist.txt"),
                *(f"fastnet.{package}.{name}" for package in ("_c", "_pure") for name in KERNELS),
                env={**os.environ, "MYPYPATH": str(stubs.parent)})
    assert proc.returncode == 0, f"the stubs differ from the kernels:\n{proc.stdout}\n{proc.stderr}"
