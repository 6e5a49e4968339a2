"""Helpers shared by the bench/ suites and scripts: fastnet bench's modules and client-side bits.

The scripts (and their child processes) import it too, so it needs only the
standard library at import time; pytest is imported where a test skips.
"""
import importlib.util
import os
import time

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


def child_env(pure=None):
    """The environment of a benchmark child: this checkout's fastnet first on the
    path; ``pure`` True or False sets or clears FASTNET_PURE (None: inherited)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if pure:
        env["FASTNET_PURE"] = "1"
    elif pure is not None:
        env.pop("FASTNET_PURE", None)
    return env


def new_loop():
    """A new event loop, uvloop's when it is installed: ``(loop, "uvloop" or "asyncio")``."""
    import asyncio
    try:
        import uvloop
        return uvloop.new_event_loop(), "uvloop"
    except ImportError:
        return asyncio.new_event_loop(), "asyncio"


async def closed_loop(protocol, port, nconns, batch, warmup, duration, count, cpu):
    """Drive ``nconns`` connections of ``protocol`` to 127.0.0.1:``port`` in closed loop.

    Connects ``batch`` at a time, calls each protocol's ``start()``, waits
    ``warmup`` seconds, then measures ``duration`` seconds. ``count[0]`` is
    the replies the protocols have counted, ``cpu()`` the server's CPU so
    far. Returns ``(replies, seconds, cpu() before, cpu() after)`` and
    closes the connections (each protocol's transport is ``p.t``).
    """
    import asyncio
    loop = asyncio.get_running_loop()
    conns = []
    for i in range(0, nconns, batch):
        res = await asyncio.gather(*[loop.create_connection(protocol, "127.0.0.1", port)
                                     for _ in range(min(batch, nconns - i))])
        conns.extend(p for _, p in res)
    for p in conns:
        p.start()
    await asyncio.sleep(warmup)
    c0, t0, s0 = count[0], time.monotonic(), cpu()
    await asyncio.sleep(duration)
    c1, t1, s1 = count[0], time.monotonic(), cpu()
    for p in conns:
        p.t.close()
    await asyncio.sleep(0.05)
    return c1 - c0, t1 - t0, s0, s1


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
