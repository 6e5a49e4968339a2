"""Smoke test of an installed fastnet (a wheel or an sdist install, not a checkout).

    python tools/smoke.py

Checks that the compiled kernels load, a Pipe carries a message both ways,
the stubs, py.typed and the C floor program are installed, the version agrees with the installed metadata and FASTNET_PURE=1 selects the
pure kernels; exits non-zero on the first failure. cibuildwheel's test
command, nox's sdist session and .ci/run use it.
"""
import importlib.metadata
import os
import pathlib
import subprocess
import sys


def check(pure: bool) -> str:
    import fastnet
    import fastnet._kernels

    expected = "python" if pure else "cython"
    assert fastnet.backend == expected, f"backend {fastnet.backend!r}, expected {expected!r}"
    a, b = fastnet.Pipe()
    with a, b:
        a.send({"ping": list(range(10))})
        assert b.recv() == {"ping": list(range(10))}
        b.send_bytes(b"x" * 100_000)
        assert a.recv_bytes() == b"x" * 100_000
    pkg = pathlib.Path(fastnet.__file__).parent
    # the data files: typing markers and stubs, the C floor program fastnet bench compiles
    for name in ("py.typed", "bench/_floor.c", *(f"_c/{k}.pyi" for k in fastnet._kernels.KERNELS)):
        assert (pkg / name).is_file(), f"{name} is missing from the installed package"
    dist = importlib.metadata.version("fastnet")
    assert fastnet.__version__ == dist, f"fastnet.__version__ {fastnet.__version__} != metadata {dist}"
    return f"fastnet {fastnet.__version__} backend={fastnet.backend} from {pathlib.Path(fastnet.__file__).parent}"


def main() -> int:
    if os.environ.get("FASTNET_SMOKE_CHILD"):
        print(check(pure=True))
        return 0
    here = pathlib.Path(__file__).resolve().parent.parent
    print(check(pure=False))
    import fastnet
    if pathlib.Path(fastnet.__file__).resolve().parent == here / "fastnet":
        print(f"fastnet was imported from the source tree {here}, not an installation", file=sys.stderr)
        return 1
    env = dict(os.environ, FASTNET_PURE="1", FASTNET_SMOKE_CHILD="1")
    subprocess.run([sys.executable, __file__], env=env, check=True)
    out = subprocess.run([sys.executable, "-m", "fastnet", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"fastnet {fastnet.__version__}", out.stdout
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
