"""Run CPython's own tests of multiprocessing.connection and socketserver on fastnet.

This script is the child half of ``tests/test_cpython_suite.py``. It loads
the test code from the running interpreter's own ``test`` package
(``test._test_multiprocessing`` and ``test.test_socketserver``); nothing of
it is copied here. With ``impl`` = ``fastnet`` it first puts fastnet's
classes where a user's code meets the stdlib's (``DROP_INS``), with
``stdlib`` it changes nothing: that run is the control.

The request travels in the environment, because spawn and forkserver
children import this file again as ``__mp_main__`` (without the parent's
argv in the forkserver's case) and must rebuild the same patched world and
the same test classes before they unpickle what the parent sends them::

    FASTNET_CPYTHON_SUITE=<suite>:<flavour>:<impl> python cpython_dropin.py RESULTS

``suite`` is ``multiprocessing`` (``flavour`` a start method: fork, spawn,
forkserver) or ``socketserver`` (``flavour`` empty). One JSON object a line
goes to RESULTS: a header, then ``start`` before and ``end`` after each
test, flushed at once, so that the parent can name a test that hangs, kill
the run and start it again: tests that already have a ``start`` line are not
run again. ``FASTNET_CPYTHON_ONLY`` (a JSON list of ``Class.test`` ids)
limits the run to those tests.
"""
from __future__ import annotations

import json
import multiprocessing
import multiprocessing.connection
import multiprocessing.reduction
import os
import signal
import socketserver
import sys
import traceback
import unittest

ENV = "FASTNET_CPYTHON_SUITE"

# Seconds one test may take before it is interrupted in the main thread.
TEST_TIMEOUT = float(os.environ.get("FASTNET_CPYTHON_TEST_TIMEOUT", "20"))

# _test_multiprocessing's classes that exercise the connection API. The
# BaseTestCase ones run as their "processes" variant (the thread and manager
# variants use multiprocessing.dummy and the managers, which fastnet does
# not replace). Not here: ChallengeResponseTest (only calls private helpers
# of the stdlib module, so it tests nothing of fastnet) and TestFlags (its
# child runs with -E, so it cannot import fastnet).
MP_PROCESS_CLASSES = (
    "_TestConnection", "_TestListener", "_TestListenerClient", "_TestPoll", "_TestPicklingConnections",
)
MP_PLAIN_CLASSES = (
    "OtherTest", "TestWait", "TestInvalidFamily", "TestInvalidHandle", "TestTimeouts", "TestIgnoreEINTR",
)


def _send_handle(conn, handle, destination_pid):
    """``reduction.send_handle`` written with fastnet, as a porting user would."""
    import fastnet
    fastnet.send_fd(conn.fileno(), handle)


def _recv_handle(conn):
    """``reduction.recv_handle`` written with fastnet."""
    import fastnet
    return fastnet.recv_fd(conn.fileno())


def _drop_ins():
    """(module, name, fastnet's replacement or None when fastnet has none)."""
    import fastnet
    import fastnet.auth
    import fastnet.server as fs

    out = [
        (multiprocessing.connection, "Listener", fastnet.Listener),
        (multiprocessing.connection, "Client", fastnet.Client),
        (multiprocessing.connection, "Pipe", fastnet.Pipe),
        (multiprocessing.connection, "wait", fastnet.wait),
        (multiprocessing.connection, "Connection", fastnet.Connection),
        (multiprocessing.connection, "answer_challenge", fastnet.auth.answer_challenge),
        (multiprocessing.connection, "deliver_challenge", fastnet.auth.deliver_challenge),
        (multiprocessing.reduction, "send_handle", _send_handle),
        (multiprocessing.reduction, "recv_handle", _recv_handle),
    ]
    # Every public class socketserver has, fastnet.server's namesake; a name
    # fastnet.server lacks is removed, so a test that uses it fails as the
    # user's import would, instead of quietly running the stdlib's class.
    for name in socketserver.__all__:
        if isinstance(getattr(socketserver, name), type):
            out.append((socketserver, name, getattr(fs, name, None)))
    return out


def install_drop_ins():
    """Put fastnet's classes and functions in place of the stdlib's."""
    missing = []
    for module, name, new in _drop_ins():
        if new is None:
            missing.append(f"{module.__name__}.{name}")
            if hasattr(module, name):
                delattr(module, name)
        else:
            setattr(module, name, new)
    return missing


def _request():
    suite, flavour, impl = os.environ[ENV].split(":")
    if suite not in ("multiprocessing", "socketserver") or impl not in ("fastnet", "stdlib"):
        raise SystemExit(f"bad {ENV}: {os.environ[ENV]!r}")
    return suite, flavour, impl


SUITE, FLAVOUR, IMPL = _request()
# Quiet, as under regrtest; test_socketserver copies the flag at import.
import test.support  # noqa: E402
test.support.verbose = 0
MISSING = install_drop_ins() if IMPL == "fastnet" else []

if SUITE == "multiprocessing":
    import inspect

    import test._test_multiprocessing as _tmp

    def _install():
        # install_tests_in_module_dict builds the per-flavour classes (and the
        # setUpModule that sets the start method) as test_multiprocessing_fork
        # and friends do; here into a scratch dict, from which the selected
        # classes are copied into this module, where spawn and forkserver
        # children find them by name.
        scratch = {"__name__": __name__}
        kwargs = {}
        if "only_type" in inspect.signature(_tmp.install_tests_in_module_dict).parameters:
            kwargs["only_type"] = None
        _tmp.install_tests_in_module_dict(scratch, FLAVOUR, **kwargs)
        names = ["WithProcesses" + n[1:] for n in MP_PROCESS_CLASSES]
        names += [n for n in MP_PLAIN_CLASSES if n in scratch]
        selected = [scratch[n] for n in names if n in scratch]
        g = globals()
        for cls in selected:
            g[cls.__name__] = cls
        g["setUpModule"] = scratch["setUpModule"]
        g["tearDownModule"] = scratch["tearDownModule"]
        return selected

    TEST_CLASSES = _install()
else:
    import test.test_socketserver as _tss

    TEST_CLASSES = [obj for obj in vars(_tss).values()
                    if isinstance(obj, type) and issubclass(obj, unittest.TestCase)
                    and obj.__module__ == _tss.__name__]


class _Hung(BaseException):
    """Raised in the main thread when a test runs past TEST_TIMEOUT."""


def _on_alarm(signum, frame):
    raise _Hung(f"test still running after {TEST_TIMEOUT:g} s (interrupted by the harness)")


def short_id(test):
    """'Class.method' for a test, or unittest's description of a fixture error."""
    tid = test.id()
    parts = tid.split(".")
    if len(parts) >= 2 and parts[-1].startswith("test"):
        return ".".join(parts[-2:])
    return tid.replace("__main__", "module").replace("__mp_main__", "module")


def summarize(exc_info):
    """The exception's first line, where the test called in and where it was raised."""
    etype, value, tb = exc_info
    frames = [f for f in traceback.extract_tb(tb) if "/unittest/" not in f.filename]
    test_side = [f for f in frames if os.path.basename(f.filename).startswith(("_test_", "test_"))]
    where = [f"{os.path.basename(f.filename)}:{f.lineno}" for f in (test_side[-1:] + frames[-1:])]
    text = "".join(traceback.format_exception_only(etype, value)).strip().splitlines()
    return {"error": (text[0] if text else etype.__name__)[:400],
            "where": " -> ".join(dict.fromkeys(where)),
            "traceback": "".join(traceback.format_exception(etype, value, tb))[-3000:]}


class JsonResult(unittest.TestResult):
    """Writes one line per test event; the parent reads them as they come."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.current = None

    def _write(self, **rec):
        self.out.write(json.dumps(rec) + "\n")
        self.out.flush()

    def startTest(self, test):
        super().startTest(test)
        tid = short_id(test)
        self.current = {"event": "end", "test": tid, "outcome": "pass"}
        self._write(event="start", test=tid)
        signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT)

    def stopTest(self, test):
        signal.setitimer(signal.ITIMER_REAL, 0)
        super().stopTest(test)
        if self.current is not None:
            self._write(**self.current)
        self.current = None

    def _outcome(self, test, outcome, err=None, **extra):
        rec = self.current
        if rec is None:     # a module or class fixture, outside any test
            rec = {"event": "end", "test": short_id(test)}
            self._write(**rec, outcome=outcome, **(summarize(err) if err else {}), **extra)
            return
        if rec["outcome"] in ("pass", "skip", "expected_failure"):
            rec["outcome"] = outcome
            rec.update(summarize(err) if err else {})
        rec.update(extra)

    def addError(self, test, err):
        super().addError(test, err)
        self._outcome(test, "hung" if issubclass(err[0], _Hung) else "error", err)

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._outcome(test, "fail", err)

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            kind = "fail" if issubclass(err[0], test.failureException) else "error"
            self._outcome(subtest, kind, err, subtest=subtest._subDescription())

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._outcome(test, "skip", reason=reason)

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._outcome(test, "expected_failure")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._outcome(test, "unexpected_success")


def _already_started(path):
    started = set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:      # a line cut short by a kill
                    continue
                if rec.get("event") == "start":
                    started.add(rec["test"])
    return started


def _flatten(suite):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from _flatten(t)
        else:
            yield t


def main(path):
    import fastnet
    signal.signal(signal.SIGALRM, _on_alarm)
    skip = _already_started(path)
    only = os.environ.get("FASTNET_CPYTHON_ONLY")
    only = set(json.loads(only)) if only else None
    loader = unittest.TestLoader()
    tests = [t for cls in TEST_CLASSES for t in _flatten(loader.loadTestsFromTestCase(cls))
             if short_id(t) not in skip and (only is None or short_id(t) in only)]
    with open(path, "a") as out:
        out.write(json.dumps({
            "event": "header", "suite": SUITE, "flavour": FLAVOUR, "impl": IMPL,
            "python": sys.version.split()[0], "backend": fastnet.backend,
            "fastnet": os.path.abspath(fastnet.__file__),
            "listener": f"{multiprocessing.connection.Listener.__module__}.Listener",
            "missing": MISSING, "classes": [c.__name__ for c in TEST_CLASSES],
            "tests": len(tests),
        }) + "\n")
        out.flush()
        result = JsonResult(out)
        unittest.TestSuite(tests).run(result)
        out.write(json.dumps({"event": "finished"}) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
