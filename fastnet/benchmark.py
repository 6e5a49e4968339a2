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
* ``rpc-seq``   sequential ``add(2, 3)`` calls/s from one client: a pickle RPC
  over multiprocessing.connection (the Python Cookbook's recipe 11.8), xmlrpc,
  pyzmq REQ/REP + msgpack, Pyro5 and rpyc (when installed), fastnet's bare
  64-byte pingpong as calls/s, and fastnet's RPC with msgpack.
* ``rpc-pipe``  ``add(2, 3)`` with 64 calls in flight on one connection,
  calls/s: the multiprocessing pickle RPC sending 64 requests then reading
  64 replies, pyzmq DEALER/ROUTER with a sliding window of 64, fastnet
  ``call_async`` with a sliding window of 64 (a new call as the oldest one
  completes), in batches of 64 (64 ``call_async``, then wait for all 64)
  and in ``proxy.batch()`` blocks of 64 (the 64 requests in one write).
* ``echo``      an echo server with 100 connections kept in ping-pong by one
  epoll client process, round trips/s: each server cuts the 4-byte framed
  messages, hands them whole to Python code and sends a framed reply; a
  selectors loop, ``socketserver`` with a thread per connection, asyncio,
  uvloop (when installed), fastnet's EventLoop compiled and pure.  The
  client's info also has the server's CPU time per round trip.
* ``fdpass``    descriptors passed one per message over AF_UNIX (only), fd/s,
  the receiver checking each with fstat and closing it:
  ``multiprocessing.reduction``, ``socket.send_fds``, fastnet ``send_fd``
  compiled and pure.

``--only rpc`` runs both rpc cases; ``bench/bench_rpc.py`` adds the json and
pickle codecs, AF_UNIX, grpc, array arguments and TLS; ``bench/bench_echo.py``
1,000 and 10,000 connections; ``bench/bench_fdpass.py`` ``Connection.send_fds``.

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

from __future__ import annotations

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

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
    # issue #4: sequential add(2, 3) calls/s from one client process
    ("rpc-seq", "tcp", "mp-rpc"): 13960.0,
    ("rpc-seq", "tcp", "xmlrpc"): 1390.0,
    ("rpc-seq", "tcp", "zmq-rpc"): 10100.0,
    ("rpc-seq", "tcp", "pyro5"): 4250.0,
    ("rpc-seq", "tcp", "rpyc"): 6890.0,
}


class NotAvailable(Exception):
    """A case cannot run here (missing package or fastnet feature)."""


# --------------------------------------------------------------------------
# Child side: the servers and clients.  Everything here runs in a child.
# --------------------------------------------------------------------------

def _ready(address: Any) -> None:
    print("READY " + json.dumps(address), flush=True)


def _addr(address: Any) -> Any:
    # JSON turns the (host, port) tuple into a list; Listener/Client want a tuple.
    return tuple(address) if isinstance(address, list) else address


def _listen_address(spec: dict[str, Any]) -> Any:
    return ("127.0.0.1", 0) if spec["family"] == "tcp" else spec["path"]


def _fastnet(spec: dict[str, Any]) -> Any:
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


def _need(obj: Any, *names: Any) -> Any:
    for name in names:
        if not hasattr(obj, name):
            owner = getattr(obj, "__name__", type(obj).__name__)
            raise NotAvailable(f"{owner}.{name} is missing")


def _conn_module(spec: dict[str, Any]) -> Any:
    if spec["impl"].startswith("mp"):
        import multiprocessing.connection as mpc
        return mpc
    return _fastnet(spec)


def _zmq() -> Any:
    try:
        import zmq
    except ImportError:
        raise NotAvailable("pyzmq is not installed")
    return zmq


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        raise NotAvailable("numpy is not installed")
    return numpy


def _zmq_bind(sock: Any, spec: dict[str, Any], suffix: str = "") -> Any:
    if spec["family"] == "tcp":
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        return f"tcp://127.0.0.1:{port}"
    url = f"ipc://{spec['path']}{suffix}"
    sock.bind(url)
    return url


def _zmq_close(ctx: Any, *socks: Any) -> None:
    for s in socks:
        s.close(linger=0)
    ctx.term()


def _accept_one(spec: dict[str, Any], mod: Any, ready: Callable[[Any], None], **kw: Any) -> Any:
    listener = mod.Listener(_listen_address(spec), **kw)
    ready(listener.address)
    conn = listener.accept()
    listener.close()
    return conn


def _calibrate(step: Any, spec: dict[str, Any], start: Any, minimum: Any) -> Any:
    """Warm up with step(k) in growing chunks for ``warmup`` seconds; return
    the count that lasts about ``sample`` seconds."""
    done, spent, k = 0, 0.0, start
    while spent < spec["warmup"] or done == 0:
        spent += step(k)
        done += k
        k = min(k * 2, start * 1024)
    return max(minimum, int(spec["sample"] * done / max(spent, 1e-9)))


def _samples(step: Any, spec: dict[str, Any], start: Any, minimum: Any, per: Any) -> Any:
    n = _calibrate(step, spec, start, minimum)
    return {"samples": [per(step(n), n) for _ in range(spec["repeat"])],
            "info": {"iterations": n}}


def _us_per_op(t: Any, n: Any) -> Any:
    return t / n * 1e6


def _per_second(t: Any, n: Any) -> Any:
    return n / t


# ---- pingpong ----

def _pingpong_conn_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    mod = _conn_module(spec)
    conn = _accept_one(spec, mod, ready)
    send, recv = conn.send_bytes, conn.recv_bytes
    try:
        while True:
            send(recv())
    except EOFError:
        pass
    conn.close()


def _pingpong_conn_client(spec: dict[str, Any], address: Any) -> Any:
    mod = _conn_module(spec)
    conn = mod.Client(_addr(address))
    payload = b"p" * spec["size"]
    send, recv = conn.send_bytes, conn.recv_bytes
    send(payload)
    if recv() != payload:
        raise ValueError("echo mismatch")

    def step(k: Any) -> Any:
        t0 = time.perf_counter()
        for _ in range(k):
            send(payload)
            recv()
        return time.perf_counter() - t0

    out = _samples(step, spec, 64, 100, _us_per_op)
    out["info"]["backend"] = getattr(mod, "backend", None)
    conn.close()
    return out


def _pingpong_zmq_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
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


def _pingpong_zmq_client(spec: dict[str, Any], address: Any) -> Any:
    zmq = _zmq()
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.connect(address)
    payload = b"p" * spec["size"]
    send, recv = req.send, req.recv
    send(payload)
    if recv() != payload:
        raise ValueError("echo mismatch")

    def step(k: Any) -> Any:
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

def stream_payload(size: Any) -> Any:
    """The message every stream sender sends and every receiver expects."""
    return b"s" * size


def _check_frames(frames: Any, expected: Any) -> Any:
    for m in frames:
        if m != expected:
            raise ValueError(f"stream: bad message {bytes(m)[:16]!r}...")


def _stream_conn_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> Any:
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


def stream_sender(conn: Any, payload: Any, batch: int = 0) -> Any:
    """Return ``burst(n) -> seconds`` for a connection to a stream server.

    With ``batch`` > 0 the messages go out ``batch`` at a time through
    ``conn.send_many``."""
    send, recv = conn.send_bytes, conn.recv_bytes
    if batch:
        send_many = conn.send_many
        chunk = [payload] * batch

    def burst(n: Any) -> Any:
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


def _stream_conn_client(spec: dict[str, Any], address: Any) -> Any:
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


def _stream_zmq_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> Any:
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


def _stream_zmq_client(spec: dict[str, Any], address: Any) -> Any:
    zmq = _zmq()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    pull = ctx.socket(zmq.PULL)
    push.connect(address["data"])
    pull.connect(address["ack"])
    payload = stream_payload(spec["size"])
    send, recv = push.send, pull.recv

    def burst(n: Any) -> Any:
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


def _poison(np: Any, out: Any) -> None:
    out[::_SPOT] = -1.0
    out[-1] = -1.0


def _check_array(np: Any, a: Any, nelem: Any) -> Any:
    if a.dtype != np.float64 or a.size != nelem:
        raise ValueError(f"bulk: got {a.dtype} x {a.size}, expected float64 x {nelem}")
    a = a.reshape(-1)
    if not np.array_equal(a[::_SPOT], np.arange(0, nelem, _SPOT, dtype=np.float64)) \
            or a[-1] != nelem - 1:
        raise ValueError("bulk: array content differs")


def _bulk_conn_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
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


def _bulk_conn_client(spec: dict[str, Any], address: Any) -> Any:
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

    def transfer() -> Any:
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


def _bulk_samples(transfer: Any, spec: dict[str, Any], nbytes: Any) -> Any:
    for _ in range(spec["bulk_warmup"]):
        transfer()
    return {"samples": [nbytes / transfer() / 1e9 for _ in range(spec["repeat"])],
            "info": {"bytes": nbytes}}


def _socket_family(spec: dict[str, Any]) -> Any:
    import socket
    return socket.AF_INET if spec["family"] == "tcp" else socket.AF_UNIX


def _recv_exact(sock: Any, n: Any) -> Any:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return b""
        buf += chunk
    return buf


def _bulk_socket_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> Any:
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


def _bulk_socket_client(spec: dict[str, Any], address: Any) -> Any:
    import socket
    np = _numpy()
    sock = socket.socket(_socket_family(spec), socket.SOCK_STREAM)
    sock.connect(_addr(address))
    arr = np.arange(spec["nbytes"] // 8, dtype=np.float64)
    view = memoryview(arr).cast("B")

    def transfer() -> Any:
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


def _bulk_zmq_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
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


def _bulk_zmq_client(spec: dict[str, Any], address: Any) -> Any:
    zmq = _zmq()
    np = _numpy()
    ctx = zmq.Context()
    pair = ctx.socket(zmq.PAIR)
    pair.connect(address)
    arr = np.arange(spec["nbytes"] // 8, dtype=np.float64)

    def transfer() -> Any:
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

def _handshake_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
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


def handshake_once(mod: Any, address: Any, key: Any, payload: Any) -> Any:
    """Connect, authenticate both ways, echo one message, close."""
    conn = mod.Client(address, authkey=key)
    conn.send_bytes(payload)
    if conn.recv_bytes() != payload:
        raise ValueError("handshake: echo mismatch")
    conn.close()


def _handshake_client(spec: dict[str, Any], address: Any) -> Any:
    mod = _conn_module(spec)
    key = bytes.fromhex(spec["authkey"])
    address = _addr(address)
    payload = b"h" * spec["size"]

    def step(k: Any) -> Any:
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


# ---- rpc ----
# Sequential calls of add(2, 3) from one client, and calls kept in flight on
# one connection.  Every server also has echo(x) (the array RPCs of bench/)
# and stop(); servers that outlive their client's connection exit on stop.

RPC_IN_FLIGHT = 64


def _add(x: Any, y: Any) -> Any:
    return x + y


def _echo(x: Any) -> Any:
    return x


def rpc_codec(impl: Any) -> Any:
    """The fastnet codec of an rpc row: its suffix (``-json``, ``-pickle``), else msgpack."""
    for name in ("json", "pickle"):
        if impl.endswith("-" + name):
            return name
    return "msgpack"


def _rpc_key(spec: dict[str, Any], codec: Any) -> Any:
    # Only pickle needs the authkey (the RPC layer refuses it without one);
    # the other codecs run without, as a msgpack or json client would.
    if codec != "pickle":
        return None
    return bytes.fromhex(spec["authkey"]) or None


def rpc_server(spec: dict[str, Any], ready: Callable[[Any], None], **kw: Any) -> None:
    """A fastnet RPCServer with add, echo and stop, served until stop (``kw``: RPCServer options)."""
    fastnet = _fastnet(spec)
    _need(fastnet, "RPCServer")
    codec = rpc_codec(spec["impl"])
    srv = fastnet.RPCServer(_listen_address(spec), authkey=_rpc_key(spec, codec), codec=codec, **kw)
    srv.register_function(_add, "add")
    srv.register_function(_echo, "echo")
    # shutdown() waits for the loop, so it cannot run on the loop's own thread
    srv.register_function(
        lambda: threading.Thread(target=srv.shutdown, daemon=True).start(), "stop")
    ready(srv.address)
    srv.serve_forever()
    srv.server_close()


def rpc_proxy(spec: dict[str, Any], address: Any, **kw: Any) -> Any:
    """An RPCProxy for ``rpc_server`` (same codec and key); ``kw``: RPCProxy options."""
    fastnet = _fastnet(spec)
    _need(fastnet, "RPCProxy")
    codec = rpc_codec(spec["impl"])
    return fastnet.RPCProxy(_addr(address), authkey=_rpc_key(spec, codec), codec=codec, **kw)


def rpc_stop(proxy: Any) -> None:
    """End an ``rpc_server`` child: a notification, since the shutdown it
    starts may close the connection before a reply to stop could leave."""
    proxy.notify("stop")
    proxy.close()


def _timed_calls(call: Any, k: Any) -> Any:
    t0 = time.perf_counter()
    for _ in range(k):
        call(2, 3)
    return time.perf_counter() - t0


def rpc_sequential(call: Any, spec: dict[str, Any]) -> Any:
    """Samples of calls/s of ``call(2, 3)``, one call at a time."""
    if call(2, 3) != 5:
        raise ValueError("rpc: add(2, 3) != 5")
    return _samples(lambda k: _timed_calls(call, k), spec, 64, 100, _per_second)


def _rpc_fastnet_client(spec: dict[str, Any], address: Any) -> Any:
    proxy = rpc_proxy(spec, address)
    out = rpc_sequential(proxy.add, spec)
    out["info"].update(backend=_fastnet(spec).backend, codec=proxy.codec)
    rpc_stop(proxy)
    return out


def rpc_window(call_async: Any, spec: dict[str, Any]) -> Any:
    """Samples of calls/s with ``window`` calls in flight: a new call as each oldest one completes."""
    from collections import deque
    window = spec.get("window", RPC_IN_FLIGHT)

    def step(k: Any) -> Any:
        pending: deque[Any] = deque()
        popleft, push = pending.popleft, pending.append
        t0 = time.perf_counter()
        for _ in range(k):
            if len(pending) >= window:
                if popleft().result() != 5:
                    raise ValueError("rpc: add(2, 3) != 5")
            push(call_async("add", 2, 3))
        while pending:
            if popleft().result() != 5:
                raise ValueError("rpc: add(2, 3) != 5")
        return time.perf_counter() - t0

    out = _samples(step, spec, 1024, 1024, _per_second)
    out["info"]["in_flight"] = window
    return out


def rpc_batches(submit: Any, spec: dict[str, Any]) -> Any:
    """Samples of calls/s in batches: ``submit(n)`` starts n calls and returns
    their futures, then all n replies are awaited before the next batch."""
    window = spec.get("window", RPC_IN_FLIGHT)

    def step(k: Any) -> Any:
        t0 = time.perf_counter()
        for _ in range(-(-k // window)):
            for f in submit(window):
                if f.result() != 5:
                    raise ValueError("rpc: add(2, 3) != 5")
        return time.perf_counter() - t0

    out = _samples(step, spec, 1024, 1024, lambda t, n: -(-n // window) * window / t)
    out["info"]["in_flight"] = window
    return out


def rpc_submit(proxy: Any, impl: Any) -> Any:
    """``submit(n)`` for rpc_batches: n call_async (``fastnet-batch``) or one
    ``proxy.batch()`` of n (``fastnet-pbatch``: the requests go out in one write)."""
    call_async = proxy.call_async
    if impl.startswith("fastnet-pbatch"):
        if not hasattr(type(proxy), "batch"):   # (any other name is a remote method)
            raise NotAvailable("RPCProxy.batch is missing")

        def submit(n: Any) -> Any:
            with proxy.batch() as b:
                return [b.call_async("add", 2, 3) for _ in range(n)]
    else:
        def submit(n: Any) -> Any:
            return [call_async("add", 2, 3) for _ in range(n)]
    return submit


def _rpc_fastnet_pipelined_client(spec: dict[str, Any], address: Any) -> Any:
    proxy = rpc_proxy(spec, address)
    impl = spec["impl"]
    if impl.startswith("fastnet-batch") or impl.startswith("fastnet-pbatch"):
        out = rpc_batches(rpc_submit(proxy, impl), spec)
    else:
        out = rpc_window(proxy.call_async, spec)
    out["info"].update(backend=_fastnet(spec).backend, codec=proxy.codec)
    rpc_stop(proxy)
    return out


def _rpc_pingpong_client(spec: dict[str, Any], address: Any) -> Any:
    # fastnet's bare round trip (64-byte echo) as calls/s: the floor under an RPC call
    out = _pingpong_conn_client(spec, address)
    out["samples"] = [1e6 / us for us in out["samples"]]
    return out


# The pickle RPC of the Python Cookbook's recipe 11.8 over multiprocessing.connection:
# the proxy sends (name, args, kwargs), the handler answers the result or the exception.

class CookbookRPCHandler:
    def __init__(self) -> None:
        self._functions: dict[str, Any] = {}

    def register_function(self, func: Any, name: Any = None) -> None:
        self._functions[name or func.__name__] = func

    def handle_connection(self, connection: Any) -> None:
        try:
            while True:
                func_name, args, kwargs = connection.recv()
                try:
                    r = self._functions[func_name](*args, **kwargs)
                    connection.send(r)
                except Exception as e:
                    connection.send(e)
        except EOFError:
            pass


class CookbookRPCProxy:
    def __init__(self, connection: Any) -> None:
        self._connection = connection

    def __getattr__(self, name: Any) -> Any:
        def do_rpc(*args: Any, **kwargs: Any) -> Any:
            self._connection.send((name, args, kwargs))
            result = self._connection.recv()
            if isinstance(result, Exception):
                raise result
            return result
        return do_rpc


def _rpc_mp_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    import multiprocessing.connection as mpc
    handler = CookbookRPCHandler()
    handler.register_function(_add, "add")
    handler.register_function(_echo, "echo")
    conn = _accept_one(spec, mpc, ready, authkey=bytes.fromhex(spec["authkey"]))
    handler.handle_connection(conn)
    conn.close()


def _rpc_mp_client(spec: dict[str, Any], address: Any) -> Any:
    import multiprocessing.connection as mpc
    conn = mpc.Client(_addr(address), authkey=bytes.fromhex(spec["authkey"]))
    proxy = CookbookRPCProxy(conn)
    if spec["case"] == "rpc-pipe":
        out = _rpc_mp_pipelined(conn, spec)
    else:
        # the recipe's proxy.add(2, 3): a new closure per attribute lookup, as written
        out = rpc_sequential(lambda x, y: proxy.add(x, y), spec)
    conn.close()
    return out


def _rpc_mp_pipelined(conn: Any, spec: dict[str, Any]) -> Any:
    # The recipe's handler answers in order, so a client may send a batch of
    # requests and then read their replies (the pipe holds them meanwhile).
    window = spec.get("window", RPC_IN_FLIGHT)
    send, recv = conn.send, conn.recv
    request: tuple[str, tuple[int, int], dict[str, Any]] = ("add", (2, 3), {})

    def step(k: Any) -> Any:
        t0 = time.perf_counter()
        for _ in range(-(-k // window)):
            for _ in range(window):
                send(request)
            for _ in range(window):
                if recv() != 5:
                    raise ValueError("rpc: add(2, 3) != 5")
        return time.perf_counter() - t0

    out = _samples(step, spec, 1024, 1024, lambda t, n: -(-n // window) * window / t)
    out["info"]["in_flight"] = window
    return out


def _rpc_xmlrpc_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> Any:
    if spec["family"] != "tcp":
        raise NotAvailable("xmlrpc speaks HTTP over TCP only")
    from xmlrpc.server import SimpleXMLRPCServer
    srv = SimpleXMLRPCServer(("127.0.0.1", 0), logRequests=False, allow_none=True)
    stopping = []
    srv.register_function(_add, "add")
    srv.register_function(lambda: stopping.append(1), "stop")
    ready(srv.server_address)
    while not stopping:
        srv.handle_request()
    srv.server_close()


def _rpc_xmlrpc_client(spec: dict[str, Any], address: Any) -> Any:
    import xmlrpc.client
    host, port = _addr(address)
    proxy = xmlrpc.client.ServerProxy(f"http://{host}:{port}/", allow_none=True)
    out = rpc_sequential(proxy.add, spec)
    proxy.stop()
    proxy("close")()
    return out


def _msgpack() -> Any:
    try:
        import msgpack
    except ImportError:
        raise NotAvailable("msgpack is not installed")
    return msgpack


# pyzmq + msgpack: request [msgid, method, args], reply [msgid, error, result].

def _zmq_rpc_reply(functions: Any, packb: Any, unpackb: Any, data: Any) -> Any:
    msgid, method, args = unpackb(data)
    try:
        return packb([msgid, None, functions[method](*args)]), method == "stop"
    except Exception as e:
        return packb([msgid, f"{type(e).__name__}: {e}", None]), False


def _rpc_zmq_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    zmq = _zmq()
    mp = _msgpack()
    ctx = zmq.Context()
    router = spec["case"] == "rpc-pipe"
    sock = ctx.socket(zmq.ROUTER if router else zmq.REP)
    ready(_zmq_bind(sock, spec))
    functions = {"add": _add, "echo": _echo, "stop": lambda: None}
    packb, unpackb = mp.packb, mp.unpackb
    stop = False
    while not stop:
        if router:
            ident, data = sock.recv_multipart()
            reply, stop = _zmq_rpc_reply(functions, packb, unpackb, data)
            sock.send_multipart([ident, reply])
        else:
            reply, stop = _zmq_rpc_reply(functions, packb, unpackb, sock.recv())
            sock.send(reply)
    _zmq_close(ctx, sock)


def _rpc_zmq_client(spec: dict[str, Any], address: Any) -> Any:
    zmq = _zmq()
    mp = _msgpack()
    ctx = zmq.Context()
    pipelined = spec["case"] == "rpc-pipe"
    sock = ctx.socket(zmq.DEALER if pipelined else zmq.REQ)
    sock.connect(address)
    packb, unpackb = mp.packb, mp.unpackb
    send, recv = sock.send, sock.recv
    ids = iter(range(1, 1 << 62))

    def call(x: Any, y: Any) -> Any:
        send(packb([next(ids), "add", [x, y]]))
        msgid, error, result = unpackb(recv())
        if error is not None:
            raise RuntimeError(error)
        return result

    if pipelined:
        out = _zmq_window(send, recv, packb, unpackb, spec)
    else:
        out = rpc_sequential(call, spec)
    send(packb([0, "stop", []]))
    recv()
    _zmq_close(ctx, sock)
    return out


def _zmq_window(send: Any, recv: Any, packb: Any, unpackb: Any, spec: dict[str, Any]) -> Any:
    # DEALER: ``window`` requests in flight, a new one sent as each reply arrives
    window = spec.get("window", RPC_IN_FLIGHT)

    def step(k: Any) -> Any:
        t0 = time.perf_counter()
        sent = 0
        for _ in range(min(window, k)):
            sent += 1
            send(packb([sent, "add", [2, 3]]))
        for _ in range(k):
            msgid, error, result = unpackb(recv())
            if result != 5:
                raise ValueError(f"rpc: add(2, 3) -> {error or result!r}")
            if sent < k:
                sent += 1
                send(packb([sent, "add", [2, 3]]))
        return time.perf_counter() - t0

    out = _samples(step, spec, 1024, 1024, _per_second)
    out["info"]["in_flight"] = window
    return out


def _rpc_pyro5_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> Any:
    try:
        import Pyro5.api  # type: ignore[import-untyped, import-not-found, unused-ignore]  # no type hints; optional
    except ImportError:
        raise NotAvailable("Pyro5 is not installed")
    if spec["family"] == "tcp":
        daemon = Pyro5.api.Daemon(host="127.0.0.1", port=0)
    else:
        daemon = Pyro5.api.Daemon(unixsocket=spec["path"])

    @Pyro5.api.expose
    class Calc:
        def add(self, x: Any, y: Any) -> Any:
            return x + y

        def stop(self) -> None:
            threading.Thread(target=daemon.shutdown, daemon=True).start()

    uri = daemon.register(Calc(), "calc")
    ready(str(uri))
    daemon.requestLoop()
    daemon.close()


def _rpc_pyro5_client(spec: dict[str, Any], address: Any) -> Any:
    import Pyro5.api  # type: ignore[import-untyped, import-not-found, unused-ignore]  # no type hints; optional
    proxy = Pyro5.api.Proxy(address)
    out = rpc_sequential(proxy.add, spec)
    out["info"]["serializer"] = Pyro5.config.SERIALIZER
    proxy.stop()
    proxy._pyroRelease()
    return out


def _rpc_rpyc_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> Any:
    try:
        import rpyc  # type: ignore[import-untyped, import-not-found, unused-ignore]  # no type hints; optional
        from rpyc.utils.server import OneShotServer  # type: ignore[import-untyped, import-not-found, unused-ignore]  # no type hints; optional
    except ImportError:
        raise NotAvailable("rpyc is not installed")

    class CalcService(rpyc.Service):  # type: ignore[misc]  # rpyc has no type hints
        def exposed_add(self, x: Any, y: Any) -> Any:
            return x + y

    if spec["family"] == "tcp":
        srv = OneShotServer(CalcService, hostname="127.0.0.1", port=0)
        ready(["127.0.0.1", srv.port])
    else:
        srv = OneShotServer(CalcService, socket_path=spec["path"])
        ready(spec["path"])
    srv.start()     # serves the one client until it disconnects


def _rpc_rpyc_client(spec: dict[str, Any], address: Any) -> Any:
    import rpyc  # type: ignore[import-untyped, import-not-found, unused-ignore]  # no type hints; optional
    if spec["family"] == "tcp":
        conn = rpyc.connect(*_addr(address))
    else:
        conn = rpyc.utils.factory.unix_connect(address)
    # conn.root.add would cost a remote getattr on every call; a cached
    # method is one round trip per call, as every other row does
    out = rpc_sequential(conn.root.add, spec)
    conn.close()
    return out


# ---- echo ----
# An event-loop echo server with many connections.  Every server cuts
# 4-byte big-endian length-prefixed frames (multiprocessing.connection's
# framing), hands each whole message to Python code and sends a framed reply,
# so all rows do the same work.  The client is the same for every row: one
# process keeping ``conns`` connections in ping-pong (one message in flight
# per connection).  A server exits once its last connection has closed, or,
# with ``spec["persist"]``, serves one load after another until SIGTERM
# (bench/bench_echo.py runs its rounds against one long-lived server).

ECHO_BACKLOG = 4096


def _raise_nofile(n: int) -> None:
    # many connections need more descriptors than a default soft limit of 1024
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = max(soft, n) if hard == resource.RLIM_INFINITY else min(hard, max(soft, n))
        if want > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class _Live:
    """Counts a server's open connections; ``on_idle()`` runs when the last one closes."""

    def __init__(self, on_idle: Callable[[], object]) -> None:
        self.open = 0
        self.on_idle = on_idle
        self.lock = threading.Lock()    # socketserver counts from its handler threads

    def opened(self) -> None:
        with self.lock:
            self.open += 1

    def closed(self) -> None:
        with self.lock:
            self.open -= 1
            idle = self.open == 0
        if idle:
            self.on_idle()


def _echo_live(spec: dict[str, Any], stop: Callable[[], object],
               on_sigterm: Callable[[Callable[[], object]], object] | None = None) -> _Live:
    """The connection counter of an echo server, and when the server stops.

    By default ``stop()`` runs when the last connection closes; with
    ``spec["persist"]`` it runs on SIGTERM instead, installed by
    ``on_sigterm(stop)`` (an event loop's own signal handling) or else by
    ``signal.signal``.
    """
    if not spec.get("persist"):
        return _Live(stop)
    if on_sigterm is not None:
        on_sigterm(stop)
    else:
        import signal
        signal.signal(signal.SIGTERM, lambda *_: stop())
    return _Live(lambda: None)


def _echo_listen(spec: dict[str, Any]) -> Any:
    import socket
    _raise_nofile(spec.get("conns", 100) + 64)
    sock = socket.socket(_socket_family(spec), socket.SOCK_STREAM)
    if spec["family"] == "tcp":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(_listen_address(spec))
    # a backlog above the connection count: a client connecting faster than
    # the loop accepts must not wait for SYN retransmits
    sock.listen(ECHO_BACKLOG)
    return sock


def _echo_ready(ready: Callable[[Any], None], address: Any) -> None:
    # the pid lets the client read the server's CPU time from /proc
    ready({"address": address, "pid": os.getpid()})


def _echo_selectors_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    import selectors
    import socket
    sel = selectors.DefaultSelector()
    lsock = _echo_listen(spec)
    lsock.setblocking(False)
    tcp = spec["family"] == "tcp"
    bufs: dict[Any, bytearray] = {}
    out: dict[Any, bytearray] = {}
    accepted = [0]
    stopped = [False]
    persist = bool(spec.get("persist"))
    _echo_live(spec, lambda: stopped.__setitem__(0, True))
    # a persistent server wakes once a second to see a SIGTERM's flag
    timeout = 1.0 if persist else None

    def accept(mask: int) -> None:
        while True:
            try:
                c, _a = lsock.accept()
            except BlockingIOError:
                return
            c.setblocking(False)
            if tcp:
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            bufs[c] = bytearray()
            accepted[0] += 1
            sel.register(c, selectors.EVENT_READ, read)

    def close(c: Any) -> None:
        sel.unregister(c)
        bufs.pop(c, None)
        out.pop(c, None)
        c.close()

    def send(c: Any, data: bytes) -> None:
        if c in out:
            out[c] += data
            return
        try:
            k = c.send(data)
        except BlockingIOError:
            k = 0
        except OSError:
            close(c)
            return
        if k < len(data):
            out[c] = bytearray(data[k:])
            sel.modify(c, selectors.EVENT_READ | selectors.EVENT_WRITE, read)

    def message_received(c: Any, msg: bytes) -> None:
        send(c, len(msg).to_bytes(4, "big") + msg)

    def flush(c: Any) -> None:
        data = out[c]
        try:
            k = c.send(data)
        except BlockingIOError:
            return
        except OSError:
            close(c)
            return
        del data[:k]
        if not data:
            del out[c]
            sel.modify(c, selectors.EVENT_READ, read)

    def read(c: Any, mask: int = selectors.EVENT_READ) -> None:
        if mask & selectors.EVENT_WRITE and c in out:
            flush(c)
        if not mask & selectors.EVENT_READ or c not in bufs:
            return
        try:
            data = c.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            close(c)
            return
        if not data:
            close(c)
            return
        buf = bufs[c]
        buf += data
        pos, end = 0, len(buf)
        while end - pos >= 4:
            n = int.from_bytes(buf[pos:pos + 4], "big", signed=True)
            if n < 0:
                close(c)
                return
            if end - pos - 4 < n:
                break
            msg = bytes(buf[pos + 4:pos + 4 + n])
            pos += 4 + n
            message_received(c, msg)
        del buf[:pos]

    sel.register(lsock, selectors.EVENT_READ, accept)
    _echo_ready(ready, lsock.getsockname())
    while not stopped[0] and (persist or not accepted[0] or bufs):
        for key, mask in sel.select(timeout):
            if key.data is accept:
                accept(mask)
            else:
                read(key.fileobj, mask)
    sel.close()
    lsock.close()


def _echo_socketserver_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    import socketserver
    tcp = spec["family"] == "tcp"
    _raise_nofile(spec.get("conns", 100) + 64)
    base: Any = socketserver.ThreadingTCPServer if tcp else socketserver.ThreadingUnixStreamServer

    class Server(base):  # type: ignore[misc]  # the base depends on the family
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = ECHO_BACKLOG

    # shutdown() waits for serve_forever to return: it must not block the handler thread
    live = _echo_live(spec, lambda: threading.Thread(target=srv.shutdown, daemon=True).start())

    class Handler(socketserver.StreamRequestHandler):
        disable_nagle_algorithm = tcp   # TCP_NODELAY is a TCP option only

        def setup(self) -> None:
            super().setup()
            live.opened()

        def handle(self) -> None:
            read, write = self.rfile.read, self.wfile.write
            while True:
                head = read(4)
                if len(head) < 4:
                    return
                n = int.from_bytes(head, "big", signed=True)
                if n < 0:
                    return
                msg = read(n)
                if len(msg) < n:
                    return
                self.message_received(msg, write)

        def message_received(self, msg: bytes, write: Callable[[bytes], object]) -> None:
            write(len(msg).to_bytes(4, "big") + msg)

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                live.closed()

    srv = Server(_listen_address(spec), Handler)
    _echo_ready(ready, srv.server_address)
    srv.serve_forever(poll_interval=0.05)
    srv.server_close()


def _asyncio_echo_protocol(asyncio: Any, live: _Live) -> Any:
    import struct
    unpack_from = struct.Struct("!i").unpack_from
    pack = struct.Struct("!i").pack

    class Echo(asyncio.Protocol):  # type: ignore[misc]  # asyncio comes in as a parameter
        """Frames cut in Python: what an asyncio message server does."""

        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.buf = b""
            live.opened()

        def data_received(self, data: bytes) -> None:
            if self.buf:
                data = self.buf + data
            pos, end = 0, len(data)
            while end - pos >= 4:
                n = unpack_from(data, pos)[0]
                if n < 0:
                    self.transport.abort()
                    return
                if end - pos - 4 < n:
                    break
                self.message_received(data[pos + 4:pos + 4 + n])
                pos += 4 + n
            self.buf = data[pos:] if pos < end else b""

        def message_received(self, msg: bytes) -> None:
            self.transport.write(pack(len(msg)) + msg)

        def connection_lost(self, exc: BaseException | None) -> None:
            live.closed()

    return Echo


def _echo_asyncio_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    import asyncio
    import signal
    loop: Any
    if spec["impl"] == "uvloop":
        try:
            import uvloop  # type: ignore[import-not-found, unused-ignore]  # optional (bench extra)
        except ImportError:
            raise NotAvailable("uvloop is not installed")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    live = _echo_live(spec, loop.stop, lambda stop: loop.add_signal_handler(signal.SIGTERM, stop))
    echo = _asyncio_echo_protocol(asyncio, live)
    sock = _echo_listen(spec)
    if spec["family"] == "tcp":
        start = loop.create_server(echo, sock=sock, backlog=ECHO_BACKLOG)
    else:
        start = loop.create_unix_server(echo, sock=sock, backlog=ECHO_BACKLOG)
    server = loop.run_until_complete(start)
    _echo_ready(ready, sock.getsockname())
    loop.run_forever()
    server.close()
    if not spec.get("persist"):
        # since 3.12 wait_closed() also waits for open connections, which a
        # SIGTERM to a persistent server may leave behind
        loop.run_until_complete(server.wait_closed())
    loop.close()


def _echo_fastnet_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    fastnet = _fastnet(spec)
    _need(fastnet, "EventLoop")
    import signal

    from fastnet.loop import Protocol

    loop = fastnet.EventLoop()
    live = _echo_live(spec, loop.stop, lambda stop: loop.add_signal_handler(signal.SIGTERM, stop))

    class Echo(Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            live.opened()

        def message_received(self, data: bytes) -> None:
            self.transport.send_bytes(data)

        def connection_lost(self, exc: BaseException | None) -> None:
            live.closed()

    sock = _echo_listen(spec)
    loop.create_server(sock, Echo)
    _echo_ready(ready, sock.getsockname())
    loop.run_forever()
    loop.close()


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far, or None without /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _echo_client(spec: dict[str, Any], address: Any) -> Any:
    """The load of every echo row: ``conns`` connections in ping-pong, one process.

    epoll (poll elsewhere) and os.read/os.write on the raw descriptors: the
    cheapest loop Python has, so that the server rather than the client is
    what the rows compare."""
    import select
    import socket
    conns = spec["conns"]
    _raise_nofile(conns + 64)
    where, pid = _addr(address["address"]), address["pid"]
    msg = (bytes(range(256)) * (spec["size"] // 256 + 1))[:spec["size"]]
    frame = len(msg).to_bytes(4, "big") + msg
    flen = len(frame)
    tcp = spec["family"] == "tcp"
    socks = []
    try:
        for _ in range(conns):
            s = socket.socket(_socket_family(spec), socket.SOCK_STREAM)
            socks.append(s)
            s.connect(where)
            if tcp:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(select, "epoll"):
            ep = select.epoll()
            for s in socks:
                ep.register(s.fileno(), select.EPOLLIN)

            def poll() -> list[tuple[int, int]]:
                return ep.poll(10.0)
        else:
            pl = select.poll()
            for s in socks:
                pl.register(s.fileno(), select.POLLIN)

            def poll() -> list[tuple[int, int]]:
                return pl.poll(10000)
        read, write, clock = os.read, os.write, time.perf_counter
        partial: dict[int, bytes] = {}

        def pump(seconds: float) -> tuple[int, float]:
            """Keep every connection busy for ``seconds``; (round trips, seconds taken)."""
            done = 0
            t0 = clock()
            end = t0 + seconds
            while True:
                events = poll()
                if not events:
                    raise TimeoutError("echo: no reply for 10 s")
                for fd, _ev in events:
                    data = read(fd, 65536)
                    if data == frame:   # the usual case: one whole reply
                        write(fd, frame)
                        done += 1
                        continue
                    if not data:
                        raise EOFError("echo: the server closed a connection")
                    data = partial.pop(fd, b"") + data
                    while len(data) >= flen:
                        if data[:flen] != frame:
                            raise ValueError("echo: the reply differs from the message")
                        data = data[flen:]
                        write(fd, frame)
                        done += 1
                    if data:
                        partial[fd] = data
                now = clock()
                if now >= end:
                    return done, now - t0

        for s in socks:
            write(s.fileno(), frame)
        pump(spec["warmup"])
        samples, total, cpu = [], 0, 0.0
        for _ in range(spec["repeat"]):
            c0 = _cpu_seconds(pid)
            n, t = pump(spec["sample"])
            c1 = _cpu_seconds(pid)
            samples.append(n / t)
            total += n
            cpu += (c1 - c0) if c0 is not None and c1 is not None else float("nan")
    finally:
        for s in socks:
            s.close()
    info: dict[str, Any] = {"conns": conns, "round_trips": total}
    if cpu == cpu and total:     # not NaN: /proc was there
        info["server_cpu_us_per_rt"] = round(cpu / total * 1e6, 3)
    return {"samples": samples, "info": info}


# ---- fdpass ----
# The receiver listens on AF_UNIX; per burst the sender announces n
# (b"N" + 8 bytes; n = 0 ends) and waits for b"G", then sends n descriptors of
# /dev/null, one per message, and waits for b"A".  The receiver checks every
# descriptor it gets with fstat, closes it, and acknowledges the burst.

def _fdpass_api(spec: dict[str, Any]) -> tuple[Callable[[Any, int], object], Callable[[Any], int]]:
    """(send(sock, fd), recv(sock) -> fd) of an fdpass row."""
    impl = spec["impl"]
    if impl == "mp-reduction":
        from multiprocessing import reduction
        pid = os.getppid()  # send_handle uses the peer's pid on Windows only

        def send(sock: Any, fd: int) -> None:
            reduction.send_handle(sock, fd, pid)
        return send, reduction.recv_handle
    if impl == "send_fds":
        import socket
        if not hasattr(socket, "send_fds"):
            raise NotAvailable("socket.send_fds needs Python 3.9 or later")
        send_fds, recv_fds, one = socket.send_fds, socket.recv_fds, [b"\x01"]

        def send_one(sock: Any, fd: int) -> object:
            return send_fds(sock, one, [fd])

        def recv(sock: Any) -> int:
            return recv_fds(sock, 1, 1)[1][0]
        return send_one, recv
    fastnet = _fastnet(spec)
    _need(fastnet, "send_fd", "recv_fd")
    return fastnet.send_fd, fastnet.recv_fd


def _fdpass_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    import socket
    if spec["family"] != "unix":
        raise NotAvailable("descriptors pass over AF_UNIX only")
    _, recv = _fdpass_api(spec)
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(spec["path"])
    ls.listen(1)
    ready(spec["path"])
    sock, _ = ls.accept()
    ls.close()
    want = os.stat(os.devnull).st_rdev
    fstat, close = os.fstat, os.close
    while True:
        ctrl = _recv_exact(sock, 9)
        if len(ctrl) < 9 or ctrl[:1] != b"N":
            break
        n = int.from_bytes(ctrl[1:], "big")
        if n == 0:
            break
        sock.sendall(b"G")
        for _ in range(n):
            fd = recv(sock)
            try:
                if fstat(fd).st_rdev != want:
                    raise ValueError(f"fdpass: descriptor {fd} is not {os.devnull}")
            finally:
                close(fd)
        sock.sendall(b"A")
    sock.close()


def _fdpass_client(spec: dict[str, Any], address: Any) -> Any:
    import socket
    send, _ = _fdpass_api(spec)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)
    fd = os.open(os.devnull, os.O_RDONLY)

    def burst(k: int) -> float:
        sock.sendall(b"N" + k.to_bytes(8, "big"))
        if _recv_exact(sock, 1) != b"G":
            raise ValueError("fdpass: bad go")
        t0 = time.perf_counter()
        for _ in range(k):
            send(sock, fd)
        if _recv_exact(sock, 1) != b"A":
            raise ValueError("fdpass: bad ack")
        return time.perf_counter() - t0

    try:
        out = _samples(burst, spec, 64, 256, _per_second)
        sock.sendall(b"N" + bytes(8))
    finally:
        os.close(fd)
        sock.close()
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
    ("rpc-seq", "mp-rpc"): (_rpc_mp_server, _rpc_mp_client),
    ("rpc-seq", "xmlrpc"): (_rpc_xmlrpc_server, _rpc_xmlrpc_client),
    ("rpc-seq", "zmq-rpc"): (_rpc_zmq_server, _rpc_zmq_client),
    ("rpc-seq", "pyro5"): (_rpc_pyro5_server, _rpc_pyro5_client),
    ("rpc-seq", "rpyc"): (_rpc_rpyc_server, _rpc_rpyc_client),
    ("rpc-seq", "pingpong"): (_pingpong_conn_server, _rpc_pingpong_client),
    ("rpc-seq", "fastnet"): (rpc_server, _rpc_fastnet_client),
    ("rpc-seq", "fastnet-json"): (rpc_server, _rpc_fastnet_client),
    ("rpc-seq", "fastnet-pickle"): (rpc_server, _rpc_fastnet_client),
    ("rpc-pipe", "mp-rpc"): (_rpc_mp_server, _rpc_mp_client),
    ("rpc-pipe", "zmq-rpc"): (_rpc_zmq_server, _rpc_zmq_client),
    ("rpc-pipe", "fastnet"): (rpc_server, _rpc_fastnet_pipelined_client),
    ("rpc-pipe", "fastnet-batch"): (rpc_server, _rpc_fastnet_pipelined_client),
    ("rpc-pipe", "fastnet-pbatch"): (rpc_server, _rpc_fastnet_pipelined_client),
    ("echo", "selectors"): (_echo_selectors_server, _echo_client),
    ("echo", "socketserver"): (_echo_socketserver_server, _echo_client),
    ("echo", "asyncio"): (_echo_asyncio_server, _echo_client),
    ("echo", "uvloop"): (_echo_asyncio_server, _echo_client),
    ("echo", "fastnet"): (_echo_fastnet_server, _echo_client),
    ("fdpass", "mp-reduction"): (_fdpass_server, _fdpass_client),
    ("fdpass", "send_fds"): (_fdpass_server, _fdpass_client),
    ("fdpass", "fastnet"): (_fdpass_server, _fdpass_client),
}


def _child(arg: Any) -> None:
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

    def __init__(self, key: Any, label: Any, role: Any = None, anchor: bool = False, pure: Any = None, kind: str = "py") -> None:
        self.key = key              # row key in the report
        self.label = label
        self.role = role or key     # key into _ROLES
        self.anchor = anchor
        self.pure = pure            # None: not fastnet; True/False: FASTNET_PURE
        self.kind = kind            # "py" or "c"

    @property
    def backend(self) -> Any:
        if self.pure is None:
            return None
        return "python" if self.pure else "cython"


CASES: dict[str, dict[str, Any]] = {
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
    # "columns": the rows that get a ratio column (default: the anchors);
    # "issue": whose figures and targets these are.
    "rpc-seq": {
        "title": "rpc-seq: sequential add(2, 3) calls from one client",
        "unit": "calls/s", "json_unit": "calls/s", "better": "higher", "issue": "issue #4",
        "columns": ["mp-rpc", "zmq-rpc", "pingpong"],
        # --quick: TCP only, to keep the whole quick run near a minute on 2 cores
        "quick": {"families": ("tcp",)},
        "impls": [
            Impl("mp-rpc", "pickle RPC, multiprocessing", anchor=True),
            Impl("xmlrpc", "xmlrpc (stdlib)", anchor=True),
            Impl("zmq-rpc", "pyzmq REQ/REP + msgpack", anchor=True),
            Impl("pyro5", "Pyro5", anchor=True),
            Impl("rpyc", "rpyc", anchor=True),
            Impl("pingpong", "fastnet bare pingpong 64 B", pure=False),
            Impl("fastnet", "fastnet RPC msgpack", pure=False),
        ],
    },
    "rpc-pipe": {
        "title": "rpc-pipe: add(2, 3) with {window} calls in flight on one connection",
        "unit": "calls/s", "json_unit": "calls/s", "better": "higher", "issue": "issue #4",
        # --quick: TCP only, without the multiprocessing row (Nagle stalls make
        # it slow to measure over TCP) and the plain call_async batches
        "quick": {"families": ("tcp",), "skip": ("mp-rpc", "fastnet-batch")},
        "impls": [
            Impl("mp-rpc", "pickle RPC, mp: 64 sent, 64 read", anchor=True),
            Impl("zmq-rpc", "pyzmq DEALER/ROUTER + msgpack", anchor=True),
            Impl("fastnet", "fastnet call_async, window", pure=False),
            Impl("fastnet-batch", "fastnet call_async, batches", pure=False),
            Impl("fastnet-pbatch", "fastnet proxy.batch(), batches", pure=False),
        ],
    },
    "echo": {
        "title": "echo: {conns} connections in ping-pong, {size}-byte framed messages, one epoll client",
        "unit": "rt/s", "json_unit": "roundtrips/s", "better": "higher", "issue": None,
        # --quick: TCP only, to keep the whole quick run under a minute on 2 cores
        "quick": {"families": ("tcp",)},
        "impls": [
            Impl("selectors", "selectors loop (stdlib)", anchor=True),
            Impl("socketserver", "socketserver, a thread per conn", anchor=True),
            Impl("asyncio", "asyncio Protocol", anchor=True),
            Impl("uvloop", "uvloop Protocol", anchor=True),
            Impl("fastnet", "fastnet EventLoop", pure=False),
            Impl("fastnet-pure", "fastnet EventLoop (pure)", role="fastnet", pure=True),
        ],
    },
    # "families": the only families a case runs in (the others are not listed)
    "fdpass": {
        "title": "fdpass: one descriptor per message, received, checked with fstat and closed",
        "unit": "fd/s", "json_unit": "fd/s", "better": "higher", "issue": None,
        "families": ("unix",),
        "impls": [
            Impl("mp-reduction", "multiprocessing.reduction", anchor=True),
            Impl("send_fds", "socket.send_fds/recv_fds", anchor=True),
            Impl("fastnet", "fastnet send_fd/recv_fd", pure=False),
            Impl("fastnet-pure", "fastnet send_fd/recv_fd (pure)", role="fastnet", pure=True),
        ],
    },
}

# Names for --only that stand for several cases.
GROUPS = {"rpc": ["rpc-seq", "rpc-pipe"]}

FAMILIES = {"tcp": "TCP", "unix": "AF_UNIX"}

# Issue #2's targets.  ("ratio", num, den, op, bound): value(num)/value(den);
# ("value", impl, op, bound): an absolute number; ("report", num, den): a
# ratio shown without a bound.
TARGETS: list[tuple[Any, ...]] = [
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
    ("rpc-seq", None, "msgpack RPC >= 2.5x mp pickle RPC", ("ratio", "fastnet", "mp-rpc", ">=", 2.5)),
    ("rpc-seq", None, "msgpack RPC >= 35k calls/s", ("value", "fastnet", ">=", 35e3)),
    ("rpc-seq", None, "RPC within 1.3x bare pingpong (time ratio)", ("ratio", "pingpong", "fastnet", "<=", 1.3)),
    ("rpc-pipe", None, "window of 64 >= 150k calls/s", ("value", "fastnet", ">=", 150e3)),
    ("rpc-pipe", None, "batches of 64 >= 150k calls/s", ("value", "fastnet-batch", ">=", 150e3)),
    ("rpc-pipe", None, "proxy.batch() of 64 >= 150k calls/s", ("value", "fastnet-pbatch", ">=", 150e3)),
    ("echo", None, "fastnet vs uvloop", ("report", "fastnet", "uvloop")),
    ("echo", None, "fastnet vs selectors", ("report", "fastnet", "selectors")),
    ("echo", None, "compiled vs pure speed-up", ("report", "fastnet", "fastnet-pure")),
    ("fdpass", None, "fastnet vs multiprocessing.reduction", ("report", "fastnet", "mp-reduction")),
    ("fdpass", None, "fastnet vs socket.send_fds", ("report", "fastnet", "send_fds")),
]

PROFILES = {
    # rounds: fresh process pairs per row; repeat: timed samples per pair.
    # conns: connections of the echo case.
    "full": dict(rounds=3, repeat=5, warmup=0.2, sample=0.3, bulk_mib=256, bulk_warmup=1, timeout=300.0,
                 conns=100),
    "quick": dict(rounds=1, repeat=5, warmup=0.05, sample=0.08, bulk_mib=32, bulk_warmup=1, timeout=60.0,
                  conns=100),
}


def _package_root() -> Any:
    """The directory that holds the fastnet package this file belongs to."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child_env(impl: Any) -> Any:
    env = dict(os.environ)
    # Each row says which kernels it runs, whatever the caller's environment.
    env.pop("FASTNET_PURE", None)
    if impl.pure:
        env["FASTNET_PURE"] = "1"
    root = _package_root()
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def build_floor(workdir: Any) -> Any:
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


def _python_cmd(spec: dict[str, Any]) -> Any:
    return [sys.executable, "-c", _BOOT, os.path.abspath(__file__), json.dumps(spec)]


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
            server = [self.floor, "server", family] + ([path] if family == "unix" else [])
            cfg = self.cfg

            def client(address: Any) -> Any:
                where = str(address[1]) if family == "tcp" else address
                return [self.floor, "client", family, where, str(cfg["size"]),
                        str(cfg["warmup"]), str(cfg["sample"]), str(cfg["repeat"])]
            return server, client
        sspec = self.spec(case, impl, family, "server")
        cspec = dict(sspec, role="client")

        def client(address: Any) -> Any:  # type: ignore[no-redef]
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
                    "issue_anchor": ISSUE_ANCHORS.get((case, family, impl.key)),
                }
            report["results"][case][family] = rows
    report["targets"] = _targets(report, cases, families)
    return report


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


def _progress_line(rnd: Any, rounds: Any, case: Any, family: Any, impl: Any, slot: Any, out: Any) -> str:
    unit = CASES[case]["unit"]
    if "na" in out:
        shown = "n/a: " + out["na"]
    else:
        shown = f"{_fmt(statistics.median(out['samples']))} {unit}"
    return f"[{rnd + 1}/{rounds}] {case:9s} {FAMILIES[family]:7s} {impl.label:32s} {shown}"


def _ratio(rows: Any, num: Any, den: Any) -> Any:
    a, b = rows.get(num, {}).get("median"), rows.get(den, {}).get("median")
    if a is None or b is None or b == 0:
        return None
    return a / b


def _targets(report: dict[str, Any], cases: Any, families: Any) -> list[dict[str, Any]]:
    out = []
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
            entry: dict[str, Any] = {"case": case, "family": family, "target": text}
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
    m = report["machine"]
    vers = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [
        f"fastnet bench  {report['date']}  ({'quick' if cfg['quick'] else 'full'} profile, "
        f"{report['elapsed_s']:g} s)",
        f"machine: {m['cpu']}, {m['cpus']} CPUs, {m['platform']}; {vers}",
        f"each row: median of {cfg['rounds']} fresh process pair(s) x {cfg['repeat']} samples; "
        f"CPU placement: {_PIN_TEXT[cfg['pin']]}; ratio columns are value / that row's value",
    ]
    notes = []
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
        issue = spec.get("issue", "issue #2")
        head = f"{'':8s} {'':32s} {'median':>9s}" + "".join(f" {'/' + _short(a):>9s}" for a in anchors) \
            + (f" {issue:>9s}" if issue else "")
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
                    cells += f"{_fmt(row['median']):>9s}"
                    for a in anchors:
                        r = _ratio(rows, impl.key, a.key)
                        cells += f" {('%.2f' % r) if r is not None else '-':>9s}"
                    if row["issue_anchor"] is not None:
                        cells += f" {_fmt(row['issue_anchor']):>9s}"
                lines.append(cells.rstrip())
    if report["targets"] and not cfg.get("anchors_only"):
        issues = sorted({CASES[t["case"]].get("issue", "issue #2") or "" for t in report["targets"]})
        # cases without an issue of their own only report ratios
        heading = " and ".join(i for i in issues if i) + " targets" if any(issues) else "targets"
        lines += ["", heading + (" and reported ratios" if "" in issues and any(issues) else "")]
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


def _short(impl: Any) -> Any:
    return {"c": "C", "mp": "mp", "zmq": "zmq", "socket": "socket",
            "mp-bytes": "mp bytes", "mp-pickle": "mp send", "mp-rpc": "mp rpc",
            "zmq-rpc": "zmq", "selectors": "selector", "socketserver": "sockserv",
            "mp-reduction": "mp"}.get(impl.key, impl.key)


def _parse(argv: Any) -> Any:
    p = argparse.ArgumentParser(
        prog="fastnet bench",
        description="Compare fastnet with the C floor, multiprocessing.connection, "
                    "pyzmq, plain sockets and RPC libraries over loopback; medians and "
                    "ratios in one run.")
    p.add_argument("--quick", action="store_true",
                   help="short samples, one round, 32 MiB bulk, rpc and echo cases over TCP only "
                        "(under a minute on 2 cores)")
    p.add_argument("--only", metavar="NAME,...",
                   help=f"cases to run, comma-separated: {','.join(CASES)} "
                        f"(rpc: {','.join(GROUPS['rpc'])})")
    p.add_argument("--family", metavar="NAME,...", default="tcp,unix",
                   help="tcp, unix or both (default both; fdpass runs over unix only)")
    p.add_argument("--anchors", action="store_true",
                   help="run only the anchors (C floor, multiprocessing, pyzmq, plain sockets, "
                        "xmlrpc, Pyro5, rpyc)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw fastnet's speed-up over the best peer per case as a bar chart (matplotlib)")
    p.add_argument("--rounds", type=int, help="fresh process pairs per row")
    p.add_argument("--repeat", type=int, help="timed samples per pair")
    p.add_argument("--sample", type=float, help="seconds per timed sample")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per pair")
    p.add_argument("--bulk-mib", type=float, help="bulk array size in MiB")
    p.add_argument("--batch", type=int, help="messages per send_many call (default 128)")
    p.add_argument("--conns", type=int, help="connections of the echo case (default 100)")
    p.add_argument("--timeout", type=float, help="seconds before a pair is abandoned")
    p.add_argument("--pin", choices=("none", "same", "split"), default="none",
                   help="CPU placement of each pair: none (the scheduler's choice, default), "
                        "same (one CPU for both) or split (one CPU each)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


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


class _Progress:
    """A tqdm bar on stderr when tqdm is installed and stderr is a terminal, else a line per pair."""

    def __init__(self) -> None:
        self.bar: Any = None

    def total(self, n: int) -> None:
        if not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm  # type: ignore[import-untyped, import-not-found, unused-ignore]  # optional
        except ImportError:
            return
        self.bar = tqdm(total=n, unit="pair", file=sys.stderr, leave=False, dynamic_ncols=True)

    def __call__(self, text: Any) -> None:
        if self.bar is None:
            print(text, file=sys.stderr, flush=True)
            return
        self.bar.set_description_str(str(text)[:60])
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: Sequence[str] | None = None) -> int:
    """The ``fastnet bench`` command.  Returns the exit status."""
    args = _parse(argv)
    cases = [c.strip() for c in args.only.split(",") if c.strip()] if args.only else None
    families = tuple(f.strip() for f in args.family.split(",") if f.strip())
    bar = _Progress()
    try:
        report = run(cases, quick=args.quick, families=families, anchors_only=args.anchors,
                     progress=None if args.quiet else bar,
                     total=None if args.quiet else bar.total,
                     rounds=args.rounds, repeat=args.repeat, sample=args.sample,
                     warmup=args.warmup, bulk_mib=args.bulk_mib, batch=args.batch, conns=args.conns,
                     timeout=args.timeout, pin=args.pin)
    except ValueError as exc:
        print(f"fastnet bench: {exc}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    report["command"] = "fastnet bench " + " ".join(sys.argv[1:] if argv is None else argv)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    if args.plot:
        try:
            plot(report, args.plot)
        except ValueError as exc:
            print(f"fastnet bench: {exc}", file=sys.stderr)
            return 2
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
