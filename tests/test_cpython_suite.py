"""CPython's own tests of multiprocessing.connection and socketserver, on fastnet.

The test code comes from the interpreter running pytest: its ``test``
package (``test._test_multiprocessing``, ``test.test_socketserver``), as
shipped with every CPython install; nothing of it is copied here.
``cpython_dropin.py`` (beside this file) runs it in a subprocess, once as
is (the control) and once with fastnet's classes put where a user's code
meets the stdlib's:

* ``multiprocessing.connection``: ``Listener``, ``Client``, ``Pipe``,
  ``wait``, ``Connection``, ``answer_challenge``, ``deliver_challenge``
  (``multiprocessing.Pipe`` follows); ``multiprocessing.reduction``:
  ``send_handle``/``recv_handle`` written with ``fastnet.send_fd``/``recv_fd``;
* ``socketserver``: every public class, by fastnet.server's namesake; a
  class fastnet.server lacks is removed, so a test that needs it fails.

From ``_test_multiprocessing`` it runs the connection classes
(``_TestConnection``, ``_TestListener``, ``_TestListenerClient``,
``_TestPoll``, ``_TestPicklingConnections`` as their "processes" variant;
``OtherTest``, ``TestWait``, ``TestInvalidFamily``, ``TestInvalidHandle``,
``TestTimeouts``, ``TestIgnoreEINTR``) under every start method the platform
has (fork, spawn, forkserver), built by the module's own
``install_tests_in_module_dict`` as ``test_multiprocessing_<method>`` does;
from ``test_socketserver`` every test class.

Only regressions count: every test that passes in the control must pass on
fastnet, except the entries of ``KNOWN_DIFFERENCES``, each scoped to the
error it expects and limited to two kinds: the test depends on CPython's
internals (a private attribute), or the harness itself makes it fail.
A difference in behaviour a user can meet never goes in that list.

A test that hangs is interrupted after ``FASTNET_CPYTHON_TEST_TIMEOUT``
seconds (default 20); a run that stops making progress is killed and
resumed after the test that stopped it. A test that fails in the full run
is run once more alone before it counts, as the machine may be loaded;
one that then passes is reported as a warning. The runs go
``FASTNET_CPYTHON_JOBS`` (default 4) at a time. The kernel set is
inherited: the suite runs under ``FASTNET_PURE=1`` as it runs without.
"""
from __future__ import annotations

import collections
import concurrent.futures
import fnmatch
import importlib.util
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field

import pytest

import fastnet

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(HERE, "cpython_dropin.py")
TEST_TIMEOUT = float(os.environ.get("FASTNET_CPYTHON_TEST_TIMEOUT", "20"))
# A run that writes nothing for this long is killed (the runner's own
# per-test interruption failed, e.g. a hang outside the main thread).
STALL = TEST_TIMEOUT * 2 + 15
JOBS = int(os.environ.get("FASTNET_CPYTHON_JOBS", "4"))
MAX_RESUMES = 6

FASTNET_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastnet.__file__)))

RUNS = [("multiprocessing", m) for m in ("fork", "spawn", "forkserver")
        if m in multiprocessing.get_all_start_methods()] + [("socketserver", "")]


@dataclass(frozen=True)
class Known:
    """A test allowed to fail on fastnet, with this error only, and why."""
    suite: str
    test: str       # "Class.test_method", fnmatch pattern
    error: str      # regular expression searched in the error line
    reason: str


KNOWN_DIFFERENCES = [
    Known("socketserver", "MiscTestCase.test_all", r"AssertionError",
          "harness artefact: the test expects socketserver.__all__ to be exactly the names whose "
          "__module__ is 'socketserver'; the harness has replaced those classes with fastnet.server's"),
    Known("socketserver", "SocketServerTest.test_Forking*", r"has no attribute 'active_children'",
          "depends on CPython internals: ForkingMixIn.active_children, the private set of child pids "
          "(fastnet's servers reap their children themselves; server_close() still waits for them)"),
    Known("socketserver", "MiscTestCase.test_threads_reaped", r"has no attribute '_threads'",
          "depends on CPython internals: ThreadingMixIn._threads, the private list of handler threads"),
    Known("multiprocessing", "TestInvalidHandle.test_invalid_handles", r"OSError: \[Errno 9\]",
          "depends on CPython internals: the stdlib Connection keeps an unchecked descriptor number "
          "in its private _handle (the test resets it by hand); fastnet's Connection wraps the "
          "descriptor in a socket when it is made, so one that is not open raises OSError(EBADF) "
          "there and not at first use"),
]

PASSING = ("pass",)


@dataclass
class Run:
    """The outcomes of one runner invocation (possibly resumed after kills)."""
    suite: str
    flavour: str
    impl: str
    header: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)     # test id -> end record
    stderr_tail: str = ""


def _read(path):
    recs = []
    with open(path) as f:
        for line in f:
            try:
                recs.append(json.loads(line))
            except ValueError:      # the last line of a killed run
                pass
    return recs


def _kill_group(proc):
    """Kill what the run left behind: its process group, which only it made."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_suite(suite, flavour, impl, workdir, only=None, tag=""):
    """Run the runner until every selected test has a result; return a Run."""
    name = f"{suite}-{flavour or 'all'}-{impl}{tag}"
    path = os.path.join(workdir, name + ".jsonl")
    errpath = os.path.join(workdir, name + ".stderr")
    env = dict(os.environ)
    # The runner imports the fastnet this process imported, wherever pytest was started.
    env["PYTHONPATH"] = os.pathsep.join([FASTNET_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["FASTNET_CPYTHON_SUITE"] = f"{suite}:{flavour}:{impl}"
    env["FASTNET_CPYTHON_TEST_TIMEOUT"] = str(TEST_TIMEOUT)
    if only is not None:
        env["FASTNET_CPYTHON_ONLY"] = json.dumps(sorted(only))
    else:
        env.pop("FASTNET_CPYTHON_ONLY", None)
    run = Run(suite, flavour, impl)
    for attempt in range(MAX_RESUMES + 1):
        with open(errpath, "ab") as err:
            proc = subprocess.Popen([sys.executable, RUNNER, path], env=env, cwd=workdir,
                                    stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                    start_new_session=True)
            size, last = -1, time.monotonic()
            while proc.poll() is None:
                time.sleep(0.2)
                now_size = os.path.getsize(path) if os.path.exists(path) else 0
                if now_size != size:
                    size, last = now_size, time.monotonic()
                elif time.monotonic() - last > STALL:
                    break
            stalled = proc.poll() is None
            _kill_group(proc)
        recs = _read(path) if os.path.exists(path) else []
        started, ended = [], set()
        for rec in recs:
            if rec["event"] == "header" and not run.header:
                run.header = rec
            elif rec["event"] == "start":
                started.append(rec["test"])
            elif rec["event"] == "end":
                ended.add(rec["test"])
        if any(rec["event"] == "finished" for rec in recs):
            break
        # The run died or was killed: the test that was running gets the blame,
        # and the next attempt starts after it.
        lost = [t for t in started if t not in ended]
        why = (f"the run made no progress for {STALL:g} s and was killed" if stalled
               else f"the run exited with status {proc.returncode} during this test")
        outcome = "hung" if stalled else "crashed"
        with open(path, "a") as f:
            for t in lost:
                f.write(json.dumps({"event": "end", "test": t, "outcome": outcome, "error": why}) + "\n")
            if not lost and not started:
                # It died before its first test: nothing to resume from.
                f.write(json.dumps({"event": "end", "test": "(run)", "outcome": outcome, "error": why}) + "\n")
                break
    for rec in _read(path):
        if rec["event"] == "end":
            run.results[rec["test"]] = rec
    with open(errpath, "rb") as f:
        run.stderr_tail = f.read()[-4000:].decode(errors="replace")
    return run


def known_difference(suite, test, rec):
    for k in KNOWN_DIFFERENCES:
        if k.suite == suite and fnmatch.fnmatchcase(test, k.test) and re.search(k.error, rec.get("error") or ""):
            return k
    return None


@dataclass
class Comparison:
    control: Run
    fastnet: Run
    regressions: dict            # test -> fastnet record
    known: dict                  # test -> (record, Known)
    flaky: dict                  # test -> record of the failure that did not repeat alone
    control_failures: dict       # test -> control record (excluded from the comparison)


def _not_passing(control, fastnet):
    """Tests the control passed (or never reported, for fixtures) and fastnet did not."""
    out = {}
    for test, rec in fastnet.results.items():
        if rec["outcome"] in PASSING or (
                rec["outcome"] == "skip" and control.results.get(test, {}).get("outcome") == "skip"):
            continue
        ctl = control.results.get(test)
        if ctl is None or ctl["outcome"] in PASSING:
            out[test] = rec
    for test, ctl in control.results.items():
        if ctl["outcome"] in PASSING and test not in fastnet.results:
            out[test] = {"test": test, "outcome": "not run", "error": "fastnet's run never reported it"}
    return out


def _individual(ids):
    return [t for t in ids if "." in t and t.split(".")[-1].startswith("test")]


def confirm(suite, flavour, control, fast, workdir):
    """Run again, alone, what failed in the full runs; then sort the differences."""
    ctl_fail = _individual(t for t, r in control.results.items() if r["outcome"] not in PASSING + ("skip",))
    if ctl_fail:
        again = run_suite(suite, flavour, "stdlib", workdir, only=ctl_fail, tag="-again")
        for t in ctl_fail:
            if again.results.get(t, {}).get("outcome") in PASSING:
                control.results[t] = again.results[t]
    candidates = _not_passing(control, fast)
    retry = _individual(t for t, r in candidates.items() if not known_difference(suite, t, r))
    flaky = {}
    if retry:
        again = run_suite(suite, flavour, "fastnet", workdir, only=retry, tag="-again")
        for t in retry:
            if again.results.get(t, {}).get("outcome") in PASSING:
                flaky[t] = candidates.pop(t)
    regressions, known = {}, {}
    for t, rec in candidates.items():
        k = known_difference(suite, t, rec)
        if k is not None:
            known[t] = (rec, k)
        else:
            regressions[t] = rec
    control_failures = {t: r for t, r in control.results.items() if r["outcome"] not in PASSING + ("skip",)}
    return Comparison(control, fast, regressions, known, flaky, control_failures)


def _selected_runs(session):
    here = os.path.abspath(__file__)
    runs = []
    for item in session.items:
        if os.path.abspath(str(item.fspath)) == here and hasattr(item, "callspec"):
            r = item.callspec.params.get("run")
            if r is not None and r not in runs:
                runs.append(r)
    return runs


@pytest.fixture(scope="module")
def comparisons(request, tmp_path_factory):
    """Every selected run, control and fastnet, JOBS at a time; then the confirmations."""
    missing = [m for m in ("test._test_multiprocessing", "test.test_socketserver") if importlib.util.find_spec(m) is None]
    if missing:
        # Some distributions package CPython's tests apart (Debian: libpython3.X-testsuite).
        msg = f"this interpreter ships without CPython's own tests ({', '.join(missing)})"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    workdir = str(tmp_path_factory.mktemp("cpython_suite"))
    runs = _selected_runs(request.session) or RUNS
    with concurrent.futures.ThreadPoolExecutor(max_workers=JOBS) as pool:
        futs = {(s, f, impl): pool.submit(run_suite, s, f, impl, workdir)
                for s, f in runs for impl in ("stdlib", "fastnet")}
        done = {key: fut.result() for key, fut in futs.items()}
    # Confirmations run one after another, so that each test really runs alone.
    return {(s, f): confirm(s, f, done[s, f, "stdlib"], done[s, f, "fastnet"], workdir) for s, f in runs}


def _describe(test, rec):
    sub = f" [{rec['subtest']}]" if rec.get("subtest") else ""
    where = f" ({rec['where']})" if rec.get("where") else ""
    return f"  {test}{sub}: {rec['outcome']}: {rec.get('error', '')}{where}"


@pytest.mark.parametrize("run", RUNS, ids=[f"{s}-{f}" if f else s for s, f in RUNS])
def test_no_regressions_against_the_stdlib(comparisons, run):
    cmp_ = comparisons[run]
    suite, flavour = run
    ctl, fast = cmp_.control, cmp_.fastnet

    # The runs really ran what they claim: CPython's tests, the stdlib's classes
    # in the control, fastnet's (of the kernel set pytest runs on) in the other.
    assert ctl.header, f"the control run never started:\n{ctl.stderr_tail}"
    assert fast.header, f"fastnet's run never started:\n{fast.stderr_tail}"
    assert ctl.header["listener"] == "multiprocessing.connection.Listener"
    assert fast.header["listener"] == "fastnet.connection.Listener"
    assert fast.header["backend"] == fastnet.backend
    assert fast.header["fastnet"] == os.path.abspath(fastnet.__file__)
    assert fast.header["python"] == sys.version.split()[0]
    passed = collections.Counter(t.split(".")[0] for t, r in ctl.results.items() if r["outcome"] in PASSING)
    idle = [c for c in ctl.header["classes"] if not passed[c]]
    assert not idle, f"the control passed no test of {idle}: the harness selects nothing there"

    for t, rec in cmp_.flaky.items():
        warnings.warn(f"{suite}{' ' + flavour if flavour else ''}: {t} failed in the full run and passed alone: "
                      f"{rec.get('error', '')}", stacklevel=1)
    lines = [_describe(t, r) for t, r in sorted(cmp_.regressions.items())]
    report = (f"{suite}{' ' + flavour if flavour else ''} on Python {fast.header['python']}, fastnet backend {fast.header['backend']}: "
              f"{len(cmp_.regressions)} of the {sum(1 for r in ctl.results.values() if r['outcome'] in PASSING)} "
              f"tests that pass on the stdlib fail on fastnet"
              + (f"; socketserver names fastnet.server lacks: {fast.header['missing']}"
                 if suite == "socketserver" and fast.header.get("missing") else "") + "\n" + "\n".join(lines))
    if cmp_.regressions:
        pytest.fail(report, pytrace=False)


def test_known_differences_name_real_tests(comparisons):
    """Each entry of KNOWN_DIFFERENCES names tests that exist and pass in the control."""
    seen = collections.defaultdict(set)
    for (suite, _), cmp_ in comparisons.items():
        for t, r in cmp_.control.results.items():
            if r["outcome"] in PASSING:
                seen[suite].add(t)
    for k in KNOWN_DIFFERENCES:
        if not any(suite == k.suite for suite, _ in comparisons):
            continue
        assert any(fnmatch.fnmatchcase(t, k.test) for t in seen[k.suite]), \
            f"KNOWN_DIFFERENCES entry {k.test!r} matches no test the stdlib passes in {k.suite}"
        assert k.reason.startswith(("depends on CPython internals: ", "harness artefact: "))
