"""The cases of ``fastnet bench``, gathered from their modules: rows,
targets, the child roles, and the settings of the profiles."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from . import aio, bulk, echo, fdpass, handshake, pingpong, rpc, stream

MODULES = (pingpong, stream, bulk, handshake, rpc, echo, fdpass, aio)

# Reference figures: the anchors as measured on the project's 2-core machine
# in November 2026, when the targets below were set.  Shown next to this
# run's anchors, so that a reader sees whether the machine is comparable.
REFERENCE_LABEL = "Nov 2026"
REFERENCE_NOTE = (f"{REFERENCE_LABEL}: reference figures, measured for the same row on the project's 2-core "
                  "machine in November 2026 when the targets were set; beside this run's anchors they show "
                  "how this machine compares.")
REFERENCE = {
    ("pingpong", "tcp", "c"): 11.4,
    ("pingpong", "unix", "c"): 7.6,
    ("pingpong", "tcp", "mp"): 54.0,
    ("pingpong", "unix", "mp"): 36.0,
    ("pingpong", "tcp", "zmq"): 98.0,
    ("pingpong", "unix", "zmq"): 90.0,
    ("stream", "tcp", "mp"): 252e3,
    ("stream", "tcp", "zmq"): 574e3,
    ("bulk", "tcp", "socket"): 2.6,
    ("bulk", "unix", "socket"): 3.5,
    ("bulk", "tcp", "mp-bytes"): 0.75,
    ("bulk", "tcp", "mp-pickle"): 0.25,
    ("bulk", "tcp", "zmq"): 1.06,
    ("handshake", "tcp", "mp"): 23.0,
    ("handshake", "unix", "mp"): 4400.0,
    # sequential add(2, 3) calls/s from one client process
    ("rpc-seq", "tcp", "mp-rpc"): 13960.0,
    ("rpc-seq", "tcp", "xmlrpc"): 1390.0,
    ("rpc-seq", "tcp", "zmq-rpc"): 10100.0,
    ("rpc-seq", "tcp", "pyro5"): 4250.0,
    ("rpc-seq", "tcp", "rpyc"): 6890.0,
}


# "columns": the rows that get a ratio column (default: the anchors);
# "families": the only families a case runs in (the others are not listed).
CASES: dict[str, dict[str, Any]] = {name: case for m in MODULES for name, case in m.CASES.items()}

# (case, impl) -> (server, client) for the Python children.
ROLES: dict[tuple[str, str], Any] = {role: fns for m in MODULES for role, fns in m.ROLES.items()}

# Names for --only that stand for several cases.
GROUPS = {"rpc": ["rpc-seq", "rpc-pipe"], "aio": ["aio-pingpong", "aio-stream", "aio-bulk"]}

FAMILIES = {"tcp": "TCP", "unix": "AF_UNIX"}

# Issue #2's targets.  ("ratio", num, den, op, bound): value(num)/value(den);
# ("value", impl, op, bound): an absolute number; ("report", num, den): a
# ratio shown without a bound.
TARGETS: list[tuple[Any, ...]] = [t for m in MODULES for t in m.TARGETS]

PROFILES = {
    # rounds: fresh process pairs per row; repeat: timed samples per pair.
    # conns: connections of the echo case.
    "full": dict(rounds=3, repeat=5, warmup=0.2, sample=0.3, bulk_mib=256, bulk_warmup=1, timeout=300.0,
                 conns=100),
    "quick": dict(rounds=1, repeat=5, warmup=0.05, sample=0.08, bulk_mib=32, bulk_warmup=1, timeout=60.0,
                  conns=100),
}

NOT_RUN_ANCHORS = "not run (--anchors)"
NOT_RUN_QUICK = "not run (--quick)"


def _case_families(case: str, families: Iterable[str]) -> list[str]:
    """The families of ``families`` that ``case`` runs in (a case's "families" entry may narrow them)."""
    only = CASES[case].get("families")
    return [f for f in families if not only or f in only]


def _in_quick(case: Any, family: Any, impl: Any) -> bool:
    """Whether a row runs in the quick profile (a case's "quick" entry may narrow it)."""
    q = CASES[case].get("quick")
    if not q:
        return True
    return family in q.get("families", FAMILIES) and impl.key not in q.get("skip", ())
