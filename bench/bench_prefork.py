#!/usr/bin/env python3
"""Prefork scaling: an RPC-style echo on fastnet.server with 1 worker process vs 2.

The server is ``TCPServer(..., concurrency="prefork", workers=W)`` with a
MessageHandler that does some CPU work per request (``--rounds`` chained
SHA-256 hashes over the 4 KiB request) and replies with the 32-byte digest.
One load process (uvloop if installed, else asyncio) keeps ``--conns``
connections in closed-loop request/reply. Reported per worker count, as
medians over repeats: requests per second, mean latency, CPU per request of
the whole server (acceptor and workers, from /proc), and the scaling ratio
against one worker. The load process shares the machine's cores with the
workers, so on a 2-core machine the ideal ratio is below 2.

    python3 bench/bench_prefork.py                       # 1 and 2 workers, 64 connections
    python3 bench/bench_prefork.py --workers 1,2,4 --conns 256 --rounds 64 --repeats 5
"""
import argparse
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import benchutil  # noqa: E402  (the client side shared by the bench/ scripts)
CLK_TCK = os.sysconf("SC_CLK_TCK")
REQUEST = 4096


def work(data, rounds):
    """The per-request CPU work: chained SHA-256 over the request."""
    h = b""
    for _ in range(rounds):
        h = hashlib.sha256(data + h).digest()
    return h


# -- server (child process) ---------------------------------------------------------

def serve(workers, rounds):
    sys.path.insert(0, ROOT)
    from fastnet.server import MessageHandler, TCPServer

    class Hash(MessageHandler):
        def message_received(self, data):
            self.reply(work(data, rounds))

    srv = TCPServer(("127.0.0.1", 0), Hash, concurrency="prefork", workers=workers,
                    max_connections=10000)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    srv.start()
    # the port and every pid whose CPU counts: the acceptor and the workers
    print(json.dumps({"port": srv.address[1], "pids": [os.getpid()] + srv.worker_pids}), flush=True)
    stop.wait()
    srv.shutdown()


# -- load (child process) ---------------------------------------------------------

def _cpu_seconds(pids):
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def load(port, pids, nconns, warmup, duration, rounds):
    """Keep nconns connections in request/reply; print one JSON line of results."""
    import asyncio
    loop, driver = benchutil.new_loop()
    asyncio.set_event_loop(loop)
    payload = os.urandom(REQUEST)
    request = len(payload).to_bytes(4, "big") + payload
    expected = work(payload, rounds)
    reply = len(expected).to_bytes(4, "big") + expected
    rlen = len(reply)
    count = [0]
    errors = [0]

    class Client(asyncio.Protocol):
        def connection_made(self, t):
            self.t = t
            self.buf = b""
            self.checked = False

        def start(self):
            self.t.write(request)

        def data_received(self, data):
            if self.buf:
                data = self.buf + data
            while len(data) >= rlen:
                if not self.checked:          # check each connection's first reply fully
                    self.checked = True
                    if data[:rlen] != reply:
                        errors[0] += 1
                elif data[:4] != reply[:4]:
                    errors[0] += 1
                count[0] += 1
                data = data[rlen:]
                self.t.write(request)
            self.buf = data

        def connection_lost(self, exc):
            if exc is not None:
                errors[0] += 1

    async def main():
        n, seconds, s0, s1 = await benchutil.closed_loop(Client, port, nconns, 200, warmup, duration, count,
                                                         lambda: _cpu_seconds(pids))
        return {"requests": n, "seconds": seconds, "server_cpu": s1 - s0,
                "errors": errors[0], "driver": driver}

    print(json.dumps(loop.run_until_complete(main())), flush=True)
    loop.close()


# -- orchestration ----------------------------------------------------------------------

def measure(workers, conns, rounds, warmup, duration):
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", str(workers), str(rounds)],
                         stdout=subprocess.PIPE, env=benchutil.child_env(), text=True)
    try:
        info = json.loads(p.stdout.readline())
        cmd = [sys.executable, os.path.abspath(__file__), "--load", str(info["port"]),
               ",".join(map(str, info["pids"])), str(conns), str(warmup), str(duration), str(rounds)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=benchutil.child_env(),
                             timeout=120 + warmup + duration)
        if out.returncode != 0:
            raise RuntimeError(f"load process failed: {out.stderr.strip()[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(workers=(1, 2), conns=64, rounds=32, repeats=3, warmup=1.0, duration=3.0):
    """One row per worker count: medians over ``repeats`` runs."""
    rows = []
    for w in workers:
        samples = [measure(w, conns, rounds, warmup, duration) for _ in range(repeats)]
        rps = [s["requests"] / s["seconds"] for s in samples]
        cpu = [s["server_cpu"] / s["requests"] * 1e6 for s in samples if s["requests"]]
        rows.append({
            "workers": w, "conns": conns, "rounds": rounds,
            "req_per_s": statistics.median(rps),
            "latency_ms": conns / statistics.median(rps) * 1e3,
            "server_cpu_us": statistics.median(cpu) if cpu else float("nan"),
            "errors": sum(s["errors"] for s in samples),
            "driver": samples[0]["driver"],
        })
    base = rows[0]["req_per_s"]
    for r in rows:
        r["scaling"] = r["req_per_s"] / base
    return rows


def format_table(rows, work_us):
    lines = [
        f"prefork RPC echo: {REQUEST}-byte requests, {rows[0]['rounds']} chained SHA-256 per request "
        f"(~{work_us:.0f} us of work), {rows[0]['conns']} connections, load on {rows[0]['driver']}, "
        f"{os.cpu_count()} CPUs",
        f"{'workers':>7}  {'req/s':>9}  {'latency ms':>10}  {'server CPU us/req':>17}  {'scaling':>7}  {'errors':>6}",
    ]
    for r in rows:
        lines.append(f"{r['workers']:>7}  {r['req_per_s']:>9.0f}  {r['latency_ms']:>10.2f}  "
                     f"{r['server_cpu_us']:>17.1f}  {r['scaling']:>6.2f}x  {r['errors']:>6}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--load", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument("--workers", default="1,2", help="worker counts to compare (first is the base)")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=32, help="SHA-256 rounds per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = ap.parse_args(argv)
    if args.serve:
        serve(int(args.serve[0]), int(args.serve[1]))
        return
    if args.load:
        port, pids, conns, warmup, duration, rounds = args.load
        load(int(port), [int(p) for p in pids.split(",")], int(conns), float(warmup), float(duration),
             int(rounds))
        return
    payload = os.urandom(REQUEST)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        work(payload, args.rounds)
    work_us = (time.perf_counter() - t0) / n * 1e6
    rows = run([int(w) for w in args.workers.split(",")], args.conns, args.rounds, args.repeats,
               args.warmup, args.duration)
    print(format_table(rows, work_us))
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
