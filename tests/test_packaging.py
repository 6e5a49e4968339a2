"""Packaging facts a user and a packager rely on: one version, written once.

The installed distribution's metadata is checked against ``__version__`` by
tools/smoke.py on every wheel and sdist install (nox -s sdist, cibuildwheel).
"""
import os
import subprocess
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:   # 3.10 has no tomllib; pytest itself depends on tomli there
    import tomli as tomllib

import pytest

import fastnet
from fastnet import _version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_version_comes_from_one_place():
    project = _pyproject()
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fastnet._version.__version__"}
    assert fastnet.__version__ is _version.__version__


def test_cli_version_is_the_package_version():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "fastnet", "--version"], capture_output=True,
                         text=True, env=env, check=True, timeout=60)
    assert out.stdout == f"fastnet {fastnet.__version__}\n"


def test_classifiers_name_every_supported_python():
    project = _pyproject()["project"]
    assert project["requires-python"] == ">=3.10"
    listed = {c.rsplit(" :: ", 1)[1] for c in project["classifiers"]
              if c.startswith("Programming Language :: Python :: 3.")}
    assert listed == {"3.10", "3.11", "3.12", "3.13"}
    assert "Typing :: Typed" in project["classifiers"]
    assert project["license"] == "MIT"
    assert os.path.exists(os.path.join(ROOT, project["license-files"][0]))


def _warn_from(module_name):
    code = "import warnings\nwarnings.warn('a deprecated call', DeprecationWarning)"
    exec(code, {"__name__": module_name})


def test_warnings_from_fastnet_modules_fail_the_suite():
    # pyproject's filterwarnings: an error when raised from fastnet's modules ...
    with pytest.raises(DeprecationWarning):
        _warn_from("fastnet.server")
    # ... and only reported when raised from anyone else's
    with pytest.warns(DeprecationWarning):
        _warn_from("fastnetwork")
