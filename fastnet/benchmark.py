"""Comparison benchmarks: fastnet side by side with its anchors, in one run.

Every case runs in fresh child processes, a server and a client talking over
loopback (TCP or AF_UNIX).  The client warms up, picks an iteration count that
lasts about ``sample`` seconds, times ``repeat`` samples and prints them; the
parent takes the median over all samples of all rounds.  Rounds go round-robin
over the implementations so that a noisy neighbour hurts them all alike.

Cases (64-byte payloads unless said):

* ``pingpong``  round trip, µs: the C floor (one write + one read per message,
  ``_floor.c``), multiprocessing.connection, pyzmq REQ/REP, fastnet compiled
  and pure (``FASTNET_PURE=1``).
* ``stream``    one-way messages, msg/s, the receiver counting and checking
  every one: multiprocessing, pyzmq PUSH/PULL, fastnet ``send_bytes`` and the
  batched ``send_many``/``recv_many``, compiled and pure.
* ``bulk``      a float64 array, GB/s: plain ``sendall(memoryview)`` /
  ``recv_into``, multiprocessing ``send_bytes`` and ``send(arr)``, pyzmq
  ``copy=False``, fastnet ``send_array``/``recv_array(out=)``.
* ``handshake`` connect + mutual authkey handshake + one message echoed +
  close, per second: multiprocessing vs fastnet.

A fastnet feature that is missing shows as ``n/a`` with the reason; a child
that fails shows as ``n/a`` with its error.  No number is ever filled in.

Where the two processes run matters more than anything else for pingpong on
a VM whose idle vCPUs halt: ``--pin same`` puts both on one CPU (the cost of
the code path), ``--pin split`` one on each (the cost of cross-CPU wake-ups),
the default leaves it to the scheduler.  The report records the choice.

``main(argv)`` is the ``fastnet bench`` command; ``run(...)`` returns the
report as a dict (the ``--json`` document) and ``format_report`` renders it.
``serve(...)`` starts one benchmark server child; ``bench/`` uses it.

The children load this file by path rather than importing the ``fastnet``
package, so the anchor cases run even when fastnet itself does not import.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

__all__ = ["CASES", "run", "main", "format_report", "serve", "NotAvailable"]

PAYLOAD_SIZE = 64
CTRL_STOP = b"N0"

# The anchors issue #2 measured on the project's 2-core machine, shown next to
# this run's anchors so that a reader sees whether the machine is comparable.
ISSUE_ANCHORS = {
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
}


class NotAvailable(Exception):
    """A case cannot run here (missing package or fastnet feature)."""


# --------------------------------------------------------------------------
# Child side: the servers and clients.  Everything here runs in a child.
# --------------------------------------------------------------------------

def _ready(address):
    print("READY " + json.dumps(address), flush=True)


def _addr(address):
    # JSON turns the (host, port) tuple into a list; Listener/Client want a tuple.
    return tuple(address) if isinstance(address, list) else address


def _listen_address(spec):
    return ("127.0.0.1", 0) if spec["family"] == "tcp" else spec["path"]


def _fastnet(spec):
    try:
        import fastnet
    except Exception as exc:  # a half-built package must not crash the runner
        raise NotAvailable(f"import fastnet failed: {type(exc).__name__}: {exc}")
    want = spec.get("backend")
    got = getattr(fastnet, "backend", None)
    if want and got != want:
        raise NotAvailable(f"fastnet.backend is {got!r}, this case needs {want!r}")
    _need(fastnet, "Listener", "Client")
    return fastnet


def _need(obj, *names):
    for name in names:
        if not hasattr(obj, name):
            owner = getattr(obj, "__name__", type(obj).__name__)
            raise NotAvailable(f"{owner}.{name} is missing")


def _conn_module(spec):
    if spec["impl"].startswith("mp"):
        import multiprocessing.connection as mpc
        return mpc
    return _fastnet(spec)


def _zmq():
    try:
        import zmq
    except ImportError:
        raise NotAvailable("pyzmq is not installed")
    return zmq


def _numpy():
    try:
        import numpy
    except ImportError:
        raise NotAvailable("numpy is not installed")
    return numpy


def _zmq_bind(sock, spec, suffix=""):
    if spec["family"] == "tcp":
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        return f"tcp://127.0.0.1:{port}"
    url = f"ipc://{spec['path']}{suffix}"
    sock.bind(url)
    return url


def _zmq_close(ctx, *socks):
    for s in socks:
        s.close(linger=0)
    ctx.term()


def _accept_one(spec, mod, ready, **kw):
    listener = mod.Listener(_listen_address(spec), **kw)
    ready(listener.address)
    conn = listener.accept()
    listener.close()
    return conn


def _calibrate(step, spec, start, minimum):
    """Warm up with step(k) in growing chunks for ``warmup`` seconds; return
    the count that lasts about ``sample`` seconds."""
    done, spent, k = 0, 0.0, start
    while spent < spec["warmup"] or done == 0:
        spent += step(k)
        done += k
        k = min(k * 2, start * 1024)
    return max(minimum, int(spec["sample"] * done / max(spent, 1e-9)))


def _samples(step, spec, start, minimum, per):
    n = _calibrate(step, spec, start, minimum)
    return {"samples": [per(step(n), n) for _ in range(spec["repeat"])],
            "info": {"iterations": n}}


def _us_per_op(t, n):
    return t / n * 1e6


def _per_second(t, n):
    return n / t


# ---- pingpong ----

def _pingpong_conn_server(spec, ready):
    mod = _conn_module(spec)
    conn = _accept_one(spec, mod, ready)
    send, recv = conn.send_bytes, conn.recv_bytes
    try:
        while True:
            send(recv())
    except EOFError:
        pass
    conn.close()


def _pingpong_conn_client(spec, address):
    mod = _conn_module(spec)
    conn = mod.Client(_addr(address))
    payload = b"p" * spec["size"]
    send, recv = conn.send_bytes, conn.recv_bytes
    send(payload)
    if recv() != payload:
        raise ValueError("echo mismatch")

    def step(k):
        t0 = time.perf_counter()
        for _ in range(k):
            send(payload)
            recv()
        return time.perf_counter() - t0

    out = _samples(step, spec, 64, 100, _us_per_op)
    out["info"]["backend"] = getattr(mod, "backend", None)
    conn.close()
    return out


def _pingpong_zmq_server(spec, ready):
    zmq = _zmq()
    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    ready(_zmq_bind(rep, spec))
    recv, send = rep.recv, rep.send
    while True:
        msg = recv()
        send(msg)
        if msg == b"STOP":
            break
    _zmq_close(ctx, rep)


def _pingpong_zmq_client(spec, address):
    zmq = _zmq()
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.connect(address)
    payload = b"p" * spec["size"]
    send, recv = req.send, req.recv
    send(payload)
    if recv() != payload:
        raise ValueError("echo mismatch")

    def step(k):
        t0 = time.perf_counter()
        for _ in range(k):
            send(payload)
            recv()
        return time.perf_counter() - t0

    out = _samples(step, spec, 64, 100, _us_per_op)
    send(b"STOP")
    recv()
    _zmq_close(ctx, req)
    return out


# ---- stream ----
# Per sample the sender announces n (b"N<n>"), waits for b"G", sends n
# messages and waits for b"D"; only the last two steps are timed.  b"N0" ends.

def stream_payload(size):
    """The message every stream sender sends and every receiver expects."""
    return b"s" * size


def _check_frames(frames, expected):
    for m in frames:
        if m != expected:
            raise ValueError(f"stream: bad message {bytes(m)[:16]!r}...")


def _stream_conn_server(spec, ready):
    mod = _conn_module(spec)
    conn = _accept_one(spec, mod, ready)
    batched = "batch" in spec["impl"]
    if batched:
        _need(conn, "recv_many")
    expected = stream_payload(spec["size"])
    recv = conn.recv_bytes
    while True:
        try:
            ctrl = recv()
        except EOFError:
            break
        n = int(ctrl[1:])
        if n == 0:
            break
        conn.send_bytes(b"G")
        if batched:
            recv_many = conn.recv_many
            got = 0
            while got < n:
                frames = recv_many()
                _check_frames(frames, expected)
                got += len(frames)
            if got != n:
                raise ValueError(f"stream: {got} messages where {n} were sent")
        else:
            for _ in range(n):
                if recv() != expected:
                    raise ValueError("stream: bad message")
        conn.send_bytes(b"D")
    conn.close()


def stream_sender(conn, payload, batch=0):
    """Return ``burst(n) -> seconds`` for a connection to a stream server.

    With ``batch`` > 0 the messages go out ``batch`` at a time through
    ``conn.send_many``."""
    send, recv = conn.send_bytes, conn.recv_bytes
    if batch:
        send_many = conn.send_many
        chunk = [payload] * batch

    def burst(n):
        send(b"N%d" % n)
        if recv() != b"G":
            raise ValueError("stream: bad go")
        t0 = time.perf_counter()
        if batch:
            full, rest = divmod(n, batch)
            for _ in range(full):
                send_many(chunk)
            if rest:
                send_many(chunk[:rest])
        else:
            for _ in range(n):
                send(payload)
        if recv() != b"D":
            raise ValueError("stream: bad done")
        return time.perf_counter() - t0

    return burst


def _stream_conn_client(spec, address):
    mod = _conn_module(spec)
    if "nagle" in spec["impl"]:
        # Nagle's algorithm on, as multiprocessing leaves it: the kernel coalesces small sends
        conn = mod.Client(_addr(address), nodelay=False)
    else:
        conn = mod.Client(_addr(address))
    batch = spec["batch"] if "batch" in spec["impl"] else 0
    if batch:
        _need(conn, "send_many")
    burst = stream_sender(conn, stream_payload(spec["size"]), batch)
    out = _samples(burst, spec, 1000, 1000, _per_second)
    out["info"]["backend"] = getattr(mod, "backend", None)
    if batch:
        out["info"]["batch"] = batch
    conn.send_bytes(CTRL_STOP)
    conn.close()
    return out


def _stream_zmq_server(spec, ready):
    zmq = _zmq()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    ready({"data": _zmq_bind(pull, spec, ".data"), "ack": _zmq_bind(push, spec, ".ack")})
    expected = stream_payload(spec["size"])
    recv = pull.recv
    while True:
        n = int(recv()[1:])
        if n == 0:
            break
        push.send(b"G")
        for _ in range(n):
            if recv() != expected:
                raise ValueError("stream: bad message")
        push.send(b"D")
    _zmq_close(ctx, pull, push)


def _stream_zmq_client(spec, address):
    zmq = _zmq()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    pull = ctx.socket(zmq.PULL)
    push.connect(address["data"])
    pull.connect(address["ack"])
    payload = stream_payload(spec["size"])
    send, recv = push.send, pull.recv

    def burst(n):
        send(b"N%d" % n)
        if recv() != b"G":
            raise ValueError("stream: bad go")
        t0 = time.perf_counter()
        for _ in range(n):
            send(payload)
        if recv() != b"D":
            raise ValueError("stream: bad done")
        return time.perf_counter() - t0

    out = _samples(burst, spec, 1000, 1000, _per_second)
    send(CTRL_STOP)
    _zmq_close(ctx, push, pull)
    return out


# ---- bulk ----
# Per transfer: sender b"B" (b"S" ends), receiver b"G", the array, receiver
# b"A".  The receiver poisons a few elements before each transfer and checks
# them after acknowledging, so a transfer that wrote nothing cannot pass.

_SPOT = 4097


def _poison(np, out):
    out[::_SPOT] = -1.0
    out[-1] = -1.0


def _check_array(np, a, nelem):
    if a.dtype != np.float64 or a.size != nelem:
        raise ValueError(f"bulk: got {a.dtype} x {a.size}, expected float64 x {nelem}")
    a = a.reshape(-1)
    if not np.array_equal(a[::_SPOT], np.arange(0, nelem, _SPOT, dtype=np.float64)) \
            or a[-1] != nelem - 1:
        raise ValueError("bulk: array content differs")


def _bulk_conn_server(spec, ready):
    np = _numpy()
    mod = _conn_module(spec)
    conn = _accept_one(spec, mod, ready)
    impl, nelem = spec["impl"], spec["nbytes"] // 8
    out = np.empty(nelem, dtype=np.float64) if impl == "fastnet" else None
    if impl == "fastnet":
        _need(conn, "recv_array")
    while True:
        try:
            ctrl = conn.recv_bytes()
        except EOFError:
            break
        if ctrl != b"B":
            break
        if out is not None:
            _poison(np, out)
        conn.send_bytes(b"G")
        if impl == "mp-bytes":
            a = np.frombuffer(conn.recv_bytes(), dtype=np.float64)
        elif impl == "mp-pickle":
            a = conn.recv()
        else:
            conn.recv_array(out=out)
            a = out
        conn.send_bytes(b"A")
        _check_array(np, a, nelem)
        del a
    conn.close()


def _bulk_conn_client(spec, address):
    np = _numpy()
    mod = _conn_module(spec)
    conn = mod.Client(_addr(address))
    impl = spec["impl"]
    arr = np.arange(spec["nbytes"] // 8, dtype=np.float64)
    if impl == "mp-bytes":
        send = conn.send_bytes
    elif impl == "mp-pickle":
        send = conn.send
    else:
        _need(conn, "send_array")
        send = conn.send_array

    def transfer():
        conn.send_bytes(b"B")
        if conn.recv_bytes() != b"G":
            raise ValueError("bulk: bad go")
        t0 = time.perf_counter()
        send(arr)
        if conn.recv_bytes() != b"A":
            raise ValueError("bulk: bad ack")
        return time.perf_counter() - t0

    out = _bulk_samples(transfer, spec, arr.nbytes)
    out["info"]["backend"] = getattr(mod, "backend", None)
    conn.send_bytes(b"S")
    conn.close()
    return out


def _bulk_samples(transfer, spec, nbytes):
    for _ in range(spec["bulk_warmup"]):
        transfer()
    return {"samples": [nbytes / transfer() / 1e9 for _ in range(spec["repeat"])],
            "info": {"bytes": nbytes}}


def _socket_family(spec):
    import socket
    return socket.AF_INET if spec["family"] == "tcp" else socket.AF_UNIX


def _recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return b""
        buf += chunk
    return buf


def _bulk_socket_server(spec, ready):
    import socket
    np = _numpy()
    ls = socket.socket(_socket_family(spec), socket.SOCK_STREAM)
    if spec["family"] == "tcp":
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(_listen_address(spec))
    ls.listen(1)
    ready(ls.getsockname())
    sock, _ = ls.accept()
    ls.close()
    nelem = spec["nbytes"] // 8
    out = np.empty(nelem, dtype=np.float64)
    view = memoryview(out).cast("B")
    total = len(view)
    while _recv_exact(sock, 1) == b"B":
        _poison(np, out)
        sock.sendall(b"G")
        got = 0
        while got < total:
            r = sock.recv_into(view[got:])
            if r == 0:
                raise EOFError(f"bulk: peer closed with {total - got} bytes missing")
            got += r
        sock.sendall(b"A")
        _check_array(np, out, nelem)
    sock.close()


def _bulk_socket_client(spec, address):
    import socket
    np = _numpy()
    sock = socket.socket(_socket_family(spec), socket.SOCK_STREAM)
    sock.connect(_addr(address))
    arr = np.arange(spec["nbytes"] // 8, dtype=np.float64)
    view = memoryview(arr).cast("B")

    def transfer():
        sock.sendall(b"B")
        if _recv_exact(sock, 1) != b"G":
            raise ValueError("bulk: bad go")
        t0 = time.perf_counter()
        sock.sendall(view)
        if _recv_exact(sock, 1) != b"A":
            raise ValueError("bulk: bad ack")
        return time.perf_counter() - t0

    out = _bulk_samples(transfer, spec, arr.nbytes)
    sock.sendall(b"S")
    sock.close()
    return out


def _bulk_zmq_server(spec, ready):
    zmq = _zmq()
    np = _numpy()
    ctx = zmq.Context()
    pair = ctx.socket(zmq.PAIR)
    ready(_zmq_bind(pair, spec))
    nelem = spec["nbytes"] // 8
    while pair.recv() == b"B":
        pair.send(b"G")
        frame = pair.recv(copy=False)
        pair.send(b"A")
        _check_array(np, np.frombuffer(frame.buffer, dtype=np.float64), nelem)
        del frame
    _zmq_close(ctx, pair)


def _bulk_zmq_client(spec, address):
    zmq = _zmq()
    np = _numpy()
    ctx = zmq.Context()
    pair = ctx.socket(zmq.PAIR)
    pair.connect(address)
    arr = np.arange(spec["nbytes"] // 8, dtype=np.float64)

    def transfer():
        pair.send(b"B")
        if pair.recv() != b"G":
            raise ValueError("bulk: bad go")
        t0 = time.perf_counter()
        pair.send(arr, copy=False)
        if pair.recv() != b"A":
            raise ValueError("bulk: bad ack")
        return time.perf_counter() - t0

    out = _bulk_samples(transfer, spec, arr.nbytes)
    pair.send(b"S")
    _zmq_close(ctx, pair)
    return out


# ---- handshake ----

def _handshake_server(spec, ready):
    mod = _conn_module(spec)
    key = bytes.fromhex(spec["authkey"])
    listener = mod.Listener(_listen_address(spec), authkey=key)
    ready(listener.address)
    while True:
        conn = listener.accept()
        msg = conn.recv_bytes()
        if msg == b"STOP":
            conn.close()
            break
        conn.send_bytes(msg)
        conn.close()
    listener.close()


def handshake_once(mod, address, key, payload):
    """Connect, authenticate both ways, echo one message, close."""
    conn = mod.Client(address, authkey=key)
    conn.send_bytes(payload)
    if conn.recv_bytes() != payload:
        raise ValueError("handshake: echo mismatch")
    conn.close()


def _handshake_client(spec, address):
    mod = _conn_module(spec)
    key = bytes.fromhex(spec["authkey"])
    address = _addr(address)
    payload = b"h" * spec["size"]

    def step(k):
        t0 = time.perf_counter()
        for _ in range(k):
            handshake_once(mod, address, key, payload)
        return time.perf_counter() - t0

    out = _samples(step, spec, 1, 3, _per_second)
    out["info"]["backend"] = getattr(mod, "backend", None)
    conn = mod.Client(address, authkey=key)
    conn.send_bytes(b"STOP")
    conn.close()
    return out


# (case, impl) -> (server, client) for the Python children.
_ROLES = {
    ("pingpong", "mp"): (_pingpong_conn_server, _pingpong_conn_client),
    ("pingpong", "zmq"): (_pingpong_zmq_server, _pingpong_zmq_client),
    ("pingpong", "fastnet"): (_pingpong_conn_server, _pingpong_conn_client),
    ("stream", "mp"): (_stream_conn_server, _stream_conn_client),
    ("stream", "zmq"): (_stream_zmq_server, _stream_zmq_client),
    ("stream", "fastnet"): (_stream_conn_server, _stream_conn_client),
    ("stream", "fastnet-batch"): (_stream_conn_server, _stream_conn_client),
    ("stream", "fastnet-nagle"): (_stream_conn_server, _stream_conn_client),
    ("bulk", "socket"): (_bulk_socket_server, _bulk_socket_client),
    ("bulk", "mp-bytes"): (_bulk_conn_server, _bulk_conn_client),
    ("bulk", "mp-pickle"): (_bulk_conn_server, _bulk_conn_client),
    ("bulk", "zmq"): (_bulk_zmq_server, _bulk_zmq_client),
    ("bulk", "fastnet"): (_bulk_conn_server, _bulk_conn_client),
    ("handshake", "mp"): (_handshake_server, _handshake_client),
    ("handshake", "fastnet"): (_handshake_server, _handshake_client),
}


def _child(arg):
    """Entry point of a child process: run one server or client role."""
    spec = json.loads(arg)
    server, client = _ROLES[(spec["case"], spec["impl"])]
    if spec["role"] == "server":
        try:
            server(spec, _ready)
        except NotAvailable as exc:
            print("NA " + str(exc), flush=True)
        return
    try:
        out = client(spec, spec["address"])
    except NotAvailable as exc:
        out = {"na": str(exc)}
    print(json.dumps(out), flush=True)


_BOOT = (
    "import importlib.util, sys\n"
    "s = importlib.util.spec_from_file_location('_fastnet_bench', sys.argv[1])\n"
    "m = importlib.util.module_from_spec(s)\n"
    "s.loader.exec_module(m)\n"
    "m._child(sys.argv[2])\n"
)


# --------------------------------------------------------------------------
# Parent side: cases, the C floor, running pairs, the report.
# --------------------------------------------------------------------------

class Impl:
    """One row of a case: which child code runs it and how it is labelled."""

    def __init__(self, key, label, role=None, anchor=False, pure=None, kind="py"):
        self.key = key              # row key in the report
        self.label = label
        self.role = role or key     # key into _ROLES
        self.anchor = anchor
        self.pure = pure            # None: not fastnet; True/False: FASTNET_PURE
        self.kind = kind            # "py" or "c"

    @property
    def backend(self):
        if self.pure is None:
            return None
        return "python" if self.pure else "cython"


CASES = {
    "pingpong": {
        "title": "pingpong: {size}-byte round trip",
        "unit": "µs", "json_unit": "us/roundtrip", "better": "lower",
        "impls": [
            Impl("c", "C floor (write+read)", anchor=True, kind="c"),
            Impl("mp", "multiprocessing.connection", anchor=True),
            Impl("zmq", "pyzmq REQ/REP", anchor=True),
            Impl("fastnet", "fastnet send/recv_bytes", pure=False),
            Impl("fastnet-pure", "fastnet (pure kernels)", role="fastnet", pure=True),
        ],
    },
    "stream": {
        "title": "stream: one-way {size}-byte messages, each checked; send_many {batch} at a time",
        "unit": "msg/s", "json_unit": "msg/s", "better": "higher",
        "impls": [
            Impl("mp", "multiprocessing send_bytes", anchor=True),
            Impl("zmq", "pyzmq PUSH/PULL", anchor=True),
            Impl("fastnet", "fastnet send_bytes", pure=False),
            Impl("fastnet-batch", "fastnet send_many/recv_many", pure=False),
            Impl("fastnet-nagle", "fastnet send_bytes nodelay=False", pure=False),
            Impl("fastnet-pure", "fastnet send_bytes (pure)", role="fastnet", pure=True),
            Impl("fastnet-batch-pure", "fastnet send_many (pure)", role="fastnet-batch", pure=True),
        ],
    },
    "bulk": {
        "title": "bulk: {mib:g} MiB float64 array",
        "unit": "GB/s", "json_unit": "GB/s", "better": "higher",
        "impls": [
            Impl("socket", "socket sendall/recv_into", anchor=True),
            Impl("mp-bytes", "multiprocessing send_bytes", anchor=True),
            Impl("mp-pickle", "multiprocessing send(arr)", anchor=True),
            Impl("zmq", "pyzmq copy=False", anchor=True),
            Impl("fastnet", "fastnet send_array/recv_array", pure=False),
        ],
    },
    "handshake": {
        "title": "handshake: connect + authkey both ways + echo + close",
        "unit": "conn/s", "json_unit": "conn/s", "better": "higher",
        "impls": [
            Impl("mp", "multiprocessing.connection", anchor=True),
            Impl("fastnet", "fastnet", pure=False),
        ],
    },
}

FAMILIES = {"tcp": "TCP", "unix": "AF_UNIX"}

# Issue #2's targets.  ("ratio", num, den, op, bound): value(num)/value(den);
# ("value", impl, op, bound): an absolute number; ("report", num, den): a
# ratio shown without a bound.
TARGETS = [
    ("pingpong", None, "fastnet within 1.4x the C floor (time ratio)", ("ratio", "fastnet", "c", "<=", 1.4)),
    ("pingpong", None, "fastnet >= 3x faster than multiprocessing", ("ratio", "mp", "fastnet", ">=", 3.0)),
    ("pingpong", None, "compiled vs pure speed-up", ("report", "fastnet-pure", "fastnet")),
    ("stream", None, "send_bytes >= 1.5x multiprocessing", ("ratio", "fastnet", "mp", ">=", 1.5)),
    ("stream", None, "send_many >= 3x pyzmq PUSH/PULL", ("ratio", "fastnet-batch", "zmq", ">=", 3.0)),
    ("stream", None, "compiled vs pure speed-up, send_bytes", ("report", "fastnet", "fastnet-pure")),
    ("stream", None, "compiled vs pure speed-up, send_many", ("report", "fastnet-batch", "fastnet-batch-pure")),
    ("bulk", None, "send_array >= 0.95x plain socket", ("ratio", "fastnet", "socket", ">=", 0.95)),
    ("bulk", None, "send_array >= 3x multiprocessing send_bytes", ("ratio", "fastnet", "mp-bytes", ">=", 3.0)),
    ("bulk", None, "send_array >= 2x pyzmq", ("ratio", "fastnet", "zmq", ">=", 2.0)),
    ("handshake", "tcp", "fastnet >= 4000 conn/s", ("value", "fastnet", ">=", 4000.0)),
    ("handshake", None, "fastnet vs multiprocessing", ("report", "fastnet", "mp")),
]

PROFILES = {
    # rounds: fresh process pairs per row; repeat: timed samples per pair.
    "full": dict(rounds=3, repeat=5, warmup=0.2, sample=0.3, bulk_mib=256, bulk_warmup=1, timeout=300.0),
    "quick": dict(rounds=1, repeat=5, warmup=0.05, sample=0.08, bulk_mib=32, bulk_warmup=1, timeout=60.0),
}


def _package_root():
    """The directory that holds the fastnet package this file belongs to."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child_env(impl):
    env = dict(os.environ)
    # Each row says which kernels it runs, whatever the caller's environment.
    env.pop("FASTNET_PURE", None)
    if impl.pure:
        env["FASTNET_PURE"] = "1"
    root = _package_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def build_floor(workdir):
    """Compile ``_floor.c`` into ``workdir``; return (path, None) or (None, why)."""
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_floor.c")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None, "no C compiler (cc) found"
    if not os.path.exists(src):
        return None, f"{src} is missing"
    exe = os.path.join(workdir, "fastnet_floor")
    try:
        proc = subprocess.run([cc, "-O2", "-o", exe, src], capture_output=True, text=True)
    except OSError as exc:
        return None, f"cannot run {cc}: {exc}"
    if proc.returncode != 0:
        return None, f"{cc} failed: {proc.stderr.strip()[-300:]}"
    return exe, None


class _Server:
    """A server child; reads its stdout on a thread so READY can time out."""

    def __init__(self, cmd, env, cwd, errpath):
        self.errfile = open(errpath, "w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.errfile,
                                     stdin=subprocess.DEVNULL, env=env, cwd=cwd, text=True)
        self.lines = queue.Queue()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def first_line(self, timeout):
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def remaining(self):
        out = []
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return out
            if line is not None:
                out.append(line)

    def stderr_tail(self, n=400):
        self.errfile.flush()
        self.errfile.seek(0)
        return self.errfile.read()[-n:].strip()

    def stop(self, grace):
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.thread.join(timeout=5)

    def close(self):
        if self.proc.poll() is None:
            self.stop(grace=0)
        self.errfile.close()


@contextlib.contextmanager
def _pinned(cpus):
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


def _placement(pin):
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


def _python_cmd(spec):
    return [sys.executable, "-c", _BOOT, os.path.abspath(__file__), json.dumps(spec)]


class _Runner:
    def __init__(self, cfg, workdir):
        self.cfg = cfg
        self.workdir = workdir
        self.authkey = os.urandom(32).hex()
        self.counter = 0
        self.floor = None
        self.floor_error = None

    def spec(self, case, impl, family, role):
        self.counter += 1
        cfg = self.cfg
        return {
            "case": case, "impl": impl.role, "role": role, "family": family,
            "path": os.path.join(self.workdir, f"s{self.counter}.sock"),
            "size": cfg["size"], "warmup": cfg["warmup"], "sample": cfg["sample"],
            "repeat": cfg["repeat"], "batch": cfg["batch"],
            "nbytes": int(cfg["bulk_mib"] * 2 ** 20) // 8 * 8,
            "bulk_warmup": cfg["bulk_warmup"],
            "authkey": self.authkey, "backend": impl.backend,
        }

    def commands(self, case, impl, family):
        """Return (server_cmd, client_cmd(address)) or raise NotAvailable."""
        if impl.kind == "c":
            if self.floor is None and self.floor_error is None:
                self.floor, self.floor_error = build_floor(self.workdir)
            if self.floor_error:
                raise NotAvailable(self.floor_error)
            self.counter += 1
            path = os.path.join(self.workdir, f"c{self.counter}.sock")
            server = [self.floor, "server", family] + ([path] if family == "unix" else [])
            cfg = self.cfg

            def client(address):
                where = str(address[1]) if family == "tcp" else address
                return [self.floor, "client", family, where, str(cfg["size"]),
                        str(cfg["warmup"]), str(cfg["sample"]), str(cfg["repeat"])]
            return server, client
        sspec = self.spec(case, impl, family, "server")
        cspec = dict(sspec, role="client")

        def client(address):
            return _python_cmd(dict(cspec, address=address))
        return _python_cmd(sspec), client

    def pair(self, case, impl, family):
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

    def __init__(self, popen, timeout):
        try:
            self.stdout, self.stderr = popen.communicate(timeout=timeout)
        except BaseException:  # a timeout or Ctrl-C must not leave the child running
            popen.kill()
            popen.communicate()
            raise
        self.returncode = popen.returncode


def _last_error(text):
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _machine():
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    versions = {"python": platform.python_version()}
    for mod in ("numpy", "zmq"):
        with contextlib.suppress(Exception):
            m = __import__(mod)
            versions[mod] = m.__version__
            if mod == "zmq":
                versions["libzmq"] = m.zmq_version()
    return {
        "platform": platform.platform(), "machine": platform.machine(),
        "cpu": cpu, "cpus": os.cpu_count(), "versions": versions,
    }


def run(cases=None, *, quick=False, families=("tcp", "unix"), anchors_only=False,
        progress=None, **overrides):
    """Run the comparison and return the report dict.

    ``cases``: names from ``CASES`` (default all); ``anchors_only`` skips
    the fastnet rows.  ``overrides`` replace the
    profile's settings: rounds, repeat, warmup, sample, bulk_mib, bulk_warmup,
    timeout, batch, size, pin ("none", "same" or "split": where the two
    processes of a pair run).  ``progress(text)`` is called after every pair.
    """
    cases = list(cases or CASES)
    for name in cases:
        if name not in CASES:
            raise ValueError(f"unknown case {name!r}; choose from {', '.join(CASES)}")
    for fam in families:
        if fam not in FAMILIES:
            raise ValueError(f"unknown family {fam!r}; choose from {', '.join(FAMILIES)}")
    cfg = dict(PROFILES["quick" if quick else "full"], batch=128, size=PAYLOAD_SIZE, pin="none")
    for key, value in overrides.items():
        if key not in cfg:
            raise TypeError(f"run() got an unexpected setting {key!r}")
        if value is not None:
            cfg[key] = value

    started = time.time()
    results = {c: {f: {i.key: {"samples": [], "na": None, "info": {}}
                       for i in CASES[c]["impls"]} for f in families} for c in cases}
    with tempfile.TemporaryDirectory(prefix="fnb-") as workdir:
        runner = _Runner(cfg, workdir)
        for rnd in range(cfg["rounds"]):
            for case in cases:
                for family in families:
                    for impl in CASES[case]["impls"]:
                        slot = results[case][family][impl.key]
                        if slot["na"]:
                            continue
                        if anchors_only and not impl.anchor:
                            slot["na"] = "not run (--anchors)"
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

    report = {
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
        for family in families:
            rows = {}
            for impl in spec["impls"]:
                slot = results[case][family][impl.key]
                med = statistics.median(slot["samples"]) if slot["samples"] and not slot["na"] else None
                rows[impl.key] = {
                    "label": impl.label, "anchor": impl.anchor, "unit": spec["json_unit"],
                    "median": med, "samples": slot["samples"] if med is not None else [],
                    "na": slot["na"], "info": slot["info"],
                    "issue_anchor": ISSUE_ANCHORS.get((case, family, impl.key)),
                }
            report["results"][case][family] = rows
    report["targets"] = _targets(report, cases, families)
    return report


def _progress_line(rnd, rounds, case, family, impl, slot, out):
    unit = CASES[case]["unit"]
    if "na" in out:
        shown = "n/a: " + out["na"]
    else:
        shown = f"{_fmt(statistics.median(out['samples']))} {unit}"
    return f"[{rnd + 1}/{rounds}] {case:9s} {FAMILIES[family]:7s} {impl.label:32s} {shown}"


def _ratio(rows, num, den):
    a, b = rows.get(num, {}).get("median"), rows.get(den, {}).get("median")
    if a is None or b is None or b == 0:
        return None
    return a / b


def _targets(report, cases, families):
    out = []
    for case, only_family, text, rule in TARGETS:
        if case not in cases:
            continue
        for family in families:
            if only_family and family != only_family:
                continue
            rows = report["results"][case][family]
            entry = {"case": case, "family": family, "target": text}
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
            entry["value"] = value
            if value is None:
                entry["status"] = "n/a"
            elif op is None:
                entry["status"] = "reported"
            else:
                met = value <= bound if op == "<=" else value >= bound
                entry["status"] = "met" if met else "NOT met"
            out.append(entry)
    return out


def _fmt(v):
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


def format_report(report):
    """Render the report dict as text tables."""
    cfg = report["config"]
    m = report["machine"]
    vers = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [
        f"fastnet bench  {report['date']}  ({'quick' if cfg['quick'] else 'full'} profile, "
        f"{report['elapsed_s']:g} s)",
        f"machine: {m['cpu']}, {m['cpus']} CPUs, {m['platform']}; {vers}",
        f"each row: median of {cfg['rounds']} fresh process pair(s) x {cfg['repeat']} samples; "
        f"CPU placement: {_PIN_TEXT[cfg['pin']]}; ratio columns are value / anchor value",
    ]
    notes = []
    for case, fams in report["results"].items():
        spec = CASES[case]
        anchors = [i for i in spec["impls"] if i.anchor]
        title = spec["title"].format(size=cfg["size"], mib=cfg["bulk_mib"], batch=cfg["batch"])
        lines += ["", f"{title}  [{spec['unit']}, {spec['better']} is better]"]
        head = f"{'':8s} {'':32s} {'median':>9s}" + "".join(f" {'/' + _short(a):>9s}" for a in anchors) \
            + f" {'issue #2':>9s}"
        lines.append(head)
        for family, rows in fams.items():
            first = True
            for impl in spec["impls"]:
                row = rows[impl.key]
                cells = f"{FAMILIES[family] if first else '':8s} {impl.label:32s} "
                first = False
                if row["na"] == "not run (--anchors)":
                    continue
                if row["median"] is None:
                    notes.append(f"{case} {FAMILIES[family]} {impl.label}: {row['na']}")
                    cells += f"{'n/a [' + str(len(notes)) + ']':>9s}"
                else:
                    cells += f"{_fmt(row['median']):>9s}"
                    for a in anchors:
                        r = _ratio(rows, impl.key, a.key)
                        cells += f" {('%.2f' % r) if r is not None else '-':>9s}"
                    if row["issue_anchor"] is not None:
                        cells += f" {_fmt(row['issue_anchor']):>9s}"
                lines.append(cells.rstrip())
    if report["targets"] and not cfg.get("anchors_only"):
        lines += ["", "issue #2 targets"]
        for t in report["targets"]:
            value = "n/a" if t["value"] is None else f"{t['value']:.2f}"
            lines.append(f"  {t['case']:9s} {FAMILIES[t['family']]:7s} {t['target']:46s} "
                         f"{value:>9s}  {t['status']}")
    if notes:
        lines += ["", "n/a:"]
        lines += [f"  [{n}] {text}" for n, text in enumerate(notes, 1)]
    return "\n".join(lines)


_PIN_TEXT = {"none": "scheduler's choice", "same": "both processes on one CPU",
             "split": "one CPU each"}


def _short(impl):
    return {"c": "C", "mp": "mp", "zmq": "zmq", "socket": "socket",
            "mp-bytes": "mp bytes", "mp-pickle": "mp send", }.get(impl.key, impl.key)


def _parse(argv):
    p = argparse.ArgumentParser(
        prog="fastnet bench",
        description="Compare fastnet with the C floor, multiprocessing.connection, "
                    "pyzmq and plain sockets over loopback; medians and ratios in one run.")
    p.add_argument("--quick", action="store_true",
                   help="short samples, one round, 32 MiB bulk (about a minute on 2 cores)")
    p.add_argument("--only", metavar="NAME,...",
                   help=f"cases to run, comma-separated: {','.join(CASES)}")
    p.add_argument("--family", metavar="NAME,...", default="tcp,unix",
                   help="tcp, unix or both (default both)")
    p.add_argument("--anchors", action="store_true",
                   help="run only the anchors (C floor, multiprocessing, pyzmq, plain sockets)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    p.add_argument("--rounds", type=int, help="fresh process pairs per row")
    p.add_argument("--repeat", type=int, help="timed samples per pair")
    p.add_argument("--sample", type=float, help="seconds per timed sample")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per pair")
    p.add_argument("--bulk-mib", type=float, help="bulk array size in MiB")
    p.add_argument("--batch", type=int, help="messages per send_many call (default 128)")
    p.add_argument("--timeout", type=float, help="seconds before a pair is abandoned")
    p.add_argument("--pin", choices=("none", "same", "split"), default="none",
                   help="CPU placement of each pair: none (the scheduler's choice, default), "
                        "same (one CPU for both) or split (one CPU each)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def main(argv=None):
    """The ``fastnet bench`` command.  Returns the exit status."""
    args = _parse(argv)
    cases = [c.strip() for c in args.only.split(",") if c.strip()] if args.only else None
    families = tuple(f.strip() for f in args.family.split(",") if f.strip())

    def progress(text):
        print(text, file=sys.stderr, flush=True)

    try:
        report = run(cases, quick=args.quick, families=families, anchors_only=args.anchors,
                     progress=None if args.quiet else progress,
                     rounds=args.rounds, repeat=args.repeat, sample=args.sample,
                     warmup=args.warmup, bulk_mib=args.bulk_mib, batch=args.batch,
                     timeout=args.timeout, pin=args.pin)
    except ValueError as exc:
        print(f"fastnet bench: {exc}", file=sys.stderr)
        return 2
    report["command"] = "fastnet bench " + " ".join(sys.argv[1:] if argv is None else argv)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 0


@contextlib.contextmanager
def serve(case, impl, family, *, size=PAYLOAD_SIZE, nbytes=8 << 20, authkey=None,
          start_timeout=30.0):
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


if __name__ == "__main__":
    sys.exit(main())
