"""The dask cases: Dask distributed's comms, ``fastnet://`` against its own ``tcp://``.

* ``dask-rtt``     a small dict written and read back through ``comm.write`` /
  ``comm.read`` between two processes, µs per round trip.
* ``dask-array``   a float64 array (``bulk_mib``, 256 MiB in the full profile)
  from one comm to another across processes, GB/s; the receiver checks it.
* ``dask-cluster`` wall time of a ``LocalCluster(processes=True)`` job with
  two single-threaded workers in which moving data dominates: a fresh float64
  array (2 GiB in the full profile, 128 MiB with ``--quick``) in 8 x 8 chunks,
  its top half persisted on one worker and its bottom half on the other
  before the clock starts, then each chunk added to the chunk half the
  array's rows away and the result summed: every one of the 64 additions
  needs a chunk from the other worker (the whole array crosses once), and a
  contiguous add and sum cost far less than moving a chunk; seconds.

Rows: ``tcp`` (distributed's TCP comm, the anchor), ``fastnet`` (compiled
kernels, every comm over TCP: ``distributed.comm.fastnet.same-host`` off),
``fastnet-host`` (the same-host path: both ends on this host talk over an
abstract AF_UNIX socket, every byte through it:
``distributed.comm.fastnet.shared-memory`` off) and, in the cases that move
arrays, ``fastnet-shm``, labelled "fastnet:// shared memory" (the same-host
path with large frames passed as shared-memory segments, the default). Run only where distributed is installed.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from .bulk import _bulk_socket_client, _bulk_socket_server
from .common import Impl, NotAvailable, _numpy, _samples, _us_per_op

_SMALL = {"op": "ping", "key": "x-1234", "n": 12345, "who": "worker-a", "nbytes": 1.5}


def _scheme(spec: dict[str, Any]) -> str:
    return "tcp" if spec["impl"] == "tcp" else "fastnet"


def _distributed(spec: dict[str, Any]) -> Any:
    try:
        import dask
        import distributed.comm as dcomm
        from distributed.comm.registry import backends, get_backend
    except ImportError:
        raise NotAvailable("distributed is not installed")
    scheme = _scheme(spec)
    if scheme != "tcp":
        # the row's path, in this process and (through the environment) in the cluster's workers
        same_host = spec["impl"] in ("fastnet-host", "fastnet-shm")
        segments = spec["impl"] == "fastnet-shm"
        os.environ["DASK_DISTRIBUTED__COMM__FASTNET__SAME_HOST"] = str(same_host)
        os.environ["DASK_DISTRIBUTED__COMM__FASTNET__SHARED_MEMORY"] = str(segments)
        dask.config.set({"distributed.comm.fastnet.same-host": same_host,
                         "distributed.comm.fastnet.shared-memory": segments})
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

        listener = await dcomm.listen(f"{_scheme(spec)}://127.0.0.1", handler)
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
    from distributed import Client, LocalCluster, wait

    side = 16384 if spec["nbytes"] >= 128 << 20 else 4096      # 2 GiB or 128 MiB of float64
    chunk = side // 8
    with LocalCluster(protocol=_scheme(spec), n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=40) as cluster, Client(cluster) as client:

        def moved() -> tuple[int, int]:
            got = client.run(lambda dask_worker: (dask_worker.transfer_outgoing_count_total,
                                                  dask_worker.transfer_outgoing_bytes_total)).values()
            return sum(c for c, _ in got), sum(b for _, b in got)

        def once(k: int) -> tuple[float, int, int]:
            # a fresh array each time, its halves on different workers before the clock
            # starts (no replica is left from a previous run); slicing at chunk
            # boundaries and concatenating only rename chunks
            x = da.ones((side, side), chunks=chunk) * float(k)
            top = client.persist(x[:side // 2], workers=[workers[0]])
            bottom = client.persist(x[side // 2:], workers=[workers[1]])
            wait([top, bottom])
            x, rolled = da.concatenate([top, bottom], axis=0), da.concatenate([bottom, top], axis=0)
            n0, b0 = moved()
            t0 = time.perf_counter()
            got = (x + rolled).sum().compute()
            t = time.perf_counter() - t0
            if got != 2.0 * k * side * side:
                raise ValueError("dask-cluster: wrong result")
            n1, b1 = moved()
            del x, rolled, top, bottom
            return t, n1 - n0, b1 - b0

        workers = sorted(client.scheduler_info()["workers"])
        once(1)                               # warm up: imports and first connections
        runs = [once(k) for k in range(2, 2 + max(2, min(spec["repeat"], 3)))]
    return {"samples": [t for t, _, _ in runs],
            "info": {"side": side, "chunk": chunk, "transfers": sum(n for _, n, _ in runs) // len(runs),
                     "moved_mib": round(sum(b for _, _, b in runs) / len(runs) / 2**20, 1)}}


ROLES: dict[tuple[str, str], Any] = {
    **{(case, impl): (_comm_server, _comm_client) for case in ("dask-rtt", "dask-array")
       for impl in ("tcp", "fastnet", "fastnet-host", "fastnet-shm")},
    # the plain socket's limit for the same bytes: a preallocated buffer, no Dask
    ("dask-array", "socket"): (_bulk_socket_server, _bulk_socket_client),
    **{("dask-cluster", impl): (_cluster_server, _cluster_client)
       for impl in ("tcp", "fastnet", "fastnet-host", "fastnet-shm")},
}


def _impls(shm: bool = False) -> list[Impl]:
    # where frames may go as segments, the same-host row through the socket says so
    impls = [Impl("tcp", "distributed tcp://", anchor=True), Impl("fastnet", "fastnet:// over TCP", pure=False),
             Impl("fastnet-host", "fastnet:// same host, socket" if shm else "fastnet:// same host", pure=False)]
    if shm:
        impls.append(Impl("fastnet-shm", "fastnet:// shared memory", pure=False))
    return impls


CASES: dict[str, dict[str, Any]] = {
    "dask-rtt": {
        "title": "dask-rtt: small dict round trip through comm.write/comm.read",
        "unit": "µs", "json_unit": "us", "better": "lower", "impls": _impls(), "families": ("tcp",),
    },
    "dask-array": {
        "title": "dask-array: float64 array between Dask comms across processes",
        "unit": "GB/s", "json_unit": "GB/s", "better": "higher", "families": ("tcp",),
        "impls": [*_impls(shm=True), Impl("socket", "plain socket sendall/recv_into, no Dask (the limit)")],
    },
    "dask-cluster": {
        "title": "dask-cluster: LocalCluster (2 worker processes) job moving arrays, wall time",
        "unit": "s", "json_unit": "s", "better": "lower", "impls": _impls(shm=True), "families": ("tcp",),
    },
}

TARGETS: list[tuple[Any, ...]] = [
    ("dask-rtt", None, "fastnet:// <= 0.5x tcp:// (time ratio)", ("ratio", "fastnet", "tcp", "<=", 0.5)),
    ("dask-array", None, "fastnet:// >= 1.1x tcp:// over the socket", ("ratio", "fastnet", "tcp", ">=", 1.1)),
    ("dask-array", None, "fastnet:// >= 2x tcp:// on one host", ("ratio", "fastnet-shm", "tcp", ">=", 2.0)),
    ("dask-cluster", None, "fastnet:// <= 0.8x tcp:// wall time", ("ratio", "fastnet", "tcp", "<=", 0.8)),
    ("dask-cluster", None, "fastnet:// same host <= 0.8x tcp:// wall time",
     ("ratio", "fastnet-shm", "tcp", "<=", 0.8)),
    ("dask-array", None, "same host through the socket", ("report", "fastnet-host", "tcp")),
    ("dask-array", None, "tcp:// against the plain TCP socket", ("report", "tcp", "socket")),
    ("dask-cluster", None, "same host through the socket", ("report", "fastnet-host", "tcp")),
]
