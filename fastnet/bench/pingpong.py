"""The pingpong case: one message, one reply, one at a time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .common import (Impl, _accept_one, _addr, _conn_module, _conn_options, _samples, _us_per_op, _with_cpu_share,
                     _zmq, _zmq_bind, _zmq_close)


def _echo_until_eof(conn: Any) -> None:
    """Send every message back until the peer closes, then close."""
    send, recv = conn.send_bytes, conn.recv_bytes
    try:
        while True:
            send(recv())
    except EOFError:
        pass
    conn.close()


def _pingpong_conn_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    mod = _conn_module(spec)
    _echo_until_eof(_accept_one(spec, mod, ready, **_conn_options(spec, mod)))


def _round_trips(send: Callable[[bytes], Any], recv: Callable[[], bytes], size: int) -> Callable[[int], float]:
    """Check one echo of a ``size``-byte payload; return the timed step: ``k`` round trips, in seconds."""
    payload = b"p" * size
    send(payload)
    if recv() != payload:
        raise ValueError("echo mismatch")

    def step(k: int) -> float:
        t0 = time.perf_counter()
        for _ in range(k):
            send(payload)
            recv()
        return time.perf_counter() - t0
    return step


def _pingpong_conn_client(spec: dict[str, Any], address: Any) -> Any:
    mod = _conn_module(spec)
    conn = mod.Client(_addr(address), **_conn_options(spec, mod))
    step = _round_trips(conn.send_bytes, conn.recv_bytes, spec["size"])
    out = _with_cpu_share(lambda: _samples(step, spec, 64, 100, _us_per_op))
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
    send, recv = req.send, req.recv
    out = _samples(_round_trips(send, recv, spec["size"]), spec, 64, 100, _us_per_op)
    send(b"STOP")
    recv()
    _zmq_close(ctx, req)
    return out


# (case, impl) -> (server, client) for the Python children.
ROLES: dict[tuple[str, str], Any] = {
    ("pingpong", "mp"): (_pingpong_conn_server, _pingpong_conn_client),
    ("pingpong", "zmq"): (_pingpong_zmq_server, _pingpong_zmq_client),
    ("pingpong", "fastnet"): (_pingpong_conn_server, _pingpong_conn_client),
    ("pingpong", "fastnet-readahead"): (_pingpong_conn_server, _pingpong_conn_client),
    ("pingpong", "fastnet-spin"): (_pingpong_conn_server, _pingpong_conn_client),
}

CASES: dict[str, dict[str, Any]] = {
    "pingpong": {
        "title": "pingpong: {size}-byte round trip",
        "unit": "µs", "json_unit": "us/roundtrip", "better": "lower",
        "impls": [
            Impl("c", "C floor (write+read)", anchor=True, kind="c"),
            Impl("mp", "multiprocessing.connection", anchor=True),
            Impl("zmq", "pyzmq REQ/REP", anchor=True),
            Impl("fastnet", "fastnet send/recv_bytes", pure=False),
            # the opt-in: a Connection that reads from the socket all that has
            # arrived, where the default takes only the message it returns
            Impl("fastnet-readahead", "fastnet send/recv, read-ahead", pure=False),
            # the opt-in: both ends busy-poll a receive for up to 50 µs before
            # they sleep, burning CPU to skip the scheduler's wake-up
            Impl("fastnet-spin", "fastnet, spin 50 µs", pure=False),
            Impl("fastnet-pure", "fastnet (pure kernels)", role="fastnet", pure=True),
            Impl("fastnet-readahead-pure", "fastnet read-ahead (pure)", role="fastnet-readahead", pure=True),
        ],
    },
}

TARGETS: list[tuple[Any, ...]] = [
    ("pingpong", None, "fastnet within 1.4x the C floor (time ratio)", ("ratio", "fastnet", "c", "<=", 1.4)),
    ("pingpong", None, "fastnet >= 3x faster than multiprocessing", ("ratio", "mp", "fastnet", ">=", 3.0)),
    ("pingpong", None, "compiled vs pure speed-up", ("report", "fastnet-pure", "fastnet")),
    ("pingpong", None, "read-ahead speed-up over the default", ("report", "fastnet", "fastnet-readahead")),
    ("pingpong", None, "spin 50 µs within 0.5x the C floor (time ratio; processes on different CPUs: --pin split)",
     ("ratio", "fastnet-spin", "c", "<=", 0.5)),
]
