"""Soak: the bounded run of tools/soak.py (about 90 s), part of the normal test run.

Mixed RPC calls (with 256 KiB array arguments), sequence-numbered message streams,
bulk arrays up to 8 MiB both ways and connection churn run against three server
processes; RSS and descriptor counts of the client and of each server are sampled
every second. Asserted, with these stated bounds:

* no workload saw a wrong, lost, duplicated or out-of-order message, and every kind
  of work made progress;
* RSS growth after the warm-up (median of the last five samples minus the median of
  the first five after the warm-up) stays under 20 MiB in every process;
* once every connection is closed, each process's descriptor count is back to its
  baseline.

It runs when ``FASTNET_SOAK_SECONDS`` gives its duration: .ci/run sets it to 90 and
runs this file once per kernel set, both at the same time, after the two full test
runs (90 s in each of them would add three minutes to CI for the same checks)::

    FASTNET_SOAK_SECONDS=90 python3 -m pytest tests/test_soak.py
    FASTNET_SOAK_SECONDS=90 FASTNET_PURE=1 python3 -m pytest tests/test_soak.py

``python3 tools/soak.py --minutes 60`` is the documented long run.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("numpy")
pytest.importorskip("msgpack")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECONDS = float(os.environ.get("FASTNET_SOAK_SECONDS") or 0)
RSS_BOUND_MIB = 20

pytestmark = pytest.mark.skipif(
    SECONDS <= 0, reason="the soak runs for FASTNET_SOAK_SECONDS (.ci/run: 90, both kernel sets at once)")


def test_soak_bounded_run_no_loss_no_leak_bounded_rss(tmp_path):
    out = tmp_path / "soak.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "soak.py"), "--seconds", str(SECONDS),
                        "--json", str(out), "--max-rss-growth-mib", str(RSS_BOUND_MIB)],
                       capture_output=True, text=True, env=env, timeout=SECONDS + 180)
    print(r.stdout)
    assert out.exists(), f"the soak wrote no report (exit {r.returncode}): {r.stdout[-2000:]} {r.stderr[-3000:]}"
    rep = json.loads(out.read_text())
    assert rep["problems"] == []
    assert all(n > 0 for n in rep["ops"].values()), rep["ops"]
    procs = [("client", rep["client"])] + list(rep["servers"].items())
    for name, p in procs:
        assert p["growth_kib"] < RSS_BOUND_MIB * 1024, f"{name}: RSS grew {p['growth_kib'] / 1024:.1f} MiB"
        assert p["fds_end"] == p["fds_baseline"], f"{name}: descriptors {p['fds_baseline']} -> {p['fds_end']}"
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    import fastnet_soak as soak   # tools/soak.py, loaded by conftest
    soak.record_figure(f"soak {rep['seconds']:.0f} s", warmup_s=rep["warmup"], ops=rep["ops"], problems=0,
                       rss_growth_mib={n: round(p["growth_kib"] / 1024, 2) for n, p in procs},
                       rss_max_mib={n: round(p["max_kib"] / 1024, 1) for n, p in procs},
                       fds={n: [p["fds_baseline"], p["fds_end"]] for n, p in procs})
