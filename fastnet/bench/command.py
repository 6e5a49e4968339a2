"""The ``fastnet bench`` command."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .cases import CASES, GROUPS
from .report import format_report, plot
from .runner import run


def _parse(argv: Any) -> Any:
    p = argparse.ArgumentParser(
        prog="fastnet bench",
        description="Compare fastnet with the C floor, multiprocessing.connection, "
                    "pyzmq, plain sockets and RPC libraries over loopback; medians and "
                    "ratios in one run.")
    p.add_argument("--quick", action="store_true",
                   help="short samples, one round, 32 MiB bulk, rpc and echo cases over TCP only "
                        "(under a minute on 2 cores)")
    p.add_argument("--only", metavar="NAME,...",
                   help=f"cases to run, comma-separated: {','.join(CASES)} "
                        f"(rpc: {','.join(GROUPS['rpc'])})")
    p.add_argument("--family", metavar="NAME,...", default="tcp,unix",
                   help="tcp, unix or both (default both; fdpass runs over unix only)")
    p.add_argument("--anchors", action="store_true",
                   help="run only the anchors (C floor, multiprocessing, pyzmq, plain sockets, "
                        "xmlrpc, Pyro5, rpyc)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw fastnet's speed-up over the best peer per case as a bar chart (matplotlib)")
    p.add_argument("--rounds", type=int, help="fresh process pairs per row")
    p.add_argument("--repeat", type=int, help="timed samples per pair")
    p.add_argument("--sample", type=float, help="seconds per timed sample")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per pair")
    p.add_argument("--bulk-mib", type=float, help="bulk array size in MiB")
    p.add_argument("--batch", type=int, help="messages per send_many call (default 128)")
    p.add_argument("--conns", type=int, help="connections of the echo case (default 100)")
    p.add_argument("--timeout", type=float, help="seconds before a pair is abandoned")
    p.add_argument("--pin", choices=("none", "same", "split"), default="none",
                   help="CPU placement of each pair: none (the scheduler's choice, default), "
                        "same (one CPU for both) or split (one CPU each)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


class _Progress:
    """A tqdm bar on stderr when tqdm is installed and stderr is a terminal, else a line per pair."""

    def __init__(self) -> None:
        self.bar: Any = None

    def total(self, n: int) -> None:
        if not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm  # type: ignore[import-untyped, import-not-found, unused-ignore]  # optional
        except ImportError:
            return
        self.bar = tqdm(total=n, unit="pair", file=sys.stderr, leave=False, dynamic_ncols=True)

    def __call__(self, text: Any) -> None:
        if self.bar is None:
            print(text, file=sys.stderr, flush=True)
            return
        self.bar.set_description_str(str(text)[:60])
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fastnet bench`` command.  Returns the exit status."""
    args = _parse(argv)
    cases = [c.strip() for c in args.only.split(",") if c.strip()] if args.only else None
    families = tuple(f.strip() for f in args.family.split(",") if f.strip())
    bar = _Progress()
    try:
        report = run(cases, quick=args.quick, families=families, anchors_only=args.anchors,
                     progress=None if args.quiet else bar,
                     total=None if args.quiet else bar.total,
                     rounds=args.rounds, repeat=args.repeat, sample=args.sample,
                     warmup=args.warmup, bulk_mib=args.bulk_mib, batch=args.batch, conns=args.conns,
                     timeout=args.timeout, pin=args.pin)
    except ValueError as exc:
        print(f"fastnet bench: {exc}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    report["command"] = "fastnet bench " + " ".join(sys.argv[1:] if argv is None else argv)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    if args.plot:
        try:
            plot(report, args.plot)
        except ValueError as exc:
            print(f"fastnet bench: {exc}", file=sys.stderr)
            return 2
    return 0
