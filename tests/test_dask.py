"""fastnet:// and fastnet-tls:// as Dask distributed comms (fastnet.dask).

The comm-level tests cover the ground of distributed's own ``check_*``
helpers (tests/test_dask_upstream.py runs those when a distributed checkout
is at hand) and run under distributed's ``gen_test``, whose ``clean``
fixture fails on a comm left open or a thread left running. The cluster
tests start ``LocalCluster(protocol="fastnet", processes=True)``: the worker
processes find the backend through the ``distributed.comm.backends`` entry
point, from a dist-info directory made here (test_entry_point_of_the_built_wheel
installs the built wheel into a virtualenv instead). The multi-host tests put
the scheduler and each worker in a network namespace of its own (skipped, with
the reason, where namespaces cannot be made). The file runs once per kernel
set (``FASTNET_PURE=1``).
"""
import asyncio
import fcntl
import gc
import json
import os
import socket
import struct
import subprocess
import sys
import sysconfig
import textwrap
import time
import tracemalloc

import pytest

pytest.importorskip("distributed")
np = pytest.importorskip("numpy")
pytest.importorskip("cryptography")

import dask  # noqa: E402
from distributed.comm import CommClosedError, connect, listen, parse_address  # noqa: E402
from distributed.comm.core import FatalCommClosedError  # noqa: E402
from distributed.comm.registry import backends, get_backend  # noqa: E402
from distributed.protocol import Serialized, deserialize, serialize, to_serialize  # noqa: E402
from distributed.protocol.utils_test import get_host_array  # noqa: E402
from distributed.utils import get_ip  # noqa: E402
from distributed.utils_test import gen_test  # noqa: E402

import fastnet.dask as fdask  # noqa: E402
from fastnet import shm  # noqa: E402

from rpcutil import count_fds, segment_mappings, wait_for  # noqa: E402
from tlsutil import client_ctx, make_pki, server_ctx  # noqa: E402

MiB = 1 << 20
EXTERNAL_IP4 = get_ip()


@pytest.fixture(autouse=True)
def fastnet_backends(monkeypatch):
    """The backends as the entry point gives them where fastnet is installed with it; else registered here."""
    for scheme, cls in (("fastnet", fdask.FastnetBackend), ("fastnet-tls", fdask.FastnetTLSBackend)):
        try:
            backend = get_backend(scheme)
        except ValueError:
            backend = cls()
        assert type(backend) is cls
        monkeypatch.setitem(backends, scheme, backend)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_args(pki):
    """listen_args and connect_args for fastnet-tls:// (the client checks the server's certificate)."""
    return dict(listen_args={"ssl_context": server_ctx(pki)},
                connect_args={"ssl_context": client_ctx(pki)})


def comm_queue():
    """(queue, handler): the handler puts each comm its listener accepts on the queue, open."""
    q = asyncio.Queue()

    async def handler(comm):
        await q.put(comm)
    return q, handler


async def comm_pair(addr, listen_args=None, connect_args=None, **kw):
    """(connector's comm, listener's comm), handshaken; the listener is stopped."""
    q, handler = comm_queue()
    async with listen(addr, handler, **(listen_args or {}), **kw) as listener:
        comm = await connect(listener.contact_address, **(connect_args or {}), **kw)
    return comm, await q.get()


def _scheme(tls, tls_args):
    """(scheme, dict of listen_args and connect_args) for a test parametrised on ``tls``."""
    return ("fastnet-tls", tls_args) if tls else ("fastnet", {})


def _schemes(tls_args):
    return [(f"{scheme}://127.0.0.1", args) for scheme, args in (_scheme(False, tls_args), _scheme(True, tls_args))]


async def cancel_soon(task):
    """Cancel ``task`` once it is under way; awaiting it raises CancelledError."""
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def until_closed(comm):
    """Wait (at most 5 s) for ``comm`` to see its peer gone; it must."""
    for _ in range(500):
        if comm.closed():
            break
        await asyncio.sleep(0.01)
    assert comm.closed()


# -- listener and connector ------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True])
@gen_test()
async def test_client_server_many_clients(tls, tls_args):
    scheme, args = _scheme(tls, tls_args)

    async def handler(comm):
        try:
            assert parse_address(comm.peer_address)[0] == scheme
            msg = await comm.read()
            msg["op"] = "pong"
            await comm.write(msg)
            assert (await comm.read())["op"] == "bye"
        finally:
            await comm.close()

    # unknown connection arguments are ignored on both sides
    listener = await listen(f"{scheme}://127.0.0.1", handler, xxx="bar", **args.get("listen_args", {}))
    assert listener.listen_address == listener.contact_address
    host, port = fdask.FastnetBackend().get_address_host_port(parse_address(listener.listen_address)[1])
    assert host == "127.0.0.1" and port > 1023
    got = []

    async def client(key, delay=0.0):
        comm = await connect(listener.contact_address, xxx="foo", **args.get("connect_args", {}))
        try:
            assert comm.peer_address == listener.contact_address
            await comm.write({"op": "ping", "data": key})
            await comm.write({"op": "bye"})
            await asyncio.sleep(delay)
            assert await comm.read() == {"op": "pong", "data": key}
            got.append(key)
        finally:
            await comm.close()

    await client(-1)
    await asyncio.gather(*(client(i, 0.02) for i in range(30)))
    assert sorted(got) == [-1, *range(30)]
    listener.stop()


@gen_test()
async def test_wildcard_listener_contact_address():
    async def handler(comm):
        await comm.close()

    for addr in ("fastnet://", "fastnet://0.0.0.0", "fastnet://:0"):
        listener = await listen(addr, handler)
        assert parse_address(listener.listen_address)[1].startswith("0.0.0.0:")
        host, port = fdask.FastnetBackend().get_address_host_port(parse_address(listener.contact_address)[1])
        assert host == EXTERNAL_IP4 and port > 1023
        comm = await connect(listener.contact_address)
        await comm.close()
        listener.stop()


@gen_test()
async def test_many_listeners_distinct_addresses():
    async def handler(comm):
        pass

    listeners = [await listen("fastnet://127.0.0.1", handler) for _ in range(50)]
    assert len({l.listen_address for l in listeners}) == 50
    assert len({l.contact_address for l in listeners}) == 50
    for l in listeners:
        l.stop()


@gen_test()
async def test_stop_takes_effect_without_await_and_spares_established_comms():
    a, b = await comm_pair("fastnet://127.0.0.1")   # comm_pair has stopped its listener
    await a.write({"after": "stop"})
    assert await b.read() == {"after": "stop"}

    async def handler(comm):
        await comm.close()

    listener = await listen("fastnet://127.0.0.1", handler)
    addr = listener.contact_address
    assert listener.stop() is None
    with pytest.raises(OSError):
        await connect(addr, timeout=0.3)
    await a.close()
    await b.close()


@gen_test()
async def test_connect_timeout_is_an_oserror():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]           # bound, not listening: refused
        with pytest.raises(OSError, match="Timed out"):
            await connect(f"fastnet://127.0.0.1:{port}", timeout=0.3)


@gen_test()
async def test_connector_refuses_require_encryption_on_the_plain_scheme():
    async def handler(comm):
        await comm.close()

    async with listen("fastnet://127.0.0.1", handler) as listener:
        with pytest.raises(RuntimeError, match="encryption required"):
            await fdask.FastnetConnector().connect(parse_address(listener.contact_address)[1],
                                                   require_encryption=True)
    with pytest.raises(RuntimeError, match="encryption required"):
        fdask.FastnetBackend().get_listener("127.0.0.1", handler, True, require_encryption=True)


@gen_test()
async def test_cancelled_connect_closes_its_socket(pki):
    # a peer that accepts and never answers the TLS handshake
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    try:
        before = count_fds()
        for _ in range(5):
            await cancel_soon(asyncio.ensure_future(fdask.FastnetTLSConnector().connect(
                "127.0.0.1:%d" % srv.getsockname()[1], ssl_context=client_ctx(pki))))
        await asyncio.sleep(0.05)
        assert count_fds() == before
    finally:
        srv.close()


@gen_test()
async def test_tls_certificate_rejected_is_fatal(pki):
    async def handler(comm):
        await comm.close()

    async with listen("fastnet-tls://127.0.0.1", handler, ssl_context=server_ctx(pki)) as listener:
        # the client trusts another CA: retrying cannot help
        with pytest.raises(FatalCommClosedError):
            await connect(listener.contact_address, ssl_context=client_ctx(pki, cafile="ca2"), timeout=5)
        comm = await connect(listener.contact_address, ssl_context=client_ctx(pki))
        await comm.close()


# -- comms --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True])
@gen_test()
async def test_comm_closed_explicit_and_implicit(tls, tls_args):
    scheme, args = _scheme(tls, tls_args)
    addr = f"{scheme}://127.0.0.1"
    a, b = await comm_pair(addr, **args)
    a_read, b_read = a.read(), b.read()
    await a.close()
    await a.close()                     # idempotent
    assert a.closed()
    for pending in (a_read, b_read):
        with pytest.raises(CommClosedError):
            await pending
    for comm in (a, b):
        with pytest.raises(CommClosedError):
            await comm.read()
        with pytest.raises(CommClosedError):
            await comm.write({})
    await b.close()

    async def closer(comm):
        await comm.close()

    async with listen(addr, closer, **args.get("listen_args", {})) as listener:
        comm = await connect(listener.contact_address, **args.get("connect_args", {}))
        with pytest.raises(CommClosedError):
            await comm.write({})
            await comm.read()
        comm = await connect(listener.contact_address, **args.get("connect_args", {}))
        with pytest.raises(CommClosedError):
            await comm.read()


@pytest.mark.parametrize("tls", [False, True])
@gen_test()
async def test_closed_turns_true_when_the_peer_goes_with_no_read_pending(tls, tls_args):
    scheme, args = _scheme(tls, tls_args)
    a, b = await comm_pair(f"{scheme}://127.0.0.1", **args)
    assert not a.closed() and not b.closed()
    b.abort()
    await until_closed(a)
    assert "closed" in repr(a)


@gen_test()
async def test_what_the_peer_sent_before_going_is_still_read():
    a, b = await comm_pair("fastnet://127.0.0.1")
    await b.write({"n": 1})
    await b.write({"n": 2})
    await b.close()
    await asyncio.sleep(0.1)
    assert await a.read() == {"n": 1}       # takes both messages off the socket
    assert a.closed()                       # the peer is gone...
    assert await a.read() == {"n": 2}       # ...and its last message is not lost
    with pytest.raises(CommClosedError):
        await a.read()
    a.abort()


@gen_test()
async def test_cancelled_read_aborts_the_comm():
    a, b = await comm_pair("fastnet://127.0.0.1")
    await cancel_soon(asyncio.ensure_future(a.read()))
    assert a.closed()
    with pytest.raises(CommClosedError):
        await b.read()
    await b.close()


@gen_test()
async def test_repr_and_addresses(tls_args):
    for addr, args in _schemes(tls_args):
        a, b = await comm_pair(addr, **args)
        scheme = parse_address(addr)[0]
        assert a.peer_address == b.local_address
        assert a.local_address == b.peer_address
        assert all(parse_address(x)[0] == scheme for x in (a.local_address, a.peer_address))
        assert "closed" not in repr(a) and "closed" not in repr(b)
        assert a.local_address in repr(b) and b.local_address in repr(a)
        await a.close()
        assert "closed" in repr(a) and a.local_address in repr(a) and b.peer_address in repr(a)
        a.abort()                            # after close: nothing happens
        b.abort()
        b.abort()
        assert "closed" in repr(b)


@pytest.mark.parametrize("tls", [False, True])
def test_comm_dropped_after_its_loop_closed_releases_its_socket(tls, pki, monkeypatch):
    scheme, args = _scheme(tls, _same_host_tls(pki))
    kept = []

    async def main():
        kept.extend(await comm_pair(f"{scheme}://127.0.0.1", **args))

    asyncio.run(main())
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    before = count_fds()
    del kept[:]
    gc.collect()
    assert unraisable == []
    assert count_fds() == before - 2


@gen_test()
async def test_comm_has_no_slots_and_takes_attributes():
    a, b = await comm_pair("fastnet://127.0.0.1")
    assert hasattr(a, "__dict__")
    a.name = "worker-comm"
    a.anything_distributed_sets = 1
    assert "worker-comm" in repr(a)
    a.abort()
    b.abort()


@gen_test()
async def test_tls_extra_info(pki, tls_args):
    a, b = await comm_pair("fastnet-tls://127.0.0.1", **tls_args)
    try:
        info = a.extra_info
        assert dict(x[0] for x in info["peercert"]["subject"])["commonName"] == "localhost"
        name, proto, bits = info["cipher"]
        assert "TLS" in proto and bits >= 128
        assert b.extra_info["cipher"] == info["cipher"]
        p, q = await comm_pair("fastnet://127.0.0.1")
        assert p.extra_info == {} and q.extra_info == {}
        p.abort()
        q.abort()
    finally:
        a.abort()
        b.abort()


# the stream's own buffers: shared-memory segments have tests of their own below
NO_SEGMENTS = {fdask.SHARED_MEMORY_CONFIG: False}


@gen_test(config=NO_SEGMENTS)
async def test_write_returns_the_byte_count_and_frames_arrive_writeable_in_own_buffers():
    a, b = await comm_pair("fastnet://127.0.0.1")
    x, y = np.arange(MiB, dtype=np.float64), np.ones(300_000, dtype=np.int32)
    n = await a.write({"x": to_serialize(x), "y": to_serialize(y), "small": b"abc"})
    assert n >= x.nbytes + y.nbytes
    got = await b.read()
    assert (got["x"] == x).all() and (got["y"] == y).all() and got["small"] == b"abc"
    for arr in (got["x"], got["y"]):
        assert arr.flags.writeable
    hx, hy = get_host_array(got["x"]), get_host_array(got["y"])
    assert hx is not hy
    assert hx.nbytes == x.nbytes and hy.nbytes == y.nbytes
    a.abort()
    b.abort()


@gen_test(config=NO_SEGMENTS)
async def test_shards_of_one_frame_land_in_one_buffer():
    a, b = await comm_pair("fastnet://127.0.0.1")
    a.max_shard_size = 256 * 1024          # the 4 MiB array goes as 16 shards
    x = np.random.default_rng(0).random(MiB)           # 8 MiB
    await a.write({"x": to_serialize(x)})
    tracemalloc.start()
    try:
        got = await b.read()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (got["x"] == x).all() and got["x"].flags.writeable
    # merged without a copy: one buffer of the array's size was allocated, not two
    assert get_host_array(got["x"]).nbytes == x.nbytes
    assert peak < 1.5 * x.nbytes
    a.abort()
    b.abort()


@pytest.mark.parametrize("side", ["listener", "connector"])
@pytest.mark.parametrize("flag", [False, True])
@gen_test()
async def test_deserialize_flag(side, flag):
    big = os.urandom(MiB) * 4
    for payload in (b"abc", big):
        msg = {"op": "update", "x": payload, "to_ser": [to_serialize(123)],
               "ser": Serialized(*serialize(payload))}
        q = asyncio.Queue()

        async def handler(comm):
            try:
                if side == "listener":
                    await q.put(await comm.read())
                else:
                    await comm.write(msg)
                    await comm.read()        # until the connector closes
            except CommClosedError:
                pass
            finally:
                await comm.close()

        kw = {"deserialize": flag}
        async with listen("fastnet://127.0.0.1", handler, **(kw if side == "listener" else {})) as listener:
            comm = await connect(listener.contact_address, **(kw if side == "connector" else {}))
        if side == "listener":
            await comm.write(msg)
            out = await q.get()
        else:
            out = await comm.read()
        await comm.close()
        assert out["op"] == "update" and out["x"] == payload
        if flag:
            assert list(out["to_ser"]) == [123]
            assert bytes(out["ser"]) == payload
        else:
            assert isinstance(out["ser"], Serialized)
            assert deserialize(out["ser"].header, out["ser"].frames) == payload
            (ts,) = out["to_ser"]
            assert deserialize(ts.header, ts.frames) == 123 if isinstance(ts, Serialized) else ts.data == 123


def _raise_eoferror():
    raise EOFError


class _EOFRaising:
    def __reduce__(self):
        return _raise_eoferror, ()


@gen_test()
async def test_truncated_data_aborts_the_comm():
    a, b = await comm_pair("fastnet://127.0.0.1")
    await a.write({"data": to_serialize(_EOFRaising())})
    with pytest.raises(CommClosedError):
        await b.read()
    assert b.closed()
    with pytest.raises(CommClosedError):
        await a.read()
    a.abort()


# -- bad peers and limits -------------------------------------------------------------------------


def _handler_recorder():
    reached = []

    async def handler(comm):
        reached.append(comm)
        await comm.close()
    return reached, handler


async def _raw_peer(listener):
    host, port = listener.get_host_port()
    reader, writer = await asyncio.open_connection(host, port)
    return reader, writer


async def until_hung_up(reader, writer):
    """Read what the listener sends until it hangs up (within 10 s), then close our end."""
    await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()


async def hangs_up_on_each(open_peer, payloads):
    """Each payload goes first on a new raw connection (``await open_peer()``); the listener hangs up on every one.

    No descriptor is left open by any of them.
    """
    before = count_fds()
    for payload in payloads:
        reader, writer = await open_peer()
        writer.write(payload)
        await until_hung_up(reader, writer)
    await asyncio.sleep(0.05)
    assert count_fds() == before


@gen_test()
async def test_garbage_peer_never_reaches_the_handler():
    reached, handler = _handler_recorder()
    async with listen("fastnet://127.0.0.1", handler) as listener:
        await hangs_up_on_each(lambda: _raw_peer(listener), (
            b"\xff" * 64,                                              # a negative length
            b"\x7f\xff\xff\xff" + b"x" * 100,                          # a 2 GiB frame
            struct.pack(">i", 16) + struct.pack("<2Q", 1, 1 << 50),     # a prelude asking 1 PiB
            struct.pack(">i", 8) + struct.pack("<Q", 5),                # a prelude cut short
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert reached == []


@gen_test(config={"distributed.comm.timeouts.connect": "200ms"})
async def test_silent_peer_never_reaches_the_handler(pki):
    for addr, kw in (("fastnet://127.0.0.1", {}), ("fastnet-tls://127.0.0.1", {"ssl_context": server_ctx(pki)})):
        reached, handler = _handler_recorder()
        async with listen(addr, handler, **kw) as listener:
            reader, writer = await _raw_peer(listener)
            await until_hung_up(reader, writer)     # says nothing: the listener gives up within the connect timeout
        assert reached == []


async def check_max_message_size(first_fits=False, family_of_comm=None):
    """A listener with max_message_size=MiB refuses a 2 MiB message before allocating for it.

    The comm that sends it is closed on both sides with an error naming the
    limit. With ``first_fits`` another comm first sends a 256 KiB message,
    which is read whole; with ``family_of_comm`` the refused comm must be on
    that socket family.
    """
    got = asyncio.Queue()

    async def handler(comm):
        try:
            await got.put(await comm.read())
        except CommClosedError as exc:
            await got.put(exc)

    async with listen("fastnet://127.0.0.1", handler, max_message_size=MiB) as listener:
        if first_fits:
            comm = await connect(listener.contact_address)
            await comm.write({"x": to_serialize(np.zeros(MiB // 4, np.uint8))})
            assert (await got.get())["x"].nbytes == MiB // 4
        comm = await connect(listener.contact_address)
        if family_of_comm is not None:
            assert family(comm) == family_of_comm
        await comm.write({"x": to_serialize(np.zeros(2 * MiB, np.uint8))})
        exc = await got.get()
        assert isinstance(exc, CommClosedError) and "max_message_size" in str(exc)
        with pytest.raises(CommClosedError):
            await comm.read()


@gen_test()
async def test_max_message_size_refuses_before_allocating():
    await check_max_message_size(first_fits=True)


def test_prelude_checks():
    words = fdask._parse_prelude(struct.pack("<3Q", 2, 10, 20), 30)
    assert words == [10, 20]
    with pytest.raises(CommClosedError, match="max_message_size"):
        fdask._parse_prelude(struct.pack("<3Q", 2, 10, 21), 30)
    with pytest.raises(CommClosedError):
        fdask._parse_prelude(struct.pack("<3Q", 5, 10, 21), None)
    with pytest.raises(CommClosedError):
        fdask._parse_prelude(b"\x01\x00\x00", None)
    # the shards of one buffer are marked, others not
    base = memoryview(bytearray(3 * 70_000))
    prelude, total, runs = fdask._prelude([b"hdr", base[:70_000], base[70_000:140_000], memoryview(bytes(70_000))])
    assert runs == []
    count, *sizes = struct.unpack("<5Q", prelude)
    assert count == 4 and total == 3 + 3 * 70_000
    assert [s >> 63 for s in sizes] == [0, 0, 1, 0]


def test_frames_leave_in_one_sendmsg_unjoined(monkeypatch):
    """A message is one sendmsg call; a large frame is passed to it as the caller's buffer, not a copy."""
    calls = []

    @gen_test(config=NO_SEGMENTS)
    async def main():
        a, b = await comm_pair("fastnet://127.0.0.1")
        sock = a._conn.get_extra_info("socket")
        real = sock.sendmsg

        class Spy:
            def __getattr__(self, name):
                return getattr(sock, name)

            def sendmsg(self, buffers, *args):
                buffers = list(buffers)
                calls.append([memoryview(x) for x in buffers])
                return real(buffers, *args)

            def send(self, data, *args):
                calls.append([memoryview(data)])
                return sock.send(data, *args)

        a._conn._sock = Spy()
        x = np.arange(MiB, dtype=np.uint8)
        await a.write({"op": "x", "x": to_serialize(x)})
        got = await b.read()
        assert (got["x"] == x).all()
        a.abort()
        b.abort()
        return x

    main()
    assert calls
    first = calls[0]
    # every frame of the message went in the first call; the array's bytes as the array's own memory
    assert any(v.nbytes == MiB and v.obj is not None and not isinstance(v.obj, bytes) for v in first)
    assert len(first) >= 4     # prelude and small frames with their headers, then header + array



# -- the same-host path ---------------------------------------------------------------------------


def family(comm):
    return comm._conn.get_extra_info("socket").family


def _same_host_tls(pki):
    """Contexts as Dask's Security makes them: the chain is checked, the host name is not."""
    ctx = client_ctx(pki)
    ctx.check_hostname = False
    return dict(listen_args={"ssl_context": server_ctx(pki)}, connect_args={"ssl_context": ctx})


@pytest.mark.parametrize("tls", [False, True])
@gen_test()
async def test_same_host_path_keeps_addresses_and_comm_semantics(tls, pki):
    scheme, args = _scheme(tls, _same_host_tls(pki))
    q, handler = comm_queue()
    async with listen(f"{scheme}://127.0.0.1", handler, **args.get("listen_args", {})) as listener:
        a = await connect(listener.contact_address, **args.get("connect_args", {}))
        b = await q.get()
        assert family(a) == family(b) == socket.AF_UNIX
        # host:port URIs as over TCP; the connector's end has no TCP port
        assert a.peer_address == b.local_address == listener.contact_address
        assert a.local_address == b.peer_address == f"{scheme}://127.0.0.1:0"
        if tls:
            assert a.extra_info["cipher"] == b.extra_info["cipher"]
            assert dict(x[0] for x in a.extra_info["peercert"]["subject"])["commonName"] == "localhost"
        x = np.arange(MiB, dtype=np.float64)
        n = await a.write({"x": to_serialize(x), "small": b"abc"})
        assert n >= x.nbytes
        got = await b.read()
        assert (got["x"] == x).all() and got["x"].flags.writeable and got["small"] == b"abc"
        await b.write({"op": "pong"})
        assert await a.read() == {"op": "pong"}
        b.abort()
        await until_closed(a)
        with pytest.raises(CommClosedError):
            await a.read()
        await a.close()


@gen_test()
async def test_same_host_max_message_size_refuses_before_allocating():
    await check_max_message_size(family_of_comm=socket.AF_UNIX)


@gen_test()
async def test_same_host_off_keeps_every_comm_on_tcp():
    async def handler(comm):
        await comm.close()

    with dask.config.set({fdask.SAME_HOST_CONFIG: False}):
        assert not fdask.same_host_enabled()
        async with listen("fastnet://127.0.0.1", handler) as listener:
            host, port = listener.get_host_port()
            # the listener bound no name
            with socket.socket(socket.AF_UNIX) as s, pytest.raises(ConnectionRefusedError):
                s.connect(fdask.same_host_name("fastnet://", host, port))
            comm = await connect(listener.contact_address)
            assert family(comm) == socket.AF_INET
            comm.abort()
    async with listen("fastnet://127.0.0.1", handler) as listener:
        with dask.config.set({fdask.SAME_HOST_CONFIG: "False"}):    # as the environment variable gives it
            comm = await connect(listener.contact_address)
        assert family(comm) == socket.AF_INET
        comm.abort()


@gen_test()
async def test_connector_falls_back_to_tcp_when_the_name_is_absent_or_dead():
    q, handler = comm_queue()
    with dask.config.set({fdask.SAME_HOST_CONFIG: False}):
        listener = await listen("fastnet://127.0.0.1", handler)      # no name bound
    try:
        comm = await connect(listener.contact_address)
        assert family(comm) == socket.AF_INET
        await comm.write({"op": "ping"})
        peer = await q.get()
        assert await peer.read() == {"op": "ping"}
        comm.abort()
        peer.abort()
        # a name bound by a socket that does not listen: refused, so TCP
        with socket.socket(socket.AF_UNIX) as squatter:
            squatter.bind(fdask.same_host_name("fastnet://", *listener.get_host_port()))
            comm = await connect(listener.contact_address)
            assert family(comm) == socket.AF_INET
            comm.abort()
            (await q.get()).abort()
    finally:
        listener.stop()


@gen_test()
async def test_tls_context_that_checks_host_names_goes_over_tcp(tls_args):
    q, handler = comm_queue()
    async with listen("fastnet-tls://127.0.0.1", handler, **tls_args["listen_args"]) as listener:
        assert tls_args["connect_args"]["ssl_context"].check_hostname
        comm = await connect(listener.contact_address, **tls_args["connect_args"])
        assert family(comm) == socket.AF_INET
        comm.abort()
        (await q.get()).abort()


@gen_test()
async def test_wildcard_listener_serves_each_local_address_over_the_same_host_path():
    q, handler = comm_queue()
    async with listen("fastnet://0.0.0.0", handler) as listener:
        port = listener.get_host_port()[1]
        for host in (EXTERNAL_IP4, "127.0.0.1"):
            comm = await connect(f"fastnet://{host}:{port}")
            peer = await q.get()
            assert family(comm) == socket.AF_UNIX
            # the listener's end reads the address the connector meant, as over TCP
            assert peer.local_address == comm.peer_address == f"fastnet://{host}:{port}"
            assert comm.local_address == peer.peer_address == f"fastnet://{host}:0"
            comm.abort()
            peer.abort()
        # a host name is left to TCP, which resolves it
        comm = await connect(f"fastnet://localhost:{port}")
        assert family(comm) == socket.AF_INET
        comm.abort()
        (await q.get()).abort()


def _frame(payload):
    return struct.pack(">i", len(payload)) + payload


@gen_test(config={"distributed.comm.timeouts.connect": "300ms"})
async def test_bad_same_host_peer_never_reaches_the_handler():
    reached, handler = _handler_recorder()
    async with listen("fastnet://127.0.0.1", handler) as listener:
        name = fdask.same_host_name("fastnet://", *listener.get_host_port())
        await hangs_up_on_each(lambda: asyncio.open_unix_connection(name), (
            _frame(b"not an address"),
            _frame(b"10.9.9.9"),                    # not the address this listener is on
            _frame(b"1" * 100),                      # longer than any IP
            b"\x7f\xff\xff\xff",                     # a 2 GiB frame
            b""))                                    # silence
        comm = await connect(listener.contact_address)       # and still serves a good one
        assert family(comm) == socket.AF_UNIX
        await comm.close()
    assert len(reached) == 1


def test_same_host_names_only_for_ip_literals_and_local_wildcards():
    names = fdask._same_host_candidates("fastnet://", "127.0.0.1", 8786)
    assert names == [fdask.same_host_name("fastnet://", h, 8786) for h in ("127.0.0.1", "0.0.0.0", "::")]
    assert all(n.startswith("\0") and "://" not in n for n in names)
    assert fdask._same_host_candidates("fastnet://", "localhost", 8786) == []
    # an address that is not this host's never reaches a wildcard listener here
    assert fdask._same_host_candidates("fastnet://", "192.0.2.7", 8786) == [
        fdask.same_host_name("fastnet://", "192.0.2.7", 8786)]
    assert fdask.same_host_name("fastnet-tls://", "127.0.0.1", 1) != fdask.same_host_name("fastnet://", "127.0.0.1", 1)


# -- shared-memory segments on the same-host path ------------------------------------------------


def in_segment(arr):
    """True if ``arr`` views a mapped shared-memory segment, not a buffer of its own."""
    return shm._is_mapping(arr)


@gen_test()
async def test_large_frames_cross_in_shared_memory_writeable_and_alive_as_long_as_their_arrays():
    a, b = await comm_pair("fastnet://127.0.0.1")
    assert family(a) == family(b) == socket.AF_UNIX
    x = np.random.default_rng(1).random(4 * MiB)              # 32 MiB
    y = np.arange(MiB // 2, dtype=np.int16)                     # 1 MiB: at the threshold
    small = np.arange(1000)
    await a.write({"x": to_serialize(x), "y": to_serialize(y), "small": to_serialize(small)})
    got = await b.read()
    assert (got["x"] == x).all() and (got["y"] == y).all() and (got["small"] == small).all()
    assert in_segment(got["x"]) and in_segment(got["y"]) and not in_segment(got["small"])
    assert got["x"].flags.writeable and got["y"].flags.writeable
    got["x"][:] = 0.5                                            # the receiver's own memory now
    assert (x != 0.5).all()
    # the other way, with the array in shards: one segment, merged without a copy
    b.max_shard_size = 4 * MiB
    await b.write({"back": to_serialize(x)})
    back = (await a.read())["back"]
    assert (back == x).all() and in_segment(back) and back.flags.writeable
    # the mappings outlive the comms, and go with the arrays
    a.abort()
    b.abort()
    held = segment_mappings()
    assert (got["x"] == 0.5).all() and (back == x).all()
    del got, back
    gc.collect()
    # large mappings are unmapped on fastnet.shm's thread, a moment later
    assert wait_for(lambda: segment_mappings() < held)


@gen_test(config=NO_SEGMENTS)
async def test_shared_memory_off_sends_every_frame_in_the_stream():
    assert not fdask.shared_memory_enabled()
    a, b = await comm_pair("fastnet://127.0.0.1")
    assert family(a) == socket.AF_UNIX
    x = np.arange(2 * MiB, dtype=np.float64)
    await a.write({"x": to_serialize(x)})
    got = (await b.read())["x"]
    assert (got == x).all() and not in_segment(got) and get_host_array(got).nbytes == x.nbytes
    a.abort()
    b.abort()


@gen_test()
async def test_tls_same_host_comms_keep_every_frame_in_the_stream(pki):
    args = _same_host_tls(pki)
    a, b = await comm_pair("fastnet-tls://127.0.0.1", **args)
    assert family(a) == socket.AF_UNIX
    x = np.arange(2 * MiB, dtype=np.float64)
    await a.write({"x": to_serialize(x)})
    got = (await b.read())["x"]
    assert (got == x).all() and not in_segment(got)
    a.abort()
    b.abort()


def _memfd(size, seal=True):
    fd = os.memfd_create("test", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if seal else 0))
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


@pytest.mark.parametrize("bad,error", [
    ("pipe", "not a memfd segment"),
    ("unsealed", "not sealed against shrinking"),
    ("too small", "holds 4096 bytes, the array needs 1048576"),
    ("too large", "exceeds max_message_size=1048576"),
    ("missing", "1 descriptors expected, 0 arrived"),
])
@gen_test()
async def test_bad_segment_from_the_peer_closes_only_its_comm(bad, error):
    q, handler = comm_queue()
    async with listen("fastnet://127.0.0.1", handler, max_message_size=MiB) as listener:
        a = await connect(listener.contact_address)
        b = await q.get()
        other = await connect(listener.contact_address)
        other_peer = await q.get()
    before = count_fds()
    size = 2 * MiB if bad == "too large" else MiB
    fds = []
    if bad == "pipe":
        r, w = os.pipe()
        fds, extra = [r], [w]
    else:
        fds, extra = [_memfd(size if bad != "too small" else 4096, seal=bad != "unsealed")], []
    if bad == "missing":
        fds, extra = [], fds
    # a fastnet peer would never send this: the prelude marks a segment, the descriptor is wrong
    a._conn.write_many([struct.pack("<2Q", 1, size | fdask._SEGMENT)], fds=fds)
    for fd in fds + extra:
        os.close(fd)
    with pytest.raises(CommClosedError, match=error):
        await b.read()
    assert b.closed()
    await until_closed(a)
    a.abort()
    assert count_fds() == before - 2            # the two ends of the bad comm; no descriptor left
    # the other comm of the same listener goes on
    x = np.arange(MiB // 16, dtype=np.float64)
    await other.write({"x": to_serialize(x)})
    assert (await other_peer.read())["x"].sum() == x.sum()
    other.abort()
    other_peer.abort()


@pytest.mark.parametrize("tls", [False, True])
@gen_test()
async def test_segment_frames_on_a_comm_that_takes_none_close_it(tls, pki):
    scheme, args = _scheme(tls, _same_host_tls(pki))
    with dask.config.set({fdask.SAME_HOST_CONFIG: tls}):      # TCP, or the same-host path with TLS
        a, b = await comm_pair(f"{scheme}://127.0.0.1", **args)
    assert family(b) == (socket.AF_UNIX if tls else socket.AF_INET)
    a._conn.write_many([struct.pack("<2Q", 1, MiB | fdask._SEGMENT)])
    with pytest.raises(CommClosedError, match="on a comm that takes none"):
        await b.read()
    assert b.closed()
    a.abort()


SIGKILLED_SENDER = r"""
import asyncio, os, signal, struct, sys
import numpy as np
from distributed.comm import connect
from distributed.comm.registry import backends
from distributed.protocol import to_serialize
import fastnet.dask as fdask
from fastnet import shm

backends["fastnet"] = fdask.FastnetBackend()

async def main():
    comm = await connect(sys.argv[1])
    await comm.write({"x": to_serialize(np.arange(4 << 20, dtype=np.float64))})
    # the next message: a segment in flight, then a frame the stream never finishes
    seg = shm.pack([np.ones(1 << 20, np.uint8)])
    fd = seg.handover()
    comm._conn.write_many([struct.pack("<3Q", 2, (1 << 20) | fdask._SEGMENT, 1 << 20), b"cut" * 1000],
                          fds=[fd])
    await comm.write({"x": to_serialize(np.arange(4 << 20, dtype=np.float64))})
    await asyncio.sleep(0.2)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


@gen_test(timeout=60)
async def test_sigkilled_sender_mid_stream_leaves_nothing_behind():
    q, handler = comm_queue()
    before, mapped, memfds = count_fds(), segment_mappings(), memfd_fds()
    async with listen("fastnet://127.0.0.1", handler) as listener:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", SIGKILLED_SENDER, listener.contact_address)
        b = await q.get()
    assert family(b) == socket.AF_UNIX
    x = (await b.read())["x"]
    assert in_segment(x) and (x == np.arange(4 << 20, dtype=np.float64)).all()
    assert await proc.wait() == -9
    with pytest.raises(CommClosedError):
        await b.read()           # the dead sender's half message
    assert b.closed()
    # the received array outlives its sender
    assert (x == np.arange(4 << 20, dtype=np.float64)).all()
    del x
    assert wait_for(lambda: segment_mappings() == mapped) and count_fds() == before
    assert memfd_fds() == memfds            # this process's own pool, if an earlier test filled it


def memfd_fds():
    """The descriptors of memfds this process holds."""
    out = set()
    for f in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{f}").startswith("/memfd:"):
                out.add(f)
        except OSError:
            pass
    return out


# -- clusters of processes ----------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, "tests", "dask_cluster_job.py")


@pytest.fixture(scope="module")
def entry_point_dir(tmp_path_factory):
    """A dist-info directory that declares fastnet's entry points, for the worker processes' sys.path.

    This is how distributed finds a backend: importlib.metadata reads it in
    every process. (test_entry_point_of_the_built_wheel uses the real wheel.)
    """
    d = tmp_path_factory.mktemp("ep")
    info = d / "fastnet_dask_entry_points-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fastnet-dask-entry-points\nVersion: 0\n")
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    section = text.split('[project.entry-points."distributed.comm.backends"]', 1)[1].split("\n\n", 1)[0]
    lines = [ln.replace('"', "") for ln in section.strip().splitlines()]
    (info / "entry_points.txt").write_text("[distributed.comm.backends]\n" + "\n".join(lines) + "\n")
    return str(d)


def run_job(protocol, *args, python=sys.executable, env_extra=None, pythonpath=None, cwd=None):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    env.update(env_extra or {})
    proc = subprocess.run([python, JOB, protocol, *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tcp_result(entry_point_dir):
    out = run_job("tcp", pythonpath=[ROOT, entry_point_dir])
    assert out["transfers"] > 0
    return out["result"]


def same_result_as_tcp(out, tcp_result):
    """Whether a job's result is the tcp:// run's (to the last bits a float sum may differ in)."""
    return np.allclose(out["result"], tcp_result, rtol=1e-12, atol=0)


def run_local_job(protocol, *args, entry_point_dir, tcp_result, same_host, **env_extra):
    """run_job with the entry points on sys.path and the same-host path on or off.

    The result must be the tcp:// run's, and the job must leave no comm and no
    descriptor open.
    """
    out = run_job(protocol, *args, pythonpath=[ROOT, entry_point_dir],
                  env_extra={"DASK_DISTRIBUTED__COMM__FASTNET__SAME_HOST": str(same_host), **env_extra})
    assert same_result_as_tcp(out, tcp_result)
    assert out["open_comms"] == [] and out["fd_delta"] == 0
    return out


@pytest.mark.parametrize("loop,same_host", [("tornado", True), ("uvloop", True), ("tornado", False)])
@pytest.mark.parametrize("protocol", ["fastnet", "fastnet-tls"])
def test_local_cluster_job_same_result_as_tcp(protocol, loop, same_host, entry_point_dir, tcp_result):
    """The job on both paths: worker to worker over AF_UNIX (the default on one host), or all over TCP."""
    pytest.importorskip("uvloop")
    out = run_local_job(protocol, entry_point_dir=entry_point_dir, tcp_result=tcp_result, same_host=same_host,
                        DASK_DISTRIBUTED__ADMIN__EVENT_LOOP=loop)
    assert out["scheduler"].startswith(protocol + "://")
    assert all(a.startswith(protocol + "://") for a in out["worker_addresses"])
    assert out["loops"] == (["uvloop"] if loop == "uvloop" else ["asyncio.unix_events"])
    assert out["transfers"] > 0                       # chunks moved between the workers
    # the workers' comms (to the scheduler, to each other) took the path asked for
    assert out["families"] == (["AF_UNIX"] if same_host else ["AF_INET"])


@pytest.mark.parametrize("same_host", [True, False])
def test_worker_sigkilled_mid_transfer(same_host, entry_point_dir, tcp_result):
    out = run_local_job("fastnet", "kill", entry_point_dir=entry_point_dir, tcp_result=tcp_result,
                        same_host=same_host)
    assert out["killed"] in out["worker_addresses"] and not out["done_at_kill"]


def test_entry_point_of_the_built_wheel(tmp_path, tcp_result):
    """pip installs this tree into a virtualenv; there LocalCluster(protocol="fastnet") finds the backend."""
    # the wheel is built as pip builds it for a user (an isolated build environment
    # from build-system.requires: a venv of 3.12+ has no setuptools of its own)
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                            "-w", str(wheels), ROOT], timeout=1200, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("fastnet-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    # when this interpreter is itself a venv, --system-site-packages reaches only the base
    # interpreter's packages: distributed and dask are visible through this one's, after
    # the new venv's own (where the wheel's fastnet goes)
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with open(os.path.join(site, "outer-site-packages.pth"), "w") as f:
        f.write("\n".join(sorted(ours)) + "\n")
    # --ignore-installed: a fastnet of the same version may be installed outside the virtualenv
    installed = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)],
                               timeout=600, capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr[-3000:]
    out = run_job("fastnet", python=py, cwd=str(tmp_path))
    assert out["fastnet"].startswith(str(venv))
    assert out["scheduler"].startswith("fastnet://")
    assert same_result_as_tcp(out, tcp_result)


def test_small_flat_messages_skip_the_offload_measure():
    from distributed.comm.utils import OFFLOAD_THRESHOLD
    from distributed.sizeof import safe_sizeof
    small = {"op": "ping", "key": "x-1234", "n": 12345, "ok": True, "none": None, "b": b"x" * 100}
    assert fdask._flat_and_small(small)
    assert safe_sizeof(small) <= OFFLOAD_THRESHOLD
    assert not fdask._flat_and_small({"op": "x", "nested": {"a": 1}})
    assert not fdask._flat_and_small(["not", "a", "dict"])
    big = {"x": b"x" * (OFFLOAD_THRESHOLD + 1)}
    assert not fdask._flat_and_small(big)
    assert safe_sizeof(big) > OFFLOAD_THRESHOLD     # the answer distributed itself would give


def test_bench_dask_cases_measure_both_rows():
    """fastnet bench's dask cases run for real, tcp:// and fastnet:// in one run (no timing checked)."""
    from fastnet import bench
    report = bench.run(["dask-rtt", "dask-array", "dask-cluster"], families=("tcp", "unix"), rounds=1, repeat=2,
                       warmup=0.02, sample=0.05, bulk_mib=16, timeout=300.0)
    for case in ("dask-rtt", "dask-array", "dask-cluster"):
        fams = report["results"][case]
        assert list(fams) == ["tcp"]                       # a host:port scheme: no unix family rows
        rows = fams["tcp"]
        # fastnet over TCP, on its same-host path, and there with shared memory where arrays move;
        # beside the arrays, the plain socket's limit for the same bytes
        extra = {"dask-rtt": [], "dask-array": ["fastnet-shm", "socket"], "dask-cluster": ["fastnet-shm"]}[case]
        assert list(rows) == ["tcp", "fastnet", "fastnet-host"] + extra
        for key, row in rows.items():
            assert row["na"] is None and row["median"] > 0, (case, key, row["na"])
    for key in ("tcp", "fastnet", "fastnet-host", "fastnet-shm"):
        info = report["results"]["dask-cluster"]["tcp"][key]["info"]
        assert info["transfers"] > 0 and info["moved_mib"] > 0, (key, info)
    targets = {(t["case"], t["target"]): t for t in report["targets"] if t["case"].startswith("dask")}
    assert len(targets) == 8 and all(t["value"] is not None for t in targets.values())


# -- more than one host: network namespaces ---------------------------------------------------

NETNS_DRIVER = os.path.join(ROOT, "tests", "dask_netns_driver.py")




class DaskHosts:
    """A scheduler host and two worker hosts: three network namespaces on one bridge.

    The bridge lives in the scheduler's namespace ``s`` (10.X.Y.1); each worker
    namespace joins it through a veth pair of its own (10.X.Y.2, 10.X.Y.3), so a
    chunk moving between the workers crosses two veth links, as between hosts.
    """

    def __init__(self, env):
        import random
        import fastnet_soak as soak
        self.ip = soak.ip
        self.env = env
        u = f"{os.getpid() % 10000}{random.randrange(100, 999)}"
        x, y = random.randrange(16, 250), random.randrange(1, 250)
        self.ns = {"s": f"fdks{u}", "w1": f"fdk1{u}", "w2": f"fdk2{u}"}
        self.addr = {"s": f"10.{x}.{y}.1", "w1": f"10.{x}.{y}.2", "w2": f"10.{x}.{y}.3"}
        self.veth = {"w1": f"dw1{u}"[:15], "w2": f"dw2{u}"[:15]}
        self.procs = []
        self.made = []
        try:
            for ns in self.ns.values():
                self.ip("netns", "add", ns)
                self.made.append(ns)
            s = self.ns["s"]
            self.ip("-n", s, "link", "add", "br0", "type", "bridge")
            self.ip("-n", s, "addr", "add", self.addr["s"] + "/24", "dev", "br0")
            self.ip("-n", s, "link", "set", "br0", "up")
            self.ip("-n", s, "link", "set", "lo", "up")
            for w in ("w1", "w2"):
                peer = "p" + self.veth[w][1:]
                self.ip("link", "add", peer, "netns", s, "type", "veth", "peer", "name", self.veth[w],
                        "netns", self.ns[w])
                self.ip("-n", s, "link", "set", peer, "master", "br0")
                self.ip("-n", s, "link", "set", peer, "up")
                self.ip("-n", self.ns[w], "addr", "add", self.addr[w] + "/24", "dev", self.veth[w])
                self.ip("-n", self.ns[w], "link", "set", self.veth[w], "up")
                self.ip("-n", self.ns[w], "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def link(self, w, state):
        self.ip("-n", self.ns[w], "link", "set", self.veth[w], state)

    def spawn(self, where, args, **kw):
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[where], sys.executable, *args], env=self.env,
                             stdin=subprocess.DEVNULL, **kw)
        self.procs.append(p)
        return p

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
        for ns in self.made:
            r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in r.stdout.split():
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            self.ip("netns", "del", ns, check=False)
        self.made = []


@pytest.fixture
def dask_hosts(entry_point_dir):
    """DaskHosts whose processes find fastnet and its entry points, taken down after the test.

    The test is skipped, with the reason, where network namespaces cannot be made.
    """
    import fastnet_soak as soak     # tools/soak.py, loaded by conftest
    why = soak.netns_available()
    if why is not None:
        pytest.skip(why)
    hosts = DaskHosts(dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, entry_point_dir])))
    yield hosts
    hosts.close()


def _tls_files(tmp_path):
    """A CA and one certificate (no extended key usage: it serves and it connects) for every Dask process."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from tlsutil import make_cert, name

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = make_cert("dask test CA", ca_key, name("dask test CA"), ca_key, ca=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name("dask")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
            .sign(ca_key, hashes.SHA256()))
    paths = {n: str(tmp_path / f"{n}.pem") for n in ("ca", "cert", "key")}
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return paths


@pytest.mark.parametrize("link_down", [False, True])
@pytest.mark.parametrize("protocol", ["fastnet", "fastnet-tls"])
def test_scheduler_and_workers_on_three_hosts(protocol, link_down, tmp_path, tcp_result, dask_hosts):
    hosts = dask_hosts
    sched_file = str(tmp_path / "scheduler.json")
    tls, client_tls = [], []
    if protocol == "fastnet-tls":
        f = _tls_files(tmp_path)
        tls = ["--tls-ca-file", f["ca"], "--tls-cert", f["cert"], "--tls-key", f["key"]]
        client_tls = [f["ca"], f["cert"], f["key"]]
    hosts.spawn("s", ["-m", "distributed.cli.dask_scheduler", "--protocol", protocol, "--host",
                      hosts.addr["s"], "--port", "0", "--no-dashboard", "--scheduler-file", sched_file, *tls],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not os.path.exists(sched_file):
        assert time.monotonic() < deadline, "the scheduler did not start"
        time.sleep(0.1)
    for w in ("w1", "w2"):
        hosts.spawn(w, ["-m", "distributed.cli.dask_worker", "--scheduler-file", sched_file, "--host",
                        hosts.addr[w], "--nthreads", "1", "--no-nanny", "--no-dashboard", *tls],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    args = [NETNS_DRIVER, sched_file, *client_tls] + (["--signal"] if link_down else [])
    driver = hosts.spawn("s", args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if link_down:
        line = driver.stdout.readline()
        assert line.strip() == "TRANSFERRING", driver.stderr.read()[-3000:]
        hosts.link("w1", "down")            # a worker's link goes in the middle of the job...
        time.sleep(2.0)
        hosts.link("w1", "up")              # ...and comes back
    try:
        stdout, stderr = driver.communicate(timeout=300)   # nothing hangs
    except subprocess.TimeoutExpired:
        driver.kill()
        raise AssertionError("the job hung")
    assert driver.returncode == 0, stderr[-3000:]
    out = json.loads(stdout.strip().splitlines()[-1])
    assert out["scheduler"] == f"{protocol}://{hosts.addr['s']}:{out['scheduler'].rsplit(':', 1)[1]}"
    assert sorted(a.rsplit(":", 1)[0] for a in out["workers"]) == [f"{protocol}://{hosts.addr[w]}"
                                                                    for w in ("w1", "w2")]
    if link_down:
        assert not out["done_at_signal"]
        if "error" in out:          # Dask gave up on the cut link with its own error
            return
    assert "error" not in out, out.get("error")
    assert same_result_as_tcp(out, tcp_result)
    assert out["transfers"] > 0


SAME_PORT_PROBE = r"""
import asyncio, json, sys
from distributed.comm import connect, listen
name, port, targets = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

async def main():
    async def handler(comm):
        await comm.write({"listener": name})
        await comm.close()

    async with listen(f"fastnet://0.0.0.0:{port}", handler):
        print("READY", flush=True)
        if not targets:
            await asyncio.Event().wait()
        out = {}
        for host in targets:
            comm = await connect(f"fastnet://{host}:{port}", timeout=20)
            msg = await comm.read()
            out[host] = [msg["listener"], comm._conn.get_extra_info("socket").family.name, comm.local_address]
            await comm.close()
        print(json.dumps(out), flush=True)

asyncio.run(main())
"""


def test_connector_in_another_network_namespace_goes_over_tcp(dask_hosts):
    """Two hosts with a wildcard listener on the same port each: a remote address reaches the remote one, over TCP."""
    import random
    hosts = dask_hosts
    port = random.randrange(20000, 30000)
    remote = hosts.spawn("w1", ["-c", SAME_PORT_PROBE, "w1", str(port)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert remote.stdout.readline().strip() == "READY", remote.stderr.read()[-3000:]
    w1, w2 = hosts.addr["w1"], hosts.addr["w2"]
    local = hosts.spawn("w2", ["-c", SAME_PORT_PROBE, "w2", str(port), w1, "127.0.0.1", w2],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = local.communicate(timeout=120)
    assert local.returncode == 0, stderr[-3000:]
    lines = stdout.strip().splitlines()
    assert lines[0] == "READY"
    out = json.loads(lines[-1])
    assert out[w1][:2] == ["w1", "AF_INET"] and out[w1][2].startswith(f"fastnet://{w2}:")
    assert out["127.0.0.1"] == ["w2", "AF_UNIX", "fastnet://127.0.0.1:0"]
    assert out[w2] == ["w2", "AF_UNIX", f"fastnet://{w2}:0"]


def test_docs_build_without_distributed(tmp_path):
    """The documentation builds with warnings as errors where distributed is missing; its Dask page says so."""
    pytest.importorskip("sphinx")
    blocked = textwrap.dedent("""
        import sys
        from importlib.abc import MetaPathFinder

        class Missing(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("distributed", "dask"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, Missing())
        from sphinx.cmd.build import main
        sys.exit(main(sys.argv[1:]))
    """)
    out = tmp_path / "html"
    proc = subprocess.run([sys.executable, "-c", blocked, "-W", "--keep-going", "-q", "-b", "html",
                           "-d", str(tmp_path / "doctrees"), os.path.join(ROOT, "docs"), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"the docs build failed:\n{proc.stderr}\n{proc.stdout}"
    page = (out / "api" / "dask.html").read_text()
    assert "fastnet[dask]" in page and 'id="fastnet.dask.FastnetBackend"' not in page
