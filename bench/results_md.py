#!/usr/bin/env python3
"""Regenerate the top of bench/RESULTS.md from ``fastnet bench --json`` reports.

    python3 -m fastnet bench --quick --json quick.json --plot bench/results.png
    python3 -m fastnet bench --json full.json
    python3 bench/results_md.py quick.json full.json        # rewrites bench/RESULTS.md

The part between the ``<!-- fastnet bench: begin -->`` and ``<!-- fastnet
bench: end -->`` markers is replaced: the machine, the date, each report's
command and duration, its table as ``fastnet bench`` printed it, and the
chart. Everything outside the markers (the sections of the other scripts
in bench/, each with its own command and date) is kept as written.
``--check`` exits 1 if the file is not what the reports would make.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from fastnet.bench import format_report  # noqa: E402

BEGIN = "<!-- fastnet bench: begin -->"
END = "<!-- fastnet bench: end -->"
RESULTS = os.path.join(HERE, "RESULTS.md")


def _memory_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20)
    except OSError:
        pass
    return None


def _machine_line(report):
    m = report["machine"]
    v = m["versions"]
    mem = _memory_gib()
    peers = ", ".join(f"{k} {v[k]}" for k in ("numpy", "msgpack", "zmq", "libzmq", "uvloop", "Pyro5", "rpyc")
                      if k in v)
    return (f"`nproc` = {m['cpus']} ({m['cpu']}), {m['platform']}"
            + (f", {mem} GiB" if mem else "") + f"; CPython {v['python']}; {peers}.")


def section(report, heading, note=""):
    """One report as a Markdown section: command, date, duration and the printed table."""
    cfg = report["config"]
    cmd = report.get("command", "fastnet bench")
    lines = [
        f"## {heading}",
        "",
        f"Command: `python3 -m {cmd}`; {report['date'].replace('T', ' ').replace('+00:00', ' UTC')}, "
        f"{report['elapsed_s']:g} s; {cfg['rounds']} fresh process pair(s) per row x {cfg['repeat']} samples, "
        f"CPU placement: {cfg.get('pin', 'none')}.",
    ]
    if note:
        lines += ["", note]
    lines += ["", "```", format_report(report).rstrip("\n"), "```", ""]
    return "\n".join(lines)


def render(quick, full):
    """The generated block, markers included."""
    parts = [
        BEGIN,
        "",
        f"Machine: {_machine_line(full or quick)}",
        "Each table below is one `fastnet bench` run with its anchors side by side; figures are",
        "medians over all samples of a row, ratios are value / that column's row from the same run.",
        "",
    ]
    if quick:
        parts.append(section(quick, "The main job: `fastnet bench --quick`",
                             "The chart: fastnet's best compiled row over the best peer of each case "
                             "(`fastnet.bench.speedups`).\n\n![fastnet speed-up over the best peer per case]"
                             "(results.png)"))
    if full:
        parts.append(section(full, "The full comparison: `fastnet bench`"))
    parts.append(END)
    return "\n".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("quick", help="the --quick report (JSON), or - for none")
    p.add_argument("full", nargs="?", help="the full report (JSON)")
    p.add_argument("--output", default=RESULTS)
    p.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = p.parse_args(argv)

    def load(path):
        if not path or path == "-":
            return None
        with open(path) as f:
            return json.load(f)

    block = render(load(args.quick), load(args.full))
    with open(args.output) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        sys.exit(f"{args.output} has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    new = head + block + tail
    if args.check:
        return 0 if new == text else 1
    with open(args.output, "w") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
