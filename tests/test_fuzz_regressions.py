"""Every input the kernel fuzzer kept, replayed through its own check.

fuzz/regressions/ holds the inputs that once crashed, hung or made the
compiled kernels disagree with their pure twins (libFuzzer writes new ones
there, see fuzz/README.md); fuzz/corpus/ holds the seeds. Each runs through
``check()`` of fuzz/fuzz_kernels.py, without atheris. The memory errors among
them show only under tools/sanitize.sh, which runs this file too.
"""
import importlib.util
import pathlib

import pytest

FUZZ = pathlib.Path(__file__).resolve().parent.parent / "fuzz"
INPUTS = sorted(p for d in ("regressions", "corpus") for p in (FUZZ / d).iterdir() if p.is_file())


def _harness():
    spec = importlib.util.spec_from_file_location("fuzz_kernels", FUZZ / "fuzz_kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


harness = _harness()


# some of these inputs once hung the compiled kernel
WATCHDOG_SECONDS = 60


def test_there_is_something_to_replay():
    kept = {p.parent.name for p in INPUTS}
    assert kept == {"regressions", "corpus"}


def test_the_seeds_are_the_ones_the_harness_writes():
    """fuzz/corpus/ is generated (--make-corpus): it must not drift from the harness's input format."""
    seeds = harness.seeds()
    on_disk = {p.name: p.read_bytes() for p in (FUZZ / "corpus").iterdir()}
    assert on_disk == seeds


@pytest.mark.parametrize("path", INPUTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_replay(path):
    harness.check(path.read_bytes())
