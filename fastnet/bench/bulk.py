"""The bulk case: one large float64 array per transfer."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .common import (Impl, _accept_one, _addr, _conn_module, _listen_address, _need, _numpy, _recv_exact,
                     _socket_family, _zmq, _zmq_bind, _zmq_close)


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
    shm = impl.startswith("fastnet-shm")
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
        elif shm:
            # a usable array over the mapped segment, released when dropped
            a = conn.recv_array()
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
    if impl == "fastnet-shm-empty":
        # the array made in shared memory from the start: sent without a copy
        shared = mod.shm.empty(arr.shape, arr.dtype)
        shared[...] = arr
        arr = shared
    if impl == "mp-bytes":
        send = conn.send_bytes
    elif impl == "mp-pickle":
        send = conn.send
    elif impl.startswith("fastnet-shm"):
        _need(conn, "send_array")

        def send(a: Any) -> None:
            conn.send_array(a, shm=True)
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


# (case, impl) -> (server, client) for the Python children.
ROLES: dict[tuple[str, str], Any] = {
    ("bulk", "socket"): (_bulk_socket_server, _bulk_socket_client),
    ("bulk", "mp-bytes"): (_bulk_conn_server, _bulk_conn_client),
    ("bulk", "mp-pickle"): (_bulk_conn_server, _bulk_conn_client),
    ("bulk", "zmq"): (_bulk_zmq_server, _bulk_zmq_client),
    ("bulk", "fastnet"): (_bulk_conn_server, _bulk_conn_client),
    ("bulk", "fastnet-shm"): (_bulk_conn_server, _bulk_conn_client),
    ("bulk", "fastnet-shm-empty"): (_bulk_conn_server, _bulk_conn_client),
}

CASES: dict[str, dict[str, Any]] = {
    "bulk": {
        "title": "bulk: {mib:g} MiB float64 array",
        "unit": "GB/s", "json_unit": "GB/s", "better": "higher",
        "impls": [
            Impl("socket", "socket sendall/recv_into", anchor=True),
            Impl("mp-bytes", "multiprocessing send_bytes", anchor=True),
            Impl("mp-pickle", "multiprocessing send(arr)", anchor=True),
            Impl("zmq", "pyzmq copy=False", anchor=True),
            Impl("fastnet", "fastnet send_array/recv_array", pure=False),
            # the opt-in: one copy into a pooled memfd segment, its descriptor
            # passed, the receiver's array over the mapping (AF_UNIX only)
            Impl("fastnet-shm", "fastnet send_array, shared memory", pure=False),
            # ... and an array made by fastnet.shm.empty: its segment passed as it is
            Impl("fastnet-shm-empty", "fastnet send_array, shared memory, shm.empty array", pure=False),
        ],
    },
}

TARGETS: list[tuple[Any, ...]] = [
    ("bulk", None, "send_array >= 0.95x plain socket", ("ratio", "fastnet", "socket", ">=", 0.95)),
    ("bulk", None, "send_array >= 3x multiprocessing send_bytes", ("ratio", "fastnet", "mp-bytes", ">=", 3.0)),
    ("bulk", None, "send_array >= 2x pyzmq", ("ratio", "fastnet", "zmq", ">=", 2.0)),
    # the one copy into the segment runs at memcpy speed (about 23 ms for
    # 256 MiB here) and mapping it at the receiver adds about 7 ms: near 2x;
    # an array made by shm.empty skips the copy
    ("bulk", "unix", "send_array through shared memory >= 3x plain socket (bound: one memcpy)",
     ("ratio", "fastnet-shm", "socket", ">=", 3.0)),
    ("bulk", "unix", "send_array of a shm.empty array >= 3x plain socket",
     ("ratio", "fastnet-shm-empty", "socket", ">=", 3.0)),
]
