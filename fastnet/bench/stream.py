"""The stream case: one-way messages, each checked by the receiver."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .common import (CTRL_STOP, Impl, _accept_one, _addr, _conn_module, _conn_options, _need, _per_second, _samples,
                     _zmq, _zmq_bind, _zmq_close)


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
    conn = _accept_one(spec, mod, ready, **_conn_options(spec, mod))
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
        conn = mod.Client(_addr(address), **_conn_options(spec, mod))
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


# (case, impl) -> (server, client) for the Python children.
ROLES: dict[tuple[str, str], Any] = {
    ("stream", "mp"): (_stream_conn_server, _stream_conn_client),
    ("stream", "zmq"): (_stream_zmq_server, _stream_zmq_client),
    ("stream", "fastnet"): (_stream_conn_server, _stream_conn_client),
    ("stream", "fastnet-batch"): (_stream_conn_server, _stream_conn_client),
    ("stream", "fastnet-readahead"): (_stream_conn_server, _stream_conn_client),
    ("stream", "fastnet-batch-readahead"): (_stream_conn_server, _stream_conn_client),
    ("stream", "fastnet-nagle"): (_stream_conn_server, _stream_conn_client),
    ("stream", "fastnet-coalesce"): (_stream_conn_server, _stream_conn_client),
    ("stream", "fastnet-coalesce-readahead"): (_stream_conn_server, _stream_conn_client),
}

CASES: dict[str, dict[str, Any]] = {
    "stream": {
        "title": "stream: one-way {size}-byte messages, each checked; send_many {batch} at a time",
        "unit": "msg/s", "json_unit": "msg/s", "better": "higher",
        "impls": [
            Impl("mp", "multiprocessing send_bytes", anchor=True),
            Impl("zmq", "pyzmq PUSH/PULL", anchor=True),
            Impl("fastnet", "fastnet send_bytes", pure=False),
            Impl("fastnet-readahead", "fastnet send_bytes, read-ahead", pure=False),
            Impl("fastnet-batch", "fastnet send_many/recv_many", pure=False),
            Impl("fastnet-batch-readahead", "fastnet send_many, read-ahead", pure=False),
            Impl("fastnet-nagle", "fastnet send_bytes nodelay=False", pure=False),
            # the opt-in: send_bytes queues messages in user space and writes
            # them 64 KiB at a time; the receiver still takes one per recv_bytes
            Impl("fastnet-coalesce", "fastnet send_bytes, coalescing", pure=False),
            Impl("fastnet-coalesce-readahead", "fastnet send_bytes, coalescing + read-ahead", pure=False),
            Impl("fastnet-pure", "fastnet send_bytes (pure)", role="fastnet", pure=True),
            Impl("fastnet-readahead-pure", "fastnet send_bytes, read-ahead (pure)", role="fastnet-readahead",
                 pure=True),
            Impl("fastnet-batch-pure", "fastnet send_many (pure)", role="fastnet-batch", pure=True),
        ],
    },
}

TARGETS: list[tuple[Any, ...]] = [
    ("stream", None, "send_bytes >= 1.5x multiprocessing", ("ratio", "fastnet", "mp", ">=", 1.5)),
    ("stream", None, "send_many >= 3x pyzmq PUSH/PULL", ("ratio", "fastnet-batch", "zmq", ">=", 3.0)),
    # the default receiver reads exactly one message per call, a header then
    # its payload: two syscalls a message bound it near 1M msg/s whatever the
    # sender does; the read-ahead receiver takes a coalesced write in one
    ("stream", None, "send_bytes with coalescing >= 2x pyzmq PUSH/PULL (receiver: 2 syscalls/msg)",
     ("ratio", "fastnet-coalesce", "zmq", ">=", 2.0)),
    ("stream", None, "send_bytes with coalescing, read-ahead receiver >= 2x pyzmq PUSH/PULL",
     ("ratio", "fastnet-coalesce-readahead", "zmq", ">=", 2.0)),
    ("stream", None, "compiled vs pure speed-up, send_bytes", ("report", "fastnet", "fastnet-pure")),
    ("stream", None, "compiled vs pure speed-up, send_many", ("report", "fastnet-batch", "fastnet-batch-pure")),
    ("stream", None, "read-ahead speed-up, send_bytes", ("report", "fastnet-readahead", "fastnet")),
    ("stream", None, "read-ahead speed-up, send_many", ("report", "fastnet-batch-readahead", "fastnet-batch")),
]
