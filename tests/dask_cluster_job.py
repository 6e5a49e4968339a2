"""A dask.array job on LocalCluster(processes=True) over a given protocol; prints a JSON report.

    python dask_cluster_job.py PROTOCOL [kill]

The job (a matrix product with a transpose, on 64 chunks) moves chunks
between the two worker processes. With ``kill``, one worker is SIGKILLed
once transfers are under way and the job must still finish. The cluster is
started twice in the process, the first time to warm up, so the descriptor
count of the second run shows what a cluster leaves behind.
"""
import asyncio
import gc
import json
import os
import signal
import sys
import time

import dask.array as da
import fastnet
from distributed import Client, LocalCluster
from distributed.comm.core import Comm
from distributed.security import Security


def fds():
    return len(os.listdir("/proc/self/fd"))


def comm_families():
    """The socket families of this process's open fastnet comms (the workers keep theirs pooled)."""
    socks = [c._conn.get_extra_info("socket") for c in list(Comm._instances)
             if not c.closed() and getattr(c, "_conn", None) is not None]
    return {s.family.name for s in socks if s is not None}


def main(protocol, kill):
    run(protocol, False)      # warm up: what distributed creates once per process is not a leak
    return run(protocol, kill)


def run(protocol, kill):
    x = da.random.RandomState(0).random_sample((2000, 2000), chunks=(250, 250))
    y = (x @ x.T + x.T).sum(axis=0)[:50]
    out = {"fastnet": fastnet.__file__, "backend": fastnet.backend}
    fd0 = fds()
    tls = {"security": Security.temporary()} if protocol.endswith("tls") else {}
    with LocalCluster(protocol=protocol, n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=40, **tls) as cluster, \
            Client(cluster, **tls) as client:
        out["scheduler"] = cluster.scheduler_address
        out["worker_addresses"] = sorted(client.scheduler_info()["workers"])

        async def loopmod():
            return type(asyncio.get_running_loop()).__module__
        out["loops"] = sorted(set(client.run(loopmod).values()))
        if kill:
            pids = client.run(os.getpid)
            fut = client.compute(y)
            # wait until workers have started moving data, then kill one
            deadline = time.time() + 60
            while time.time() < deadline:
                counts = client.run(lambda dask_worker: dask_worker.transfer_outgoing_count_total)
                if sum(counts.values()) > 3:
                    break
                time.sleep(0.02)
            victim = sorted(pids)[0]
            out["done_at_kill"] = fut.done()
            os.kill(pids[victim], signal.SIGKILL)
            out["killed"] = victim
            result = fut.result(timeout=240)
        else:
            result = y.compute()
        out["transfers"] = sum(client.run(lambda dask_worker: dask_worker.transfer_outgoing_count_total).values())
        out["families"] = sorted(set().union(*client.run(comm_families).values()))
        out["result"] = [float(v) for v in result]
    gc.collect()
    out["open_comms"] = [repr(c) for c in Comm._instances if not c.closed()]
    time.sleep(0.5)
    out["fd_delta"] = fds() - fd0
    return out

if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "kill")))
