"""Helpers shared by the bench/ suites and scripts: fastnet bench's modules and client-side bits.

The scripts (and their child processes) import it too, so it needs only the
standard library at import time; pytest is imported where a test skips.
"""
import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _bench_loader():
    # Loaded by path, not as fastnet.bench: the multiprocessing rows must
    # still run when the fastnet package itself fails to import.
    path = os.path.join(ROOT, "fastnet", "bench", "_load.py")
    spec = importlib.util.spec_from_file_location("_fastnet_bench_load", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.load


load = _bench_loader()
runner, common, stream, handshake, rpc = (load(name) for name in ("runner", "common", "stream", "handshake", "rpc"))


def connection_module(impl):
    """multiprocessing.connection or fastnet; skips when fastnet is unusable."""
    import pytest
    if impl == "multiprocessing":
        import multiprocessing.connection as mpc
        return mpc
    try:
        import fastnet
    except Exception as exc:
        pytest.skip(f"import fastnet failed: {type(exc).__name__}: {exc}")
    for name in ("Listener", "Client"):
        if not hasattr(fastnet, name):
            pytest.skip(f"fastnet.{name} is missing")
    return fastnet


def require(conn, *names):
    """Skip the benchmark when ``conn`` lacks a method it needs."""
    import pytest
    for name in names:
        if not hasattr(conn, name):
            pytest.skip(f"{type(conn).__name__}.{name} is missing")


def record_rate(benchmark, amount, key):
    """Put ``amount`` per second at the median time into extra_info."""
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median:
        benchmark.extra_info[key] = amount / stats.stats.median
