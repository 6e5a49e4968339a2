"""fastnet bench run for real in a minimal configuration: the echo and fdpass
cases, the read-ahead and handshake rows, the report's reference figures, and
children that load their case code by path.

Every row must produce a number (uvloop's may instead say it is not
installed); no timing is checked.  Each row sets FASTNET_PURE for its own
children, so these tests mean the same with or without it.
"""
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys

import pytest

import fastnet
from fastnet import bench
from fastnet.bench.cases import NOT_RUN_QUICK, REFERENCE_LABEL, REFERENCE_NOTE

# one short sample per row, few connections: about ten seconds for both cases
SHORT = dict(rounds=1, repeat=1, warmup=0.02, sample=0.05, conns=8, timeout=60.0)


@pytest.fixture(scope="module")
def report():
    return bench.run(["echo", "fdpass"], **SHORT)


def _assert_measured(rows):
    for key, row in rows.items():
        if key == "uvloop" and importlib.util.find_spec("uvloop") is None:
            assert row["median"] is None and row["na"] == "uvloop is not installed"
            continue
        assert row["na"] is None, (key, row["na"])
        assert row["median"] > 0 and row["samples"], key


def test_echo_measures_every_row_over_tcp_and_af_unix(report):
    fams = report["results"]["echo"]
    assert list(fams) == ["tcp", "unix"]
    for rows in fams.values():
        assert set(rows) == {"selectors", "socketserver", "asyncio", "uvloop", "fastnet", "fastnet-pure"}
        _assert_measured(rows)
        for row in rows.values():
            if row["median"] is not None:
                assert row["info"]["conns"] == SHORT["conns"] and row["info"]["round_trips"] > 0
                assert row["unit"] == "roundtrips/s"


def test_fdpass_measures_every_row_over_af_unix_only(report):
    fams = report["results"]["fdpass"]
    assert list(fams) == ["unix"]
    assert set(fams["unix"]) == {"mp-reduction", "send_fds", "fastnet", "fastnet-pure"}
    _assert_measured(fams["unix"])
    text = bench.format_report(report)
    section = text.split("\nfdpass:")[1].split("\n\n")[0]
    assert "AF_UNIX" in section and "TCP" not in section
    assert {t["family"] for t in report["targets"] if t["case"] == "fdpass"} == {"unix"}


def test_targets_and_speedups_include_the_new_cases(report):
    values = {(t["case"], t["family"], t["target"]): t["value"] for t in report["targets"]}
    for family in ("tcp", "unix"):
        assert values[("echo", family, "fastnet vs selectors")] > 0
        assert ("echo", family, "fastnet vs uvloop") in values
    assert values[("fdpass", "unix", "fastnet vs multiprocessing.reduction")] > 0
    labels = {label for label, _ratio, _peer in bench.speedups(report)}
    assert {"echo TCP", "echo AF_UNIX", "fdpass AF_UNIX"} <= labels


def test_fdpass_over_tcp_alone_runs_nothing(capsys):
    report = bench.run(["fdpass"], families=("tcp",), **SHORT)
    assert report["results"]["fdpass"] == {} and report["targets"] == []
    assert bench.main(["--only", "fdpass", "--family", "tcp", "-q"]) == 0
    assert "not run: this case runs over AF_UNIX only" in capsys.readouterr().out


def test_quick_profile_runs_echo_over_tcp_only():
    report = bench.run(["echo"], quick=True, families=("unix",), **SHORT)
    rows = report["results"]["echo"]["unix"]
    assert {row["na"] for row in rows.values()} == {NOT_RUN_QUICK}


def test_uvloop_missing_is_na_with_the_reason(tmp_path, monkeypatch):
    # a uvloop that fails to import, ahead of any installed one on the children's path
    (tmp_path / "uvloop").mkdir()
    (tmp_path / "uvloop" / "__init__.py").write_text("raise ImportError('hidden by a test')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path),
                                                                   os.environ.get("PYTHONPATH")])))
    only = [i for i in bench.CASES["echo"]["impls"] if i.key == "uvloop"]
    monkeypatch.setitem(bench.CASES["echo"], "impls", only)
    report = bench.run(["echo"], families=("tcp",), **SHORT)
    row = report["results"]["echo"]["tcp"]["uvloop"]
    assert row["median"] is None and row["na"] == "uvloop is not installed"


def test_results_md_rewrites_only_its_block_from_a_report(report, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "results_md", os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench", "results_md.py"))
    results_md = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results_md)
    report = dict(report, command="fastnet bench --only echo,fdpass --json r.json")
    path = tmp_path / "report.json"
    path.write_text(__import__("json").dumps(report))
    md = tmp_path / "RESULTS.md"
    md.write_text(f"# kept above\n{results_md.BEGIN}\nstale\n{results_md.END}\n## kept below\n")
    assert results_md.main(["-", str(path), "--output", str(md), "--check"]) == 1
    assert results_md.main(["-", str(path), "--output", str(md)]) == 0
    text = md.read_text()
    assert text.startswith("# kept above\n") and text.endswith("## kept below\n")
    assert "stale" not in text
    assert "Command: `python3 -m fastnet bench --only echo,fdpass --json r.json`" in text
    assert f"`nproc` = {os.cpu_count()}" in text
    # the report's own tables, as fastnet bench printed them
    assert bench.format_report(report).strip() in text
    assert results_md.main(["-", str(path), "--output", str(md), "--check"]) == 0


def _bench_script(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bench_echo():
    return _bench_script("bench_echo")


def test_bench_managers_measures_both_implementations_on_both_families():
    bench_managers = _bench_script("bench_managers")
    res = bench_managers.run(rounds=1, calls=20, proxies=3)
    assert set(res) == {"TCP", "AF_UNIX"}
    for fam in res.values():
        for impl in ("stdlib", "fastnet"):
            assert fam[impl]["calls"] > 0 and fam[impl]["proxies"] > 0
    assert "new proxies/s" in bench_managers.format_table(res)


@pytest.mark.parametrize("kind", ["fastnet", "fastnet-pure", "asyncio", "selectors"])
def test_bench_echo_server_serves_load_after_load_until_sigterm(kind):
    # bench/bench_echo.py runs fastnet bench's echo servers in their persistent
    # mode: one server must outlive each round's connections and exit on SIGTERM
    bench_echo = _bench_echo()
    proc, port = bench_echo.start_server(kind)
    try:
        for _ in range(2):
            r = bench_echo.run_load(port, proc.pid, 10, 0.02, 0.1)
            assert r["errors"] == 0 and r["round_trips"] > 0
            assert proc.poll() is None
    finally:
        bench_echo.stop_server(proc)
    # exit status 0: it stopped on SIGTERM, not on stop_server's SIGKILL
    assert proc.returncode == 0


def test_bench_rpc_runs_its_sequential_and_pipelined_rows():
    # bench/bench_rpc.py shares fastnet bench's RPC rows and targets and adds its own
    bench_rpc = _bench_script("bench_rpc")
    report = bench_rpc.run(["sequential", "pipelined"], quick=True, families=("tcp",),
                           repeat=1, warmup=0.02, sample=0.05)
    for case in ("sequential", "pipelined"):
        rows = report["results"][case]["tcp"]
        assert list(rows) == [i.key for i in bench_rpc.CASES[case]["impls"]]
        for key, row in rows.items():
            if row["na"] is not None:       # a library the bench extra installs may be missing
                assert row["median"] is None and "not installed" in row["na"], (key, row["na"])
            else:
                assert row["median"] > 0, key
        for key in ("mp-rpc", "fastnet"):
            assert rows[key]["median"] > 0, key
    assert rows["mp-rpc"]["label"] == "pickle RPC, mp: 64 sent, 64 read"
    texts = {t["target"] for t in report["targets"]}
    assert {"msgpack RPC >= 35k calls/s", "json / msgpack", "window of 64 >= 150k calls/s"} <= texts


def test_anchor_rows_run_where_fastnet_does_not_import(tmp_path):
    # A tree whose fastnet package raises on import, holding a copy of
    # fastnet/bench/.  The runner and its children load the copy by file path
    # (_load.py), so the stdlib rows still measure and the fastnet row says why not.
    pkg = tmp_path / "fastnet"
    shutil.copytree(os.path.dirname(bench.__file__), pkg / "bench",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "__init__.py").write_text("raise ImportError('broken by a test')\n")
    code = ("import importlib.util, json, sys\n"
            "s = importlib.util.spec_from_file_location('_fastnet_bench_load', sys.argv[1])\n"
            "m = importlib.util.module_from_spec(s)\n"
            "s.loader.exec_module(m)\n"
            "r = m.load('runner').run(['handshake'], families=('unix',), rounds=1, repeat=1,\n"
            "                         warmup=0.02, sample=0.05, timeout=60.0)\n"
            "print(json.dumps(r['results']['handshake']['unix']))\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code, str(pkg / "bench" / "_load.py")], env=env,
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rows["mp"]["na"] is None and rows["mp"]["median"] > 0
    assert rows["fastnet"]["median"] is None
    assert rows["fastnet"]["na"] == "import fastnet failed: ImportError: broken by a test"


@pytest.fixture(scope="module")
def transport():
    pingpong = bench.run(["pingpong", "stream"], families=("unix",), **SHORT)
    handshake = bench.run(["handshake"], families=("tcp", "unix"), **SHORT)
    return pingpong, handshake


def test_readahead_rows_measure_where_fastnet_offers_the_option(transport):
    # The rows pass readahead=True to fastnet's Listener and Client.  A fastnet
    # whose Client and Listener take no such option shows them as n/a with the
    # reason, and every other row of the case still measures.
    report = transport[0]
    missing = next((f"fastnet.{api.__name__} has no readahead option" for api in (fastnet.Client, fastnet.Listener)
                    if "readahead" not in inspect.signature(api).parameters), None)
    offers = missing is None
    for case, keys in (("pingpong", ["fastnet-readahead", "fastnet-readahead-pure"]),
                       ("stream", ["fastnet-readahead", "fastnet-batch-readahead", "fastnet-readahead-pure"])):
        rows = report["results"][case]["unix"]
        for key in keys:
            if offers:
                assert rows[key]["na"] is None and rows[key]["median"] > 0, (case, key, rows[key]["na"])
            else:
                assert rows[key]["median"] is None and rows[key]["na"] == missing, (case, key)
        for key in ("mp", "fastnet"):
            assert rows[key]["median"] > 0, (case, key)
    values = {(t["case"], t["target"]): t for t in report["targets"]}
    for case, text in (("pingpong", "read-ahead speed-up over the default"),
                       ("stream", "read-ahead speed-up, send_bytes"), ("stream", "read-ahead speed-up, send_many")):
        t = values[(case, text)]
        assert (t["value"] > 0 and t["status"] == "reported") if offers else t["status"] == "n/a"
    text = bench.format_report(report)
    assert "fastnet send/recv, read-ahead" in text and "fastnet send_many, read-ahead" in text


def test_handshake_measures_every_client_listener_pair(transport):
    report = transport[1]
    for family in ("tcp", "unix"):
        rows = report["results"]["handshake"][family]
        assert list(rows) == ["mp", "fastnet", "fastnet-readahead", "fastnet-client", "fastnet-listener"]
        for key, row in rows.items():
            assert row["na"] is None and row["median"] > 0, (family, key, row["na"])
        assert rows["fastnet-client"]["label"] == "fastnet Client, stdlib Listener"
        assert rows["fastnet-listener"]["label"] == "stdlib Client, fastnet Listener"
    texts = {(t["family"], t["target"]) for t in report["targets"] if t["status"] == "reported"}
    assert ("tcp", "stdlib Listener: fastnet vs stdlib Client") in texts
    assert ("unix", "stdlib Client: fastnet vs stdlib Listener") in texts
    assert {("tcp", "read-ahead speed-up over the default"), ("unix", "read-ahead speed-up over the default")} <= texts


def test_report_names_its_reference_figures(transport):
    # the anchors measured when the targets were set: a dated column, explained
    text = bench.format_report(transport[1])
    head = text.split("\nhandshake:")[1].splitlines()[1]
    assert head.split()[-1:] == REFERENCE_LABEL.split()[-1:] and REFERENCE_LABEL in head
    assert " ".join(REFERENCE_NOTE.split()) in " ".join(text.split())
    assert "issue" not in text.lower()
    rows = transport[1]["results"]["handshake"]["tcp"]
    assert rows["mp"]["reference"] == 23.0 and rows["fastnet"]["reference"] is None
    # a table without reference figures (stream over AF_UNIX) has no such column
    assert REFERENCE_LABEL not in bench.format_report(transport[0]).split("\nstream:")[1].split("\n\n")[0]


def test_aio_cases_measure_every_row_on_both_families():
    report = bench.run(["aio"], bulk_mib=4, bulk_warmup=0, **SHORT)
    for case in ("aio-pingpong", "aio-stream", "aio-bulk"):
        fams = report["results"][case]
        assert list(fams) == ["tcp", "unix"]
        for rows in fams.values():
            assert list(rows) == [i.key for i in bench.CASES[case]["impls"]]
            for key, row in rows.items():
                missing = {"zmq-uvloop": ("zmq", "pyzmq"), "streams-uvloop": ("uvloop", "uvloop"),
                           "aio-uvloop": ("uvloop", "uvloop")}.get(key)
                if missing and importlib.util.find_spec(missing[0]) is None:
                    assert missing[1] in row["na"]
                    continue
                assert row["na"] is None, (case, key, row["na"])
                assert row["median"] > 0 and row["samples"], (case, key)
    targets = {(t["case"], t["target"]) for t in report["targets"]}
    assert ("aio-pingpong", "fastnet.aio on uvloop within 1.3x blocking fastnet (time ratio)") in targets
    assert ("aio-bulk", "fastnet.aio send_array >= 0.9x blocking send_array") in targets
