"""Run the test suite on every supported CPython found on this machine.

    nox -l                        the sessions
    nox -s "tests-3.12(pure)"     one interpreter, one kernel set
    nox -s ci                     what .ci/run runs: each interpreter's venv once,
                                  compiled kernels on all, pure on PURE_PYTHONS
    nox -s sdist                  build the sdist, install it in a fresh venv, smoke-test it

Interpreters are looked up as pythonX.Y on PATH and in pyenv's versions
directory; a supported version that is on neither is not run (``nox -l`` says
which were found). Each session installs fastnet from this tree with its
test extra, so the kernels compile for that interpreter during the install.
"""
import glob
import os
import shutil
import subprocess

import nox

SUPPORTED = ["3.10", "3.11", "3.12", "3.13"]
PURE_PYTHONS = ["3.10", "3.13"]            # the oldest and the newest
FUZZ_PYTHON = "3.11"                       # atheris has a wheel for it
nox.options.sessions = ["tests"]
nox.options.error_on_missing_interpreters = False


def _works(exe):
    try:
        return subprocess.run([exe, "-c", "pass"], capture_output=True, timeout=30).returncode == 0
    except OSError:
        return False


def _find_pythons():
    """The supported versions with a working interpreter; pyenv's go first on PATH."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found, extra = [], []
    for v in SUPPORTED:
        exe = shutil.which(f"python{v}")
        if exe and _works(exe):
            found.append(v)
            continue
        # pyenv's shims answer only for the selected version: use the real binaries
        for path in sorted(glob.glob(os.path.join(root, "versions", f"{v}.*", "bin", f"python{v}")), reverse=True):
            if _works(path):
                extra.append(os.path.dirname(path))
                found.append(v)
                break
    if extra:
        os.environ["PATH"] = os.pathsep.join(extra + [os.environ.get("PATH", "")])
    return found


PYTHONS = _find_pythons()


def _install(session, extras="test"):
    # editable, as in the README: the kernels are built in place for this
    # interpreter (each version's extension has its own ABI-tagged file name)
    session.install("-e", f".[{extras}]")


def _pytest(session, pure, *args):
    env = {"FASTNET_PURE": "1"} if pure else {"FASTNET_PURE": ""}
    session.run("python", "-m", "pytest", *args, env=env)


@nox.session(python=PYTHONS)
@nox.parametrize("kernels", ["compiled", "pure"])
def tests(session, kernels):
    """The whole suite on one interpreter and one kernel set (posargs go to pytest)."""
    _install(session)
    _pytest(session, kernels == "pure", *session.posargs)


@nox.session(python=PYTHONS)
def ci(session):
    """One venv per interpreter: the suite on the compiled kernels, and on the pure ones where listed."""
    _install(session, "test,fuzz" if session.python == FUZZ_PYTHON else "test")
    _pytest(session, False, *session.posargs)
    if session.python in PURE_PYTHONS:
        _pytest(session, True, *session.posargs)


@nox.session(python=PYTHONS[-1:] or None)
def sdist(session):
    """Build the sdist, install it (the kernels compile from it) and smoke-test the installation."""
    tmp = session.create_tmp()
    session.install("build")
    for old in glob.glob(os.path.join(tmp, "fastnet-*.tar.gz")):
        os.remove(old)
    session.run("python", "-m", "build", "--sdist", "--outdir", tmp)
    (archive,) = glob.glob(os.path.join(tmp, "fastnet-*.tar.gz"))
    session.install("--force-reinstall", "--no-deps", "--no-cache-dir", archive)
    # from outside the tree, so the installation is imported, not the checkout
    with session.chdir(tmp):
        session.run("python", os.path.join(session.invoked_from, "tools", "smoke.py"))
