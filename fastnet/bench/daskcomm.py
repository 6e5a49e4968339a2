"""The dask cases: Dask distributed's comms, ``fastnet://`` against its own ``tcp://``.

* ``dask-rtt``     a small dict written and read back through ``comm.write`` /
  ``comm.read`` between two processes, µs per round trip.
* ``dask-array``   a float64 array (``bulk_mib``, 256 MiB in the full profile)
  from one comm to another across processes, GB/s; the receiver checks it.
* ``dask-cluster`` wall time of a ``LocalCluster(processes=True)`` job with
  two single-threaded workers that moves arrays between them (``(x + x.T)``
  summed over a 4096 x 4096 float64 array in 512 x 512 chunks), seconds.

Rows: ``tcp`` (distributed's TCP comm, the anchor) and ``fastnet``
(compiled kernels).  Run only where distributed is installed; the
shared-memory path for two ends on one host is not part of these rows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from .common import Impl, NotAvailable, _numpy, _samples, _us_per_op

_SMALL = {"op": "ping", "key": "x-1234", "n": 12345, "who": "worker-a", "nbytes": 1.5}


def _distributed(spec: dict[str, Any]) -> Any:
    try:
        import distributed.comm as dcomm
        from distributed.comm.registry import backends, get_backend
    except ImportError:
        raise NotAvailable("distributed is not installed")
    scheme = spec["impl"]
    if scheme != "tcp":
        try:
            get_backend(scheme)
        except ValueError:
            # fastnet run from a tree where its entry point is not installed
            from fastnet.dask import FastnetBackend
            backends[scheme] = FastnetBackend()
    return dcomm


def _comm_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    dcomm = _distributed(spec)
    np = _numpy() if spec["case"] == "dask-array" else None

    async def main() -> None:
        done = asyncio.Event()

        async def handler(comm: Any) -> None:
            try:
                while True:
                    msg = await comm.read()
                    if msg.get("op") == "stop":
                        done.set()
                        return
                    if np is not None:
                        a = msg["x"]
                        n = spec["nbytes"] // 8
                        if a.size != n or a[-1] != n - 1 or a[n // 2] != n // 2:
                            raise ValueError("dask-array: array content differs")
                        await comm.write({"op": "ack"})
                    else:
                        await comm.write(msg)
            except dcomm.CommClosedError:
                pass
            finally:
                await comm.close()

        listener = await dcomm.listen(f"{spec['impl']}://127.0.0.1", handler)
        ready(listener.contact_address)
        await done.wait()
        listener.stop()

    asyncio.run(main())


def _comm_client(spec: dict[str, Any], address: Any) -> Any:
    dcomm = _distributed(spec)
    from distributed.protocol.serialize import to_serialize
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)     # tornado, under distributed's tcp://, looks the loop up
    comm = loop.run_until_complete(dcomm.connect(address))
    if spec["case"] == "dask-array":
        np = _numpy()
        arr = np.arange(spec["nbytes"] // 8, dtype=np.float64)

        async def go(k: int) -> float:
            t0 = time.perf_counter()
            for _ in range(k):
                await comm.write({"op": "put", "x": to_serialize(arr)})
                if (await comm.read())["op"] != "ack":
                    raise ValueError("dask-array: no ack")
            return time.perf_counter() - t0

        def step(k: int) -> float:
            return loop.run_until_complete(go(k))

        spec = dict(spec, warmup=0.0, sample=0.0)
        out = _samples(step, spec, spec.get("bulk_warmup", 1), 2, lambda t, n: spec["nbytes"] * n / t / 1e9)
    else:
        async def go(k: int) -> float:
            t0 = time.perf_counter()
            for _ in range(k):
                await comm.write(_SMALL)
                if await comm.read() != _SMALL:
                    raise ValueError("dask-rtt: echo differs")
            return time.perf_counter() - t0

        def step(k: int) -> float:
            return loop.run_until_complete(go(k))

        out = _samples(step, spec, 16, 200, _us_per_op)
    loop.run_until_complete(comm.write({"op": "stop"}))
    loop.run_until_complete(comm.close())
    loop.close()
    return out


def _cluster_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    # the cluster is the client's; this child only keeps the runner's pair shape
    ready(None)


def _cluster_client(spec: dict[str, Any], address: Any) -> Any:
    _distributed(spec)
    import dask.array as da
    from distributed import Client, LocalCluster

    side = 4096 if spec["nbytes"] >= 128 << 20 else 2048
    x = da.random.RandomState(0).random_sample((side, side), chunks=(side // 8, side // 8))
    y = (x + x.T).sum()
    with LocalCluster(protocol=spec["impl"], n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=40) as cluster, Client(cluster) as client:
        y.compute()                       # warm up: imports and first connections
        samples = []
        for _ in range(max(2, min(spec["repeat"], 3))):
            t0 = time.perf_counter()
            y.compute()
            samples.append(time.perf_counter() - t0)
        moved = sum(client.run(lambda dask_worker: dask_worker.transfer_outgoing_count_total).values())
    return {"samples": samples, "info": {"side": side, "transfers": moved}}


ROLES: dict[tuple[str, str], Any] = {
    **{(case, impl): (_comm_server, _comm_client) for case in ("dask-rtt", "dask-array")
       for impl in ("tcp", "fastnet")},
    ("dask-cluster", "tcp"): (_cluster_server, _cluster_client),
    ("dask-cluster", "fastnet"): (_cluster_server, _cluster_client),
}


def _impls() -> list[Impl]:
    return [Impl("tcp", "distributed tcp://", anchor=True), Impl("fastnet", "fastnet://", pure=False)]


CASES: dict[str, dict[str, Any]] = {
    "dask-rtt": {
        "title": "dask-rtt: small dict round trip through comm.write/comm.read",
        "unit": "µs", "json_unit": "us", "better": "lower", "impls": _impls(), "families": ("tcp",),
    },
    "dask-array": {
        "title": "dask-array: float64 array between Dask comms across processes",
        "unit": "GB/s", "json_unit": "GB/s", "better": "higher", "impls": _impls(), "families": ("tcp",),
    },
    "dask-cluster": {
        "title": "dask-cluster: LocalCluster (2 worker processes) job moving arrays, wall time",
        "unit": "s", "json_unit": "s", "better": "lower", "impls": _impls(), "families": ("tcp",),
    },
}

TARGETS: list[tuple[Any, ...]] = [
    ("dask-rtt", None, "fastnet:// <= 0.5x tcp:// (time ratio)", ("ratio", "fastnet", "tcp", "<=", 0.5)),
    ("dask-array", None, "fastnet:// >= 1.1x tcp:// over the socket", ("ratio", "fastnet", "tcp", ">=", 1.1)),
    ("dask-cluster", None, "fastnet:// <= 0.8x tcp:// wall time", ("ratio", "fastnet", "tcp", "<=", 0.8)),
]
