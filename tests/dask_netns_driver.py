"""The client of the multi-host Dask test: runs the job on a scheduler found through its file; prints JSON.

    python dask_netns_driver.py SCHEDULER_FILE [CA CERT KEY] [--signal]

With ``--signal`` it prints ``TRANSFERRING`` once the workers have started
moving chunks, then waits (at most 180 s) for the result or Dask's error.
"""
import json
import sys
import time

import dask.array as da
from distributed import Client
from distributed.security import Security


def main(argv):
    sched_file, rest = argv[0], argv[1:]
    signal = "--signal" in rest
    rest = [a for a in rest if a != "--signal"]
    security = None
    if rest:
        ca, cert, key = rest
        security = Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, require_encryption=True)
    out = {}
    with Client(scheduler_file=sched_file, security=security, timeout=60) as client:
        client.wait_for_workers(2, timeout=60)
        workers = client.scheduler_info()["workers"]
        out["scheduler"] = client.scheduler.address
        out["workers"] = sorted(workers)
        x = da.random.RandomState(0).random_sample((2000, 2000), chunks=(250, 250))
        y = (x @ x.T + x.T).sum(axis=0)[:50]
        fut = client.compute(y)
        if signal:
            deadline = time.time() + 60
            while time.time() < deadline and not fut.done():
                moved = client.run(lambda dask_worker: dask_worker.transfer_outgoing_count_total)
                if sum(moved.values()) > 2:
                    break
                time.sleep(0.02)
            out["done_at_signal"] = fut.done()
            print("TRANSFERRING", flush=True)
        try:
            out["result"] = [float(v) for v in fut.result(timeout=180)]
        except Exception as exc:          # Dask's own error is an acceptable outcome of a cut link
            out["error"] = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"[:300]
        try:
            out["transfers"] = sum(client.run(lambda dask_worker: dask_worker.transfer_outgoing_count_total,
                                              on_error="ignore").values())
        except Exception:
            out["transfers"] = None
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
