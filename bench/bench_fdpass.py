#!/usr/bin/env python3
"""File-descriptor passing benchmark: fastnet against the stdlib's two ways.

Descriptors are passed one at a time, one message each, from a sender process
to a receiver process over a connected AF_UNIX socketpair; the receiver closes
every descriptor it gets. Both ends of a row use the same implementation:

    multiprocessing.reduction   send_handle / recv_handle
    socket.send_fds             socket.send_fds / socket.recv_fds (3.9+)
    fastnet                     fastnet.send_fd / recv_fd, compiled kernel
    fastnet-pure                the same with FASTNET_PURE=1 in both children
    Connection.send_fds         fastnet.Connection.send_fds / recv_fds (compiled)

Each row has its own two child processes, started before anything is timed.
A round of a row: the sender times ``--n`` descriptors plus the receiver's
one-byte acknowledgement that it received (and closed) them all. Rounds run
row after row, ``--repeats`` times after one warm-up round, so drifting
background load hits every row alike. The table gives the median rate with
the min..max spread, and the ratios of the medians to socket.send_fds and to
multiprocessing.reduction.

    python3 bench/bench_fdpass.py                    # the full table
    python3 bench/bench_fdpass.py --n 20000 --repeats 5 --methods fastnet,socket
    python3 bench/bench_fdpass.py --json out.json

``run()`` and ``format_table()`` do the same thing for callers in Python.
"""
import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchutil  # noqa: E402  (the client side shared by the bench/ scripts)

METHODS = ("reduction", "socket", "fastnet", "fastnet-pure", "connection")
LABELS = {
    "reduction": "multiprocessing.reduction",
    "socket": "socket.send_fds",
    "fastnet": "fastnet.send_fd (compiled)",
    "fastnet-pure": "fastnet.send_fd (pure)",
    "connection": "Connection.send_fds",
}
CHILD_TIMEOUT = 300.0


# -- the two ends, run inside the children ------------------------------------


def _ends(method, sock):
    """(setup, send_one(fd), recv_one() -> fd, send_ack(), recv_ack()) for a method."""
    if method == "reduction":
        from multiprocessing import reduction
        # reduction wants the peer's pid only on Windows; any value works here
        pid = os.getppid()
        return (lambda fd: reduction.send_handle(sock, fd, pid),
                lambda: reduction.recv_handle(sock),
                lambda: sock.sendall(b"A"),
                lambda: sock.recv(1))
    if method == "socket":
        send_fds, recv_fds = socket.send_fds, socket.recv_fds
        one = [b"\x01"]
        return (lambda fd: send_fds(sock, one, [fd]),
                lambda: recv_fds(sock, 1, 1)[1][0],
                lambda: sock.sendall(b"A"),
                lambda: sock.recv(1))
    if method in ("fastnet", "fastnet-pure"):
        import fastnet
        want = "python" if method == "fastnet-pure" else "cython"
        if fastnet.backend != want:
            raise SystemExit(f"{method}: fastnet.backend is {fastnet.backend!r}, expected {want!r}")
        send_fd, recv_fd = fastnet.send_fd, fastnet.recv_fd
        return (lambda fd: send_fd(sock, fd),
                lambda: recv_fd(sock),
                lambda: sock.sendall(b"A"),
                lambda: sock.recv(1))
    if method == "connection":
        import fastnet
        if fastnet.backend != "cython":
            raise SystemExit(f"{method}: fastnet.backend is {fastnet.backend!r}, expected 'cython'")
        conn = fastnet.Connection(sock)
        send_fds, recv_fds = conn.send_fds, conn.recv_fds
        return (lambda fd: send_fds([fd]),
                lambda: recv_fds(1)[1][0],
                lambda: conn.send_bytes(b"A"),
                lambda: conn.recv_bytes())
    raise SystemExit(f"unknown method {method!r}")


def _child(role, method, fd, n, rounds):
    sock = socket.socket(fileno=fd)
    send_one, recv_one, send_ack, recv_ack = _ends(method, sock)
    close = os.close
    if role == "recv":
        send_ack()  # ready
        for _ in range(rounds):
            for _ in range(n):
                close(recv_one())
            send_ack()
        return
    payload = os.open(os.devnull, os.O_RDONLY)
    recv_ack()  # the receiver is up
    print("ready", flush=True)
    clock = time.perf_counter
    for _ in range(rounds):
        if sys.stdin.readline().strip() != "go":
            return
        t0 = clock()
        for _ in range(n):
            send_one(payload)
        recv_ack()
        print(clock() - t0, flush=True)


# -- the parent ---------------------------------------------------------------


class _Row:
    """The two child processes of one method, kept for every round."""

    def __init__(self, method, n, rounds):
        self.method = method
        a, b = socket.socketpair()
        self.procs = []
        try:
            for role, s in (("recv", b), ("send", a)):
                cmd = [sys.executable, os.path.abspath(__file__), "--child", role, method,
                       str(s.fileno()), str(n), str(rounds)]
                self.procs.append(subprocess.Popen(
                    cmd, env=benchutil.child_env(pure=method == "fastnet-pure"), pass_fds=[s.fileno()], stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        finally:
            a.close()
            b.close()
        self.sender = self.procs[1]
        self._line()  # "ready": both ends are up

    def _line(self):
        line = self.sender.stdout.readline()
        if not line:
            self.close()
            errs = "\n".join(p.stderr.read() for p in self.procs)
            raise RuntimeError(f"{self.method}: a child failed:\n{errs}")
        return line

    def round(self):
        """Seconds for one round of n descriptors."""
        self.sender.stdin.write("go\n")
        self.sender.stdin.flush()
        return float(self._line())

    def close(self):
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
            try:
                p.wait(CHILD_TIMEOUT)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            p.stdout.close()
            p.stderr.close()


def run(n=50000, repeats=7, methods=METHODS):
    """{method: {"rates": [...], "median": fds/s}} for every method.

    Every method's two processes start first; then each round runs every
    method once, in turn, so a change in background load hits all alike.
    One warm-up round is not counted.
    """
    rows = []
    try:
        for m in methods:
            rows.append(_Row(m, n, repeats + 1))
        times = {m: [] for m in methods}
        for i in range(repeats + 1):
            for row in rows:
                t = row.round()
                if i:
                    times[row.method].append(t)
    finally:
        for row in rows:
            row.close()
    results = {}
    for m in methods:
        rates = [n / t for t in times[m]]
        results[m] = {"rates": rates, "median": statistics.median(rates)}
    return results


def format_table(results, n, repeats):
    def ratio(m, base):
        if base not in results:
            return "-"
        return f"{results[m]['median'] / results[base]['median']:.2f}x"

    rows = [("method", "fds/s (median)", "min..max", "vs socket.send_fds", "vs reduction")]
    for m, r in results.items():
        rows.append((LABELS[m], f"{r['median'] / 1e3:.1f}k",
                     f"{min(r['rates']) / 1e3:.1f}k..{max(r['rates']) / 1e3:.1f}k",
                     ratio(m, "socket"), ratio(m, "reduction")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"fd passing, one descriptor per message, socketpair between two processes; "
             f"{n} fds x {repeats} repeats (median)",
             f"python {platform.python_version()}, {platform.machine()}, "
             f"{os.cpu_count()} CPUs, {platform.platform()}"]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50000, help="descriptors per timed round (default 50000)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds per method (default 7)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--json", metavar="PATH", help="also write the raw rates as JSON")
    p.add_argument("--child", nargs=5, metavar=("ROLE", "METHOD", "FD", "N", "ROUNDS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        role, method, fd, n, rounds = args.child
        _child(role, method, int(fd), int(n), int(rounds))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods: {', '.join(bad)}")
    results = run(args.n, args.repeats, methods)
    print(format_table(results, args.n, args.repeats))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "repeats": args.repeats, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
