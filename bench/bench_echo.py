#!/usr/bin/env python3
"""Echo-server benchmark: fastnet's EventLoop against uvloop, asyncio and selectors.

Each server runs in its own process (pinned to the last CPU, the load to the
first; FASTNET_BENCH_PIN=0 lets them float) and echoes 64-byte framed messages
(multiprocessing.connection's 4-byte length prefix); every server hands whole
messages to a Python-level handler that sends a framed reply, so they do the
same work. One load process (uvloop if installed, else asyncio) keeps N
connections in ping-pong. Reported per server and connection count: server CPU
time per round trip (user+system from /proc/<pid>/stat over the measured
window) and round trips per second, as medians over repeats, with ratios to
uvloop (or asyncio when uvloop is missing).

    python3 bench/bench_echo.py                      # the full table
    python3 bench/bench_echo.py --conns 100 --servers fastnet,uvloop --repeats 5

``run()`` and ``format_table()`` are the same thing for callers in Python.
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchutil  # noqa: E402  (fastnet bench's modules by path, and the shared client side)

PAYLOAD = 64
SERVERS = ("fastnet", "fastnet-pure", "uvloop", "asyncio", "selectors")
DEFAULT_CONNS = (100, 1000)
BIG_CONNS = 10000
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _have(mod):
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


# -- servers (child processes) ---------------------------------------------------
# The servers are fastnet bench's echo servers (fastnet/bench/echo.py), run in
# their persistent mode: one server per kind serves every round until SIGTERM.
# The module is loaded by path, as fastnet bench's children load it, so the
# uvloop, asyncio and selectors servers run without importing fastnet.

SERVER_IMPL = {"fastnet": "fastnet", "fastnet-pure": "fastnet", "uvloop": "uvloop",
               "asyncio": "asyncio", "selectors": "selectors"}


echo_case = benchutil.load("echo")
_raise_nofile = echo_case._raise_nofile

def _pin(which):
    """Server on the last CPU, load on the first: no core sharing between them."""
    if os.environ.get("FASTNET_BENCH_PIN", "1") == "0":
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        os.sched_setaffinity(0, {cpus[-1] if which == "server" else cpus[0]})


def _serve(kind):
    if kind not in SERVER_IMPL:
        raise SystemExit(f"unknown server {kind!r}")
    _pin("server")
    server, _client = echo_case.ROLES[("echo", SERVER_IMPL[kind])]
    spec = {"case": "echo", "impl": SERVER_IMPL[kind], "family": "tcp",
            "conns": BIG_CONNS, "persist": True}
    server(spec, lambda info: print(info["address"][1], flush=True))


# -- load (child process) -------------------------------------------------------

def _cpu_seconds(pid):
    """(user, system) CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def _load(port, server_pid, nconns, warmup, duration):
    """Keep nconns connections in 64-byte ping-pong; print one JSON line of results."""
    import asyncio
    loop, driver = benchutil.new_loop()
    asyncio.set_event_loop(loop)
    _pin("load")
    _raise_nofile(nconns + 100)
    msg = bytes(range(PAYLOAD))
    frame = len(msg).to_bytes(4, "big") + msg
    flen = len(frame)
    count = [0]
    errors = [0]

    class Ping(asyncio.Protocol):
        __slots__ = ("t", "buf")

        def connection_made(self, t):
            self.t = t
            self.buf = b""

        def start(self):
            self.t.write(frame)

        def data_received(self, data):
            if self.buf:
                data = self.buf + data
            while len(data) >= flen:
                if data[:flen] != frame:
                    errors[0] += 1
                count[0] += 1
                data = data[flen:]
                self.t.write(frame)
            self.buf = data

        def connection_lost(self, exc):
            if exc is not None:
                errors[0] += 1

    async def main():
        n, seconds, s0, s1 = await benchutil.closed_loop(Ping, port, nconns, 500, warmup, duration, count,
                                                         lambda: _cpu_seconds(server_pid))
        user, system = s1[0] - s0[0], s1[1] - s0[1]
        return {"round_trips": n, "seconds": seconds, "server_cpu": user + system,
                "server_user": user, "server_sys": system, "errors": errors[0], "driver": driver}

    print(json.dumps(loop.run_until_complete(main())), flush=True)
    loop.close()


# -- orchestration -----------------------------------------------------------------

def start_server(kind):
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", kind],
                         stdout=subprocess.PIPE, env=benchutil.child_env(pure=kind == "fastnet-pure"), text=True)
    line = p.stdout.readline()
    if not line.strip().isdigit():
        p.kill()
        p.wait()
        raise RuntimeError(f"server {kind} did not start")
    return p, int(line)


def stop_server(p):
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    p.stdout.close()


def run_load(port, server_pid, nconns, warmup, duration):
    cmd = [sys.executable, os.path.abspath(__file__), "--load", str(port), str(server_pid),
           str(nconns), str(warmup), str(duration)]
    out = subprocess.run(cmd, capture_output=True, text=True,
                         timeout=60 + warmup + duration + nconns / 100)
    if out.returncode != 0:
        raise RuntimeError(f"load process failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def available_servers():
    out = ["fastnet", "fastnet-pure"]
    if _have("uvloop"):
        out.append("uvloop")
    out += ["asyncio", "selectors"]
    return out


def _cpu_per_rt(sample):
    return sample["server_cpu"] / max(sample["round_trips"], 1) * 1e6


def _rate(sample):
    return sample["round_trips"] / sample["seconds"]


def run(servers=None, conns=DEFAULT_CONNS, repeats=3, warmup=1.0, duration=2.0,
        big_conns=BIG_CONNS, big_servers=("fastnet", "uvloop"), log=None):
    """Measure every server at every connection count; returns a list of row dicts.

    Repeats are interleaved (every server once per round) so drift in the
    machine's load hits all servers alike.
    """
    servers = list(servers or available_servers())
    plan = [(kind, n) for n in conns for kind in servers]
    if big_conns:
        plan += [(kind, big_conns) for kind in servers if kind in big_servers]
    procs = {}
    samples = {key: [] for key in plan}
    try:
        for kind in servers:
            procs[kind] = start_server(kind)
        for rnd in range(repeats):
            for kind, n in plan:
                proc, port = procs[kind]
                r = run_load(port, proc.pid, n, warmup, duration)
                if r["errors"]:
                    raise RuntimeError(f"{kind}: {r['errors']} bad replies or lost connections")
                samples[(kind, n)].append(r)
                if log:
                    log(f"round {rnd + 1}/{repeats} {kind:13s} {n:6d} conns: "
                        f"{_cpu_per_rt(r):6.2f} us CPU/rt  "
                        f"{r['round_trips'] / r['seconds']:9.0f} rt/s")
    finally:
        for proc, _port in procs.values():
            stop_server(proc)
    anchor = "uvloop" if "uvloop" in servers else ("asyncio" if "asyncio" in servers else None)
    rows = []
    for kind in servers:
        for n in sorted({n for k, n in plan if k == kind}):
            ss = samples[(kind, n)]
            row = {
                "server": kind, "conns": n, "repeats": len(ss), "driver": ss[0]["driver"],
                "cpu_us_per_rt": statistics.median(_cpu_per_rt(x) for x in ss),
                "rt_per_s": statistics.median(_rate(x) for x in ss),
                "user_us_per_rt": statistics.median(x["server_user"] / max(x["round_trips"], 1) * 1e6
                                                    for x in ss),
                "server_busy": statistics.median(x["server_cpu"] / x["seconds"] for x in ss),
                "anchor": anchor,
            }
            base = samples.get((anchor, n)) if anchor else None
            if base:
                # paired by round: both measured back to back, so machine drift cancels
                row["cpu_ratio"] = statistics.median(_cpu_per_rt(x) / _cpu_per_rt(y) for x, y in zip(ss, base))
                row["rate_ratio"] = statistics.median(_rate(x) / _rate(y) for x, y in zip(ss, base))
            rows.append(row)
    return rows


def format_table(rows):
    """A text table; ratios to uvloop (asyncio without it) are medians of per-round pairs."""
    anchor = next((r["anchor"] for r in rows if r.get("anchor")), "uvloop")
    least = min((r["conns"] for r in rows), default=0)
    own = {r["server"]: r["cpu_us_per_rt"] for r in rows if r["conns"] == least}
    lines = [f"{'server':13s} {'conns':>6s} {'CPU us/rt':>10s} {'busy':>5s} {'rt/s':>9s} "
             f"{'CPU/' + anchor:>12s} {'rt/s/' + anchor:>12s} {'CPU/own@' + str(least):>13s}"]
    for r in rows:
        cpu = f"{r['cpu_ratio']:.2f}x" if "cpu_ratio" in r else "-"
        rate = f"{r['rate_ratio']:.2f}x" if "rate_ratio" in r else "-"
        mine = f"{r['cpu_us_per_rt'] / own[r['server']]:.2f}x" if r["server"] in own else "-"
        lines.append(f"{r['server']:13s} {r['conns']:6d} {r['cpu_us_per_rt']:10.2f} "
                     f"{r['server_busy']:5.0%} {r['rt_per_s']:9.0f} {cpu:>12s} {rate:>12s} {mine:>13s}")
    drivers = sorted({r["driver"] for r in rows})
    lines.append(f"load: one {'/'.join(drivers)} process, {PAYLOAD}-byte framed ping-pong; "
                 f"medians of {rows[0]['repeats'] if rows else 0} interleaved rounds; "
                 f"ratios are medians of same-round pairs; CPU = user + system time of the "
                 f"server process; busy = server CPU / wall time")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--load", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--servers", default=",".join(available_servers()),
                    help="comma-separated: " + ", ".join(SERVERS))
    ap.add_argument("--conns", default=",".join(map(str, DEFAULT_CONNS)))
    ap.add_argument("--big-conns", type=int, default=BIG_CONNS,
                    help="extra connection count, measured for --big-servers (0: skip)")
    ap.add_argument("--big-servers", default="fastnet,uvloop")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = ap.parse_args(argv)
    if args.serve:
        _serve(args.serve)
        return
    if args.load:
        port, pid, n, warm, dur = args.load
        _load(int(port), int(pid), int(n), float(warm), float(dur))
        return
    _raise_nofile(BIG_CONNS + 100)
    rows = run([s for s in args.servers.split(",") if s],
               [int(x) for x in args.conns.split(",") if x], args.repeats, args.warmup,
               args.duration, args.big_conns, args.big_servers.split(","), log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(rows))
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
