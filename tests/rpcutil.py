"""What tests/test_rpc.py and the RPC server processes it starts share.

``build(address, **kw)`` makes an RPCServer exposing the functions below, in
this process or in another one: ``python tests/rpcutil.py CONFIG_JSON``
builds it there, prints ``READY <address as JSON>`` and serves until
SIGTERM (a graceful shutdown) or SIGKILL.
"""
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fastnet  # noqa: E402
from fastnet.rpc import blocking  # noqa: E402

WAIT = 30.0   # generous deadline for what should take milliseconds


class CallLog:
    """The calls a server saw, in order: proof of what ran, and how often."""

    def __init__(self):
        self.lock = threading.Lock()
        self.tags = []

    def record(self, tag):
        with self.lock:
            self.tags.append(tag)
            return len(self.tags)

    def snapshot(self):
        with self.lock:
            return list(self.tags)


#: set when a server process stops serving: parked calls return then
released = threading.Event()


def build(address, **kw):
    """An RPCServer with the standard test functions registered."""
    srv = fastnet.RPCServer(address, **kw)
    log = CallLog()
    srv.call_log = log

    @srv.register
    def echo(x):
        "Return x unchanged."
        return x

    @srv.register
    def add(x, y):
        "Add two numbers."
        return x + y

    @srv.register
    def ident(i):
        """A result naming its argument, to match replies to calls."""
        return ["reply", i, i * 7 + 1]

    @srv.register
    def kw(a, b=2, *, c=3):
        return [a, b, c]

    @srv.register
    def pid():
        return os.getpid()

    @srv.register
    @blocking
    def blocking_pid():
        time.sleep(0.01)
        return os.getpid()

    @srv.register
    def count(tag):
        """Record tag in the call log; return how many calls were recorded."""
        return log.record(tag)

    @srv.register
    def calls():
        return log.snapshot()

    @srv.register(blocking=True)
    def park(tag):
        """Record tag, then sit on a worker thread (a call that is still pending)."""
        log.record(tag)
        released.wait(120)
        return tag

    @srv.register(blocking=True)
    def sleep(t):
        log.record("sleep start")
        time.sleep(t)
        log.record("sleep end")
        return t

    @srv.register
    def fail(message):
        raise ValueError(message)

    @srv.register
    def blob(n):
        return b"\x00\xff" * n

    return srv


def main():
    cfg = json.loads(sys.argv[1])
    address = cfg.pop("address")
    if isinstance(address, list):
        address = tuple(address)
    elif not address.startswith("\0") and os.path.exists(address):
        os.unlink(address)       # a killed predecessor's socket file
    if "authkey" in cfg:
        cfg["authkey"] = cfg["authkey"].encode()
    srv = build(address, **cfg)
    print("READY " + json.dumps(srv.address), flush=True)
    try:
        srv.serve_forever()      # SIGTERM / SIGINT: graceful shutdown
    finally:
        released.set()
    srv.server_close()
    print("STOPPED", flush=True)


# -- used by the tests -------------------------------------------------------------------


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def readline(proc, timeout=WAIT):
    """One line from a child's stdout without blocking past the deadline."""
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError(f"no line from the child in {timeout} s (got {buf!r})")
        chunk = os.read(fd, 1)
        if not chunk:
            raise AssertionError(f"child closed its stdout (got {buf!r})")
        buf += chunk
    return buf.decode()


class ServerProcess:
    """An RPC server (built by :func:`build`) in a process of its own."""

    def __init__(self, address, **cfg):
        cfg["address"] = list(address) if isinstance(address, tuple) else address
        if isinstance(cfg.get("authkey"), bytes):
            cfg["authkey"] = cfg["authkey"].decode()
        self.cfg = cfg
        # stderr to a file: a pipe nobody reads could fill up and stall the server
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), json.dumps(cfg)],
                                     stdout=subprocess.PIPE, stderr=self.stderr, env=env())
        try:
            line = readline(self.proc)
        except AssertionError as e:
            self.kill()
            raise AssertionError(f"{e}; server stderr: {self.errors()[-2000:]}") from None
        assert line.startswith("READY "), line
        addr = json.loads(line[6:])
        self.address = tuple(addr) if isinstance(addr, list) else addr

    @property
    def pid(self):
        return self.proc.pid

    def errors(self):
        """What the server wrote on stderr so far."""
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)

    def terminate(self):
        """SIGTERM: the server shuts down gracefully; returns its exit status."""
        self.proc.terminate()
        try:
            self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(WAIT)
            raise AssertionError("the server did not stop on SIGTERM")
        return self.proc.returncode

    def close(self):
        self.kill()
        self.proc.stdout.close()
        self.stderr.close()


def wait_for(predicate, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def count_fds():
    import gc
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def segment_mappings():
    """How many mappings of fastnet's memfd segments this process has."""
    with open("/proc/self/maps") as f:
        return sum("memfd:fastnet-shm" in line for line in f)


def free_tcp_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
