"""Running the cases: process pairs, CPU placement, time limits, the report dict."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from . import _load
from .cases import (CASES, FAMILIES, GROUPS, NOT_RUN_ANCHORS, NOT_RUN_QUICK, PROFILES, REFERENCE, _case_families,
                    _in_quick)
from .common import PAYLOAD_SIZE, NotAvailable, _addr
from .floor import build_floor, floor_commands
from .report import _fmt, _targets


def _package_root() -> Any:
    """The directory that holds the fastnet package this file belongs to."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _child_env(impl: Any) -> Any:
    env = dict(os.environ)
    # Each row says which kernels it runs, whatever the caller's environment.
    env.pop("FASTNET_PURE", None)
    if impl.pure:
        env["FASTNET_PURE"] = "1"
    root = _package_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class _Server:
    """A server child; reads its stdout on a thread so READY can time out."""

    def __init__(self, cmd: Any, env: Any, cwd: Any, errpath: Any) -> None:
        self.errfile = open(errpath, "w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.errfile,
                                     stdin=subprocess.DEVNULL, env=env, cwd=cwd, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]  # stdout=PIPE
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def first_line(self, timeout: Any) -> Any:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def remaining(self) -> list[str]:
        out: list[str] = []
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return out
            if line is not None:
                out.append(line)

    def stderr_tail(self, n: int = 400) -> Any:
        self.errfile.flush()
        self.errfile.seek(0)
        return self.errfile.read()[-n:].strip()

    def stop(self, grace: Any) -> None:
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.thread.join(timeout=5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.stop(grace=0)
        else:
            self.thread.join(timeout=5)     # the pump reads stdout to its end first
        if not self.thread.is_alive():
            self.proc.stdout.close()  # type: ignore[union-attr]  # stdout=PIPE
        self.errfile.close()


@contextlib.contextmanager
def _pinned(cpus: Any) -> Any:
    """Spawn children inside this block on ``cpus`` (they inherit the mask)."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def _placement(pin: Any) -> Any:
    """(server cpus, client cpus) for ``pin``: none, same or split.

    Where the two processes run dominates small-message latency on a VM
    whose idle vCPUs halt: a wake-up across CPUs can cost tens of µs, one on
    the same CPU a few µs.  ``none`` leaves it to the scheduler."""
    if pin == "none" or not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if pin == "same" or len(cpus) < 2:
        return {cpus[-1]}, {cpus[-1]}
    return {cpus[-2]}, {cpus[-1]}


# A child loads this package by file path (``_load.py``), not by importing
# fastnet, so the anchor rows run even when fastnet itself does not import.
_BOOT = (
    "import importlib.util, sys\n"
    "s = importlib.util.spec_from_file_location('_fastnet_bench_load', sys.argv[1])\n"
    "m = importlib.util.module_from_spec(s)\n"
    "s.loader.exec_module(m)\n"
    "m.load('child').main(sys.argv[2])\n"
)


def _python_cmd(spec: dict[str, Any]) -> Any:
    return [sys.executable, "-c", _BOOT, _load.__file__, json.dumps(spec)]


class _Runner:
    def __init__(self, cfg: Any, workdir: Any) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.authkey = os.urandom(32).hex()
        self.counter = 0
        self.floor = None
        self.floor_error = None

    def spec(self, case: Any, impl: Any, family: Any, role: Any) -> Any:
        self.counter += 1
        cfg = self.cfg
        return {
            "case": case, "impl": impl.role, "role": role, "family": family,
            "path": os.path.join(self.workdir, f"s{self.counter}.sock"),
            "size": cfg["size"], "warmup": cfg["warmup"], "sample": cfg["sample"],
            "repeat": cfg["repeat"], "batch": cfg["batch"],
            "nbytes": int(cfg["bulk_mib"] * 2 ** 20) // 8 * 8,
            "bulk_warmup": cfg["bulk_warmup"], "conns": cfg["conns"],
            "authkey": self.authkey, "backend": impl.backend,
        }

    def commands(self, case: Any, impl: Any, family: Any) -> Any:
        """Return (server_cmd, client_cmd(address)) or raise NotAvailable."""
        if impl.kind == "c":
            if self.floor is None and self.floor_error is None:
                self.floor, self.floor_error = build_floor(self.workdir)
            if self.floor_error:
                raise NotAvailable(self.floor_error)
            self.counter += 1
            path = os.path.join(self.workdir, f"c{self.counter}.sock")
            return floor_commands(self.floor, family, path, self.cfg)
        sspec = self.spec(case, impl, family, "server")
        cspec = dict(sspec, role="client")

        def client(address: Any) -> Any:
            return _python_cmd(dict(cspec, address=address))
        return _python_cmd(sspec), client

    def pair(self, case: Any, impl: Any, family: Any) -> Any:
        """Run one server/client pair; return {"samples", "info"} or {"na"}."""
        try:
            server_cmd, client_cmd = self.commands(case, impl, family)
        except NotAvailable as exc:
            return {"na": str(exc)}
        env = _child_env(impl)
        self.counter += 1
        errpath = os.path.join(self.workdir, f"server{self.counter}.err")
        server_cpus, client_cpus = _placement(self.cfg["pin"])
        with _pinned(server_cpus):
            srv = _Server(server_cmd, env, self.workdir, errpath)
        timeout = self.cfg["timeout"]
        try:
            line = srv.first_line(timeout=min(timeout, 60.0))
            if line is None:
                srv.proc.kill()
                return {"na": "error: server did not start: " + (srv.stderr_tail() or "no output")}
            if line.startswith("NA "):
                return {"na": line[3:]}
            if not line.startswith("READY "):
                srv.proc.kill()
                return {"na": f"error: server said {line[:200]!r}"}
            address = json.loads(line[6:])
            try:
                with _pinned(client_cpus):
                    client = subprocess.Popen(client_cmd(address), stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                              text=True, env=env, cwd=self.workdir)
                proc = _Finished(client, timeout)
            except subprocess.TimeoutExpired:
                srv.proc.kill()
                return {"na": f"error: timed out after {timeout:g} s"}
            out_lines = proc.stdout.strip().splitlines()
            result = None
            if out_lines:
                try:
                    result = json.loads(out_lines[-1])
                except ValueError:
                    result = None
            if proc.returncode != 0 or result is None:
                srv.stop(grace=2.0)
                for extra in srv.remaining():
                    if extra.startswith("NA "):
                        return {"na": extra[3:]}
                # The side that failed first explains it best; a dead server
                # usually leaves the client with only a broken connection.
                why = (_last_error(srv.stderr_tail()) if srv.proc.returncode else "") \
                    or _last_error(proc.stderr) or _last_error(srv.stderr_tail()) \
                    or f"client exit status {proc.returncode}"
                return {"na": "error: " + why}
            srv.stop(grace=10.0)
            if srv.proc.returncode:
                return {"na": "error: server: " + (_last_error(srv.stderr_tail())
                                                   or f"exit status {srv.proc.returncode}")}
            return result
        finally:
            srv.close()
            with contextlib.suppress(OSError):
                os.unlink(errpath)


class _Finished:
    """The outcome of a client child, killed if it outlives ``timeout``."""

    def __init__(self, popen: Any, timeout: Any) -> None:
        try:
            self.stdout, self.stderr = popen.communicate(timeout=timeout)
        except BaseException:  # a timeout or Ctrl-C must not leave the child running
            popen.kill()
            popen.communicate()
            raise
        self.returncode = popen.returncode


def _last_error(text: Any) -> Any:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _machine() -> Any:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    versions = {"python": platform.python_version()}
    for mod in ("numpy", "msgpack", "zmq", "uvloop", "Pyro5", "rpyc"):
        with contextlib.suppress(Exception):
            m = __import__(mod)
            v = getattr(m, "__version__", None)
            if isinstance(v, tuple):
                v = ".".join(map(str, v))
            if v is None and mod == "msgpack":
                v = ".".join(map(str, m.version))
            versions[mod] = str(v)
            if mod == "zmq":
                versions["libzmq"] = m.zmq_version()
    return {
        "platform": platform.platform(), "machine": platform.machine(),
        "cpu": cpu, "cpus": os.cpu_count(), "versions": versions,
    }


def run(cases: Iterable[str] | None = None, *, quick: bool = False, families: Sequence[str] = ("tcp", "unix"),
        anchors_only: bool = False, progress: Callable[[str], object] | None = None,
        total: Callable[[int], object] | None = None, **overrides: Any) -> dict[str, Any]:
    """Run the comparison and return the report dict.

    ``cases``: names from ``CASES`` (default all); ``anchors_only`` skips
    the fastnet rows.  ``overrides`` replace the
    profile's settings: rounds, repeat, warmup, sample, bulk_mib, bulk_warmup,
    timeout, batch, size, conns (echo connections), pin ("none", "same" or "split": where the two
    processes of a pair run).  ``progress(text)`` is called after every pair,
    ``total(n)`` once before the first with the number of pairs at most run.
    """
    cases = [c for name in (cases or CASES) for c in GROUPS.get(name, [name])]
    for name in cases:
        if name not in CASES:
            raise ValueError(f"unknown case {name!r}; choose from {', '.join([*CASES, *GROUPS])}")
    for fam in families:
        if fam not in FAMILIES:
            raise ValueError(f"unknown family {fam!r}; choose from {', '.join(FAMILIES)}")
    cfg: dict[str, Any] = dict(PROFILES["quick" if quick else "full"], batch=128, size=PAYLOAD_SIZE, pin="none")
    for key, value in overrides.items():
        if key not in cfg:
            raise TypeError(f"run() got an unexpected setting {key!r}")
        if value is not None:
            cfg[key] = value

    started = time.time()
    results: dict[str, Any] = {c: {f: {i.key: {"samples": [], "na": None, "info": {}}
                       for i in CASES[c]["impls"]} for f in _case_families(c, families)} for c in cases}
    if total is not None:
        total(cfg["rounds"] * sum(len(CASES[c]["impls"]) * len(_case_families(c, families)) for c in cases))
    with tempfile.TemporaryDirectory(prefix="fnb-") as workdir:
        runner = _Runner(cfg, workdir)
        for rnd in range(cfg["rounds"]):
            for case in cases:
                for family in _case_families(case, families):
                    for impl in CASES[case]["impls"]:
                        slot = results[case][family][impl.key]
                        if slot["na"]:
                            continue
                        if anchors_only and not impl.anchor:
                            slot["na"] = NOT_RUN_ANCHORS
                            continue
                        if quick and not _in_quick(case, family, impl):
                            slot["na"] = NOT_RUN_QUICK
                            continue
                        out = runner.pair(case, impl, family)
                        if "na" in out:
                            slot["na"] = out["na"]
                            slot["samples"] = []
                        else:
                            slot["samples"].extend(out["samples"])
                            slot["info"] = out.get("info", {})
                        if progress:
                            progress(_progress_line(rnd, cfg["rounds"], case, family, impl, slot, out))

    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(time.time() - started, 1),
        "machine": _machine(),
        "config": dict(cfg, quick=quick, families=list(families), cases=cases,
                       anchors_only=anchors_only),
        "results": {},
        "targets": [],
    }
    for case in cases:
        spec = CASES[case]
        report["results"][case] = {}
        for family in _case_families(case, families):
            rows = {}
            for impl in spec["impls"]:
                slot = results[case][family][impl.key]
                med = statistics.median(slot["samples"]) if slot["samples"] and not slot["na"] else None
                rows[impl.key] = {
                    "label": impl.label, "anchor": impl.anchor, "unit": spec["json_unit"],
                    "median": med, "samples": slot["samples"] if med is not None else [],
                    "na": slot["na"], "info": slot["info"],
                    "reference": REFERENCE.get((case, family, impl.key)),
                }
            report["results"][case][family] = rows
    report["targets"] = _targets(report, cases, families)
    return report


def _progress_line(rnd: Any, rounds: Any, case: Any, family: Any, impl: Any, slot: Any, out: Any) -> str:
    unit = CASES[case]["unit"]
    if "na" in out:
        shown = "n/a: " + out["na"]
    else:
        shown = f"{_fmt(statistics.median(out['samples']))} {unit}"
    return f"[{rnd + 1}/{rounds}] {case:9s} {FAMILIES[family]:7s} {impl.label:32s} {shown}"


@contextlib.contextmanager
def serve(case: str, impl: str, family: str, *, size: int = PAYLOAD_SIZE, nbytes: int = 8 << 20,
          authkey: bytes | None = None, start_timeout: float = 30.0) -> Iterator[Any]:
    """Start the benchmark server for ``(case, impl)`` in a child process.

    Yields its address (a ``(host, port)`` tuple or a path).  Raises
    ``NotAvailable`` when the server reports a missing feature.  The child
    inherits the caller's environment, so FASTNET_PURE carries over."""
    with tempfile.TemporaryDirectory(prefix="fnb-") as workdir:
        spec = {
            "case": case, "impl": impl, "role": "server", "family": family,
            "path": os.path.join(workdir, "s.sock"), "size": size, "nbytes": nbytes,
            "authkey": (authkey or b"").hex(), "backend": None,
        }
        env = dict(os.environ)
        root = _package_root()
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        srv = _Server(_python_cmd(spec), env, workdir, os.path.join(workdir, "server.err"))
        try:
            line = srv.first_line(timeout=start_timeout)
            if line and line.startswith("NA "):
                raise NotAvailable(line[3:])
            if not line or not line.startswith("READY "):
                srv.proc.kill()
                raise RuntimeError("benchmark server did not start: "
                                   + (srv.stderr_tail() or repr(line)))
            yield _addr(json.loads(line[6:]))
        finally:
            srv.stop(grace=5.0)
            srv.close()
