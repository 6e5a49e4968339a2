"""The cost of TLS on fastnet connections: pingpong and bulk, TLS beside plain TCP.

Run: ``python3 bench/bench_tls.py``. A throwaway certificate is made with the
``openssl`` command; server and client are two processes on loopback. Each
row is the median of ``--repeat`` samples; both rows of a case come from the
same run.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import fastnet
from fastnet import tls


def make_cert(d):
    key, crt = os.path.join(d, "k.pem"), os.path.join(d, "c.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", crt,
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-days", "1"], check=True, capture_output=True)
    return key, crt


def serve(listener, nbytes):
    with listener.accept() as c:
        out = np.empty(nbytes // 8)
        while True:
            try:
                m = c.recv_bytes()
            except EOFError:
                return
            if m == b"BULK":
                c.recv_array(out=out)
                c.send_bytes(b"ok")
            else:
                c.send_bytes(m)


def run(use_tls, args, d):
    key, crt = make_cert(d)
    sctx = tls.server_context(crt, key) if use_tls else None
    cctx = tls.client_context(cafile=crt) if use_tls else None
    nbytes = args.bulk_mib << 20
    listener = fastnet.Listener(("127.0.0.1", 0), ssl_context=sctx)
    pid = os.fork()
    if pid == 0:
        try:
            serve(listener, nbytes)
        finally:
            os._exit(0)
    listener.close()
    conn = fastnet.Client(listener.address, ssl_context=cctx, timeout=30)
    msg = b"x" * 64
    rtt, gbs = [], []
    for _ in range(200):
        conn.send_bytes(msg)
        conn.recv_bytes()
    for _ in range(args.repeat):
        t = time.perf_counter()
        for _ in range(args.n):
            conn.send_bytes(msg)
            conn.recv_bytes()
        rtt.append((time.perf_counter() - t) / args.n * 1e6)
    arr = np.random.rand(nbytes // 8)
    for _ in range(args.repeat + 1):
        t = time.perf_counter()
        conn.send_bytes(b"BULK")
        conn.send_array(arr)
        conn.recv_bytes()
        gbs.append(nbytes / (time.perf_counter() - t) / 1e9)
    conn.close()
    os.waitpid(pid, 0)
    return statistics.median(rtt), statistics.median(gbs[1:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000, help="round trips per sample")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--bulk-mib", type=int, default=64)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        plain = run(False, args, d)
        secure = run(True, args, d)
    print(f"TLS cost on fastnet connections (kernels: {fastnet.backend}; TLS connections use the "
          f"pure-Python TLS channel); medians of {args.repeat} samples")
    print(f"{'':22s}{'plain TCP':>12s}{'TLS':>12s}{'TLS/plain':>11s}")
    print(f"{'pingpong 64 B (µs)':22s}{plain[0]:12.1f}{secure[0]:12.1f}{secure[0] / plain[0]:10.2f}x")
    print(f"{f'bulk {args.bulk_mib} MiB (GB/s)':22s}{plain[1]:12.2f}{secure[1]:12.2f}"
          f"{secure[1] / plain[1]:10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
