"""The report: text tables, targets, speed-ups and the chart."""

from __future__ import annotations

import textwrap
from typing import Any

from .cases import CASES, FAMILIES, NOT_RUN_ANCHORS, NOT_RUN_QUICK, REFERENCE_LABEL, REFERENCE_NOTE, TARGETS, _case_families
from .rpc import RPC_IN_FLIGHT


def _ratio(rows: Any, num: Any, den: Any) -> Any:
    a, b = rows.get(num, {}).get("median"), rows.get(den, {}).get("median")
    if a is None or b is None or b == 0:
        return None
    return a / b


def _targets(report: dict[str, Any], cases: Any, families: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for case, only_family, text, rule in TARGETS:
        if case not in cases:
            continue
        for family in _case_families(case, families):
            if only_family and family != only_family:
                continue
            rows = report["results"][case][family]
            if any(rows.get(k, {}).get("na") in (NOT_RUN_ANCHORS, NOT_RUN_QUICK)
                   for k in rule[1:] if isinstance(k, str) and k in rows):
                continue
            value, status = evaluate(rule, rows)
            out.append({"case": case, "family": family, "target": text, "value": value, "status": status})
    return out


def evaluate(rule: tuple[Any, ...], rows: Any) -> tuple[Any, str]:
    """A target's rule applied to one family's rows: ``(value, status)``.

    ``("ratio", num, den, op, bound)`` is median(num) / median(den) held
    against the bound, ``("value", impl, op, bound)`` a median, and
    ``("report", num, den)`` a ratio reported without a bound.
    """
    if rule[0] == "value":
        _, impl, op, bound = rule
        value = rows.get(impl, {}).get("median")
    elif rule[0] == "ratio":
        _, num, den, op, bound = rule
        value = _ratio(rows, num, den)
    else:
        _, num, den = rule
        op = bound = None
        value = _ratio(rows, num, den)
    if value is None:
        return value, "n/a"
    if op is None:
        return value, "reported"
    met = value <= bound if op == "<=" else value >= bound
    return value, "met" if met else "NOT met"


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.2f}M"
    if a >= 1e4:
        return f"{v / 1e3:.0f}k"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def format_report(report: dict[str, Any]) -> str:
    """Render the report dict as text tables."""
    cfg = report["config"]
    lines = preamble(report, "fastnet bench", "ratio columns are value / that row's value")
    notes = []
    referenced = False
    for case, fams in report["results"].items():
        spec = CASES[case]
        columns = spec.get("columns")
        anchors = [i for i in spec["impls"] if (i.key in columns if columns else i.anchor)
                   and any(fams[f][i.key]["na"] not in (NOT_RUN_ANCHORS, NOT_RUN_QUICK) for f in fams)]
        title = spec["title"].format(size=cfg["size"], mib=cfg["bulk_mib"], batch=cfg["batch"],
                                     window=RPC_IN_FLIGHT, conns=cfg.get("conns", "?"))
        lines += ["", f"{title}  [{spec['unit']}, {spec['better']} is better]"]
        if not fams:
            only = " and ".join(FAMILIES[f] for f in spec.get("families", ()))
            lines.append(f"  not run: this case runs over {only} only")
            continue
        # (a report of an older fastnet has no reference figures)
        refs = any(row.get("reference") is not None for rows in fams.values() for row in rows.values())
        referenced = referenced or refs
        head = f"{'':8s} {'':32s} {'median':>9s}" + "".join(f" {'/' + _short(a):>9s}" for a in anchors) \
            + (f" {REFERENCE_LABEL:>9s}" if refs else "")
        lines.append(head.rstrip())
        for family, rows in fams.items():
            first = True
            for impl in spec["impls"]:
                row = rows[impl.key]
                if row["na"] in (NOT_RUN_ANCHORS, NOT_RUN_QUICK):
                    continue
                cells = f"{FAMILIES[family] if first else '':8s} {impl.label:32s} "
                first = False
                if row["median"] is None:
                    notes.append(f"{case} {FAMILIES[family]} {impl.label}: {row['na']}")
                    cells += f"{'n/a [' + str(len(notes)) + ']':>9s}"
                else:
                    cells += figures(rows, impl.key, [a.key for a in anchors])
                lines.append(cells.rstrip())
    if referenced:
        lines += ["", *textwrap.wrap(REFERENCE_NOTE, 100)]
    if report["targets"] and not cfg.get("anchors_only"):
        reported = any(t["status"] == "reported" for t in report["targets"])
        lines += ["", "targets" + (" and reported ratios" if reported else "")]
        for t in report["targets"]:
            value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
            lines.append(f"  {t['case']:9s} {FAMILIES[t['family']]:7s} {t['target']:46s} "
                         f"{value:>9s}  {t['status']}")
    lines += footnotes(notes)
    return "\n".join(lines)


def preamble(report: dict[str, Any], name: str, columns: str) -> list[str]:
    """A report's first lines: what ran, when, where and how (``columns`` explains the ratio columns)."""
    cfg = report["config"]
    m = report["machine"]
    vers = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return [
        f"{name}  {report['date']}  ({'quick' if cfg['quick'] else 'full'} profile, "
        f"{report['elapsed_s']:g} s)",
        f"machine: {m['cpu']}, {m['cpus']} CPUs, {m['platform']}; {vers}",
        f"each row: median of {cfg['rounds']} fresh process pair(s) x {cfg['repeat']} samples; "
        f"CPU placement: {_PIN_TEXT[cfg['pin']]}; {columns}",
    ]


def figures(rows: Any, key: str, columns: list[str], width: int = 9, spread: bool = False) -> str:
    """A measured row's cells: its median, its ratio to each of ``columns`` (``width`` wide),
    with ``spread`` its interquartile range over the median, and its reference figure if any."""
    row = rows[key]
    cells = f"{_fmt(row['median']):>9s}"
    for c in columns:
        r = _ratio(rows, key, c)
        cells += f" {('%.2f' % r) if r is not None else '-':>{width}s}"
    if spread:
        cells += f" {('%.0f%%' % (100 * row['spread'])) if row['spread'] is not None else '-':>5s}"
    if row.get("reference") is not None:
        cells += f" {_fmt(row['reference']):>9s}"
    return cells


def footnotes(notes: list[str]) -> list[str]:
    """The numbered n/a reasons that close a report (none: no lines)."""
    if not notes:
        return []
    return ["", "n/a:"] + [f"  [{n}] {text}" for n, text in enumerate(notes, 1)]


_PIN_TEXT = {"none": "scheduler's choice", "same": "both processes on one CPU",
             "split": "one CPU each"}


def _short(impl: Any) -> Any:
    return {"c": "C", "mp": "mp", "zmq": "zmq", "socket": "socket",
            "mp-bytes": "mp bytes", "mp-pickle": "mp send", "mp-rpc": "mp rpc",
            "zmq-rpc": "zmq", "selectors": "selector", "socketserver": "sockserv",
            "mp-reduction": "mp"}.get(impl.key, impl.key)


def speedups(report: dict[str, Any]) -> list[tuple[str, float, str]]:
    """``(label, speed-up, best peer)`` per case and family: fastnet's best
    compiled row against the best peer library that ran (> 1 means fastnet is
    faster).  The C and plain-socket floors are limits, not peers."""
    out = []
    for case, fams in report["results"].items():
        lower = CASES[case]["better"] == "lower"
        for family, rows in fams.items():
            mine = [r for k, r in rows.items() if k.startswith("fastnet") and not k.endswith("pure")
                    and r["median"]]
            peers = [r for k, r in rows.items() if r["anchor"] and r["median"] and k not in _FLOORS]
            if not mine or not peers:
                continue
            pick = min if lower else max
            best_mine = pick(r["median"] for r in mine)
            best_peer = pick(peers, key=lambda r: r["median"])
            ratio = (best_peer["median"] / best_mine) if lower else (best_mine / best_peer["median"])
            out.append((f"{case} {FAMILIES[family]}", ratio, best_peer["label"]))
    return out


_FLOORS = ("c", "socket")


def plot(report: dict[str, Any], path: str) -> None:
    """Write the :func:`speedups` of a report as a PNG bar chart (needs matplotlib)."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]  # optional (bench extra)
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install 'fastnet[bench]')") from None
    rows = speedups(report)
    if not rows:
        raise ValueError("--plot: no case has both a fastnet row and a peer that ran")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(rows) + 2), 4.5))
    values = [r[1] for r in rows]
    bars = ax.bar(range(len(rows)), values,
                  color=["#2a7ab9" if v >= 1 else "#c0504d" for v in values])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")       # speed-ups span 0.5x to hundreds
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{label}\nvs {peer[:28]}" for label, _, peer in rows],
                       rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("speed-up over the best peer (x, log)")
    m = report["machine"]
    ax.set_title(f"fastnet bench {report['date'][:10]}, {m['cpus']} CPUs", fontsize=10)
    for bar, v in zip(bars, values):
        ax.annotate(f"{v:.3g}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
