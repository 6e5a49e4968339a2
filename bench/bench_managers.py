#!/usr/bin/env python3
"""multiprocessing.managers on fastnet: the migration recipe, measured.

A manager server (a forked process) holds a counter; the client measures
proxy method calls (one connection per thread, reused) and new proxies
(each opens connections, authenticates, creates the referent and drops it)
with the stdlib's Listener/Client and with fastnet's put in place by::

    managers.listener_client["pickle"] = (fastnet.Listener, fastnet.Client)

Rounds alternate stdlib and fastnet so drifting background load hits both
alike; the table gives medians and the ratio fastnet / stdlib.

    python3 bench/bench_managers.py                  # TCP and AF_UNIX
    python3 bench/bench_managers.py --rounds 9 --json out.json

``run()`` does the same for callers in Python.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from multiprocessing import connection as _mpc
from multiprocessing import managers
from typing import Any

import fastnet


class Counter:
    """The managed object: one method call is one request/reply."""

    def __init__(self) -> None:
        self.n = 0

    def incr(self, k: int = 1) -> int:
        self.n += k
        return self.n


class _Manager(managers.BaseManager):
    pass


_Manager.register("Counter", Counter)

IMPLS = {"stdlib": (_mpc.Listener, _mpc.Client), "fastnet": (fastnet.Listener, fastnet.Client)}
FAMILIES = {"TCP": ("127.0.0.1", 0), "AF_UNIX": None}


def _round(impl: str, address: Any, calls: int, proxies: int) -> tuple[float, float]:
    saved = managers.listener_client["pickle"]
    managers.listener_client["pickle"] = IMPLS[impl]
    try:
        m = _Manager(address=address, authkey=b"bench")
        m.start()       # forks: the server process inherits the patched table
        try:
            c = m.Counter()
            c.incr()    # the thread's connection is open before timing starts
            t = time.perf_counter()
            for _ in range(calls):
                c.incr()
            call_rate = calls / (time.perf_counter() - t)
            if c.incr(0) != calls + 1:
                raise AssertionError("the counter lost calls")
            t = time.perf_counter()
            for _ in range(proxies):
                m.Counter()
            proxy_rate = proxies / (time.perf_counter() - t)
            return call_rate, proxy_rate
        finally:
            m.shutdown()
    finally:
        managers.listener_client["pickle"] = saved


def run(rounds: int = 5, calls: int = 2000, proxies: int = 50) -> dict[str, Any]:
    """Medians per family and implementation: {family: {impl: {"calls": .., "proxies": ..}}}."""
    out: dict[str, Any] = {}
    for fam, address in FAMILIES.items():
        samples: dict[str, dict[str, list[float]]] = {i: {"calls": [], "proxies": []} for i in IMPLS}
        for _ in range(rounds):
            for impl in IMPLS:
                c, p = _round(impl, address, calls, proxies)
                samples[impl]["calls"].append(c)
                samples[impl]["proxies"].append(p)
        out[fam] = {impl: {k: statistics.median(v) for k, v in s.items()} for impl, s in samples.items()}
    return out


def format_table(res: dict[str, Any]) -> str:
    lines = [f"{'':8} {'':24} {'stdlib':>10} {'fastnet':>10} {'ratio':>7}"]
    for fam, r in res.items():
        for key, label in (("calls", "proxy calls/s"), ("proxies", "new proxies/s")):
            s, f = r["stdlib"][key], r["fastnet"][key]
            lines.append(f"{fam:8} {label:24} {s:10.0f} {f:10.0f} {f / s:6.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--proxies", type=int, default=50)
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args(argv)
    res = run(a.rounds, a.calls, a.proxies)
    print(format_table(res))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
