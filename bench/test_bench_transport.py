"""Transport benchmarks: fastnet beside multiprocessing.connection.

Same cases as ``fastnet bench`` (pingpong, stream, bulk, handshake, over TCP
and AF_UNIX), as pytest-benchmark tests: the server is a child process, the
timed code is the client.  They check results, never timings.  The kernel
set is the one this process loads (FASTNET_PURE=1 selects the pure twins,
and the server child inherits it).
"""
import contextlib
import os

import pytest

from benchutil import common, connection_module, handshake, record_rate, require, stream

IMPLS = ["multiprocessing", "fastnet"]
FAMILIES = ["tcp", "unix"]
PAYLOAD = b"p" * common.PAYLOAD_SIZE


def _role(impl):
    return "mp" if impl == "multiprocessing" else "fastnet"


def _backend(benchmark, mod):
    benchmark.extra_info["backend"] = getattr(mod, "backend", "stdlib")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", IMPLS)
def test_pingpong(benchmark, serve, impl, family):
    mod = connection_module(impl)
    benchmark.group = f"pingpong {family}: {len(PAYLOAD)}-byte round trip"
    _backend(benchmark, mod)
    with serve("pingpong", _role(impl), family) as address:
        with contextlib.closing(mod.Client(address)) as conn:
            send, recv = conn.send_bytes, conn.recv_bytes

            def round_trip():
                send(PAYLOAD)
                return recv()

            assert round_trip() == PAYLOAD
            benchmark(round_trip)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", IMPLS + ["fastnet-batch"])
def test_stream(benchmark, serve, impl, family, stream_n):
    mod = connection_module("fastnet" if impl == "fastnet-batch" else impl)
    benchmark.group = f"stream {family}: {stream_n} one-way {len(PAYLOAD)}-byte messages"
    benchmark.extra_info["messages"] = stream_n
    _backend(benchmark, mod)
    batch = 128 if impl == "fastnet-batch" else 0
    role = "fastnet-batch" if batch else _role(impl)
    with serve("stream", role, family, size=len(PAYLOAD)) as address:
        with contextlib.closing(mod.Client(address)) as conn:
            if batch:
                require(conn, "send_many", "recv_many")
                benchmark.extra_info["batch"] = batch
            # The server counts and compares every message and answers only
            # when all n have arrived, so a timed burst is a delivered burst.
            burst = stream.stream_sender(conn, stream.stream_payload(len(PAYLOAD)), batch)
            benchmark(burst, stream_n)
            conn.send_bytes(common.CTRL_STOP)
    record_rate(benchmark, stream_n, "msg_per_s")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", IMPLS)
def test_bulk(benchmark, serve, impl, family, bulk_nbytes):
    np = pytest.importorskip("numpy")
    mod = connection_module(impl)
    benchmark.group = f"bulk {family}: {bulk_nbytes / 2 ** 20:g} MiB float64 array"
    benchmark.extra_info["bytes"] = bulk_nbytes
    _backend(benchmark, mod)
    arr = np.arange(bulk_nbytes // 8, dtype=np.float64)
    role = "mp-bytes" if impl == "multiprocessing" else "fastnet"
    with serve("bulk", role, family, nbytes=bulk_nbytes) as address:
        with contextlib.closing(mod.Client(address)) as conn:
            if impl == "multiprocessing":
                send = conn.send_bytes
            else:
                require(conn, "send_array", "recv_array")
                send = conn.send_array

            def transfer():
                # The server checks sampled elements after each acknowledgement.
                conn.send_bytes(b"B")
                assert conn.recv_bytes() == b"G"
                send(arr)
                assert conn.recv_bytes() == b"A"

            benchmark.pedantic(transfer, rounds=5, warmup_rounds=1)
            conn.send_bytes(b"S")
    record_rate(benchmark, bulk_nbytes / 1e9, "GB_per_s")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", IMPLS)
def test_handshake(benchmark, serve, impl, family):
    mod = connection_module(impl)
    benchmark.group = f"handshake {family}: connect + authkey both ways + echo + close"
    _backend(benchmark, mod)
    key = os.urandom(32)
    with serve("handshake", _role(impl), family, authkey=key) as address:
        try:
            benchmark(handshake.handshake_once, mod, address, key, PAYLOAD)
        finally:
            with contextlib.closing(mod.Client(address, authkey=key)) as conn:
                conn.send_bytes(b"STOP")
    record_rate(benchmark, 1, "conn_per_s")
