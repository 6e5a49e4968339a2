"""RPC benchmarks: fastnet RPCProxy calls against an RPCServer in a child process.

Sequential ``add(2, 3)`` calls (msgpack and pickle with an authkey), a batch
of 64 ``call_async`` calls in flight, and ``echo(a)`` of a float64 array
(8 MiB; FASTNET_BENCH_RPC_ARRAY_MIB sets another size) with pickle, over
TCP and AF_UNIX.  The server is the
``fastnet bench`` rpc server (``rpc_server`` in ``fastnet/bench/rpc.py``),
one child per codec and family shared by the tests; the timed code is the
client, here.  Every result is checked, no timing is.
``bench/bench_rpc.py`` compares the same calls with other RPC stacks.

    python3 -m pytest bench/test_bench_rpc.py --benchmark-json=out.json
"""
import contextlib
import os

import pytest

from benchutil import record_rate, rpc as rpc_case, runner

FAMILIES = ["tcp", "unix"]
# MiB of the echoed array; an environment variable because bench/conftest.py's
# options belong to the transport suites
ARRAY_MIB = float(os.environ.get("FASTNET_BENCH_RPC_ARRAY_MIB", "8"))


@pytest.fixture(scope="session")
def rpc_array_nbytes():
    return int(ARRAY_MIB * 2 ** 20) // 8 * 8


def _proxy_class():
    try:
        import fastnet
    except Exception as exc:
        pytest.skip(f"import fastnet failed: {type(exc).__name__}: {exc}")
    if not hasattr(fastnet, "RPCProxy"):
        pytest.skip("fastnet.RPCProxy is missing")
    return fastnet


class _Servers:
    """One rpc server child per (codec, family), shared by the module's tests."""

    def __init__(self):
        self.stack = contextlib.ExitStack()
        self.running = {}

    def get(self, fastnet, codec, family):
        k = (codec, family)
        if k not in self.running:
            key = os.urandom(32) if codec == "pickle" else None    # pickle needs an authenticated client
            impl = "fastnet" if codec == "msgpack" else f"fastnet-{codec}"
            address = self.stack.enter_context(runner.serve("rpc-seq", impl, family, authkey=key))
            # runs before serve() waits for the child: the stop notification ends
            # it (a child that cannot take it is killed by serve() after a grace)
            self.stack.callback(self.stop, fastnet, address, key, codec)
            self.running[k] = (address, key)
        return self.running[k]

    @staticmethod
    def stop(fastnet, address, key, codec):
        with contextlib.suppress(fastnet.FastnetError, OSError):
            rpc_case.rpc_stop(fastnet.RPCProxy(address, authkey=key, codec=codec, timeout=10))


@pytest.fixture(scope="module")
def servers():
    s = _Servers()
    with s.stack:
        yield s


@pytest.fixture
def rpc(benchmark, servers):
    """``rpc(codec, family)``: a proxy to the shared rpc server child speaking ``codec``."""
    fastnet = _proxy_class()
    opened = []

    def connect(codec, family):
        if codec == "msgpack":
            pytest.importorskip("msgpack")
        address, key = servers.get(fastnet, codec, family)
        benchmark.extra_info.update(backend=fastnet.backend, codec=codec)
        proxy = fastnet.RPCProxy(address, authkey=key, codec=codec, timeout=60)
        opened.append(proxy)
        return proxy

    yield connect
    for p in opened:
        p.close()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("codec", ["msgpack", "pickle"])
def test_rpc_call(benchmark, rpc, codec, family):
    benchmark.group = f"rpc {family}: sequential add(2, 3)"
    add = rpc(codec, family).add
    assert benchmark(add, 2, 3) == 5
    record_rate(benchmark, 1, "calls_per_s")


@pytest.mark.parametrize("family", FAMILIES)
def test_rpc_call_async_batch(benchmark, rpc, family):
    n = rpc_case.RPC_IN_FLIGHT
    benchmark.group = f"rpc {family}: {n} call_async in flight, then all results"
    benchmark.extra_info["calls"] = n
    submit = rpc_case.rpc_submit(rpc("msgpack", family), "fastnet-batch")

    def batch():
        return [f.result() for f in submit(n)]

    assert benchmark(batch) == [5] * n
    record_rate(benchmark, n, "calls_per_s")


@pytest.mark.parametrize("family", FAMILIES)
def test_rpc_array(benchmark, rpc, family, rpc_array_nbytes):
    np = pytest.importorskip("numpy")
    nbytes = rpc_array_nbytes
    benchmark.group = f"rpc {family}: echo(a), a {nbytes / 2 ** 20:g} MiB float64 array, pickle"
    benchmark.extra_info["bytes_both_ways"] = 2 * nbytes
    arr = np.arange(nbytes // 8, dtype=np.float64)
    echo = rpc("pickle", family).echo
    out = benchmark.pedantic(echo, (arr,), rounds=5, warmup_rounds=1)
    assert out.dtype == arr.dtype and np.array_equal(out, arr)
    record_rate(benchmark, 2 * nbytes / 1e9, "GB_per_s")
