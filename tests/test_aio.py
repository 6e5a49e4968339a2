"""fastnet.aio: AsyncConnection, serve() and the asyncio RPCProxy on real sockets.

Every test runs on the default asyncio loop and on uvloop (the ``run``
fixture), and the file runs once per kernel set (``FASTNET_PURE=1``). Peers
are real: aio to aio, aio to the blocking fastnet Connection and servers (on
threads of the test process), aio to the stdlib multiprocessing.connection of
every pyenv CPython 3.10-3.13 (subprocesses), TLS with certificates made here.
"""
import asyncio
import gc
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time

import pytest

import fastnet
import fastnet.aio as aio
from fastnet import server as fserver
from fastnet._kernels import framing as _framing
from fastnet.errors import (AuthenticationError, BufferTooShort, ConnectionLost, MessageTooLarge,
                            ProtocolError, TruncatedFrameError)

from rpcutil import count_fds
from test_interop_stdlib import _interp_params

np = pytest.importorskip("numpy")
uvloop = pytest.importorskip("uvloop")

KEY = b"aio-secret"
WAIT = 30.0
MiB = 1 << 20


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Run a coroutine to completion on a fresh loop of the kind under test (bounded by WAIT)."""
    factory = asyncio.new_event_loop if request.param == "asyncio" else uvloop.new_event_loop

    def runner(coro_fn, *args):
        async def bounded():
            return await asyncio.wait_for(coro_fn(*args), WAIT)
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(bounded())
    runner.kind = request.param
    return runner


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="fn-aio-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["tcp", "unix"])
def address(request, workdir):
    return ("127.0.0.1", 0) if request.param == "tcp" else os.path.join(workdir, "s")


def pattern(n, seed=0):
    return (bytes(range(seed % 251, 251)) + bytes(range(seed % 251))) * (n // 251) + bytes(range(n % 251))


async def echo_bytes(conn):
    """A server handler: every message back as it came, until the peer closes."""
    while True:
        try:
            frames = await conn.recv_many()
        except EOFError:
            return
        await conn.send_many(frames)


async def _raw_and_conn(**kw):
    """A non-blocking socket and an AsyncConnection on the other end of a socketpair."""
    raw, other = socket.socketpair()
    for s in (raw, other):
        s.setblocking(False)
    return raw, aio.AsyncConnection(other, **kw)


async def _socketpair_conns(**kw):
    a, b = await _raw_and_conn(**kw)
    return aio.AsyncConnection(a, **kw), b


async def _cancel_mid_frame(raw, conn, receive, wire, cut, expected, reused=None):
    """Send ``wire[:cut]`` from ``raw``, cancel ``receive()`` while it waits for the rest,
    send the rest: ``conn`` then receives the messages ``expected``, whole.

    ``reused`` is the buffer the cancelled receive was given: the caller
    overwrites it at once, and the message must not change with it.
    """
    loop = asyncio.get_running_loop()
    first_part = asyncio.ensure_future(loop.sock_sendall(raw, wire[:cut]))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await receive()
    if reused is not None:
        m = memoryview(reused).cast("B")
        m[:] = b"\xa5" * m.nbytes
    rest = asyncio.ensure_future(loop.sock_sendall(raw, wire[cut:]))
    for msg in expected:
        assert await conn.recv_bytes() == msg
    await first_part
    await rest


# -- aio to aio ------------------------------------------------------------------

@pytest.mark.parametrize("key", [None, KEY])
def test_roundtrip_through_serve(run, address, key):
    sizes = [0, 1, 16384, 65535, 65536, 300_000, 3 * MiB + 7]

    async def main():
        async with await aio.serve(address, echo_bytes, authkey=key) as srv:
            async with await aio.connect(srv.address, authkey=key) as c:
                for i, n in enumerate(sizes):
                    data = pattern(n, i)
                    await c.send_bytes(data)
                    assert await c.recv_bytes() == data
                obj = {"a": [1, 2.5, "x" * 70000], "b": (None, True)}
                await c.send(obj)
                assert await c.recv() == obj
                await c.send_bytes(b"0123456789", 2, 5)
                assert await c.recv_bytes() == b"23456"
    run(main)


def test_send_many_is_received_as_many_frames_per_read(run):
    async def main():
        a, b = await _socketpair_conns()
        msgs = [pattern(i % 300, i) for i in range(2000)] + [pattern(200_000, 9)]
        # a large message is sent without a copy: the send returns once the socket took it
        sender = asyncio.ensure_future(a.send_many(msgs))
        got = []
        batches = 0
        while len(got) < len(msgs):
            got += await b.recv_many()
            batches += 1
        assert got == msgs
        assert batches < len(msgs) // 10     # many frames came out of each read
        await sender
        a.close()
        b.close()
    run(main)


def test_recv_bytes_into_and_buffer_too_short(run):
    async def main():
        a, b = await _socketpair_conns()
        big = pattern(2 * MiB, 3)
        sender = asyncio.ensure_future(a.send_many([b"small", big, b"too long for it", b"after"]))
        buf = bytearray(2 * MiB + 10)
        assert await b.recv_bytes_into(buf, 3) == 5 and buf[3:8] == b"small"
        assert await b.recv_bytes_into(buf, 10) == len(big) and buf[10:] == big
        await sender
        with pytest.raises(BufferTooShort) as info:
            await b.recv_bytes_into(bytearray(4))
        assert info.value.args[0] == b"too long for it"
        assert await b.recv_bytes() == b"after"     # still usable
        with pytest.raises(ValueError):
            await b.recv_bytes_into(bytearray(2), 3)
        a.close()
        b.close()
    run(main)


def test_send_bytes_checks_offset_and_size_as_multiprocessing(run):
    async def main():
        a, b = await _socketpair_conns()
        for offset, size in [(-1, None), (11, None), (0, -1), (5, 6)]:
            with pytest.raises(ValueError):
                await a.send_bytes(b"0123456789", offset, size)
        await a.send_bytes(b"0123456789", 10)
        await a.send_bytes(memoryview(b"0123456789"), 4, 6)
        assert await b.recv_bytes() == b""
        assert await b.recv_bytes() == b"456789"
        a.close()
        b.close()
    run(main)


def test_async_for_and_eof(run):
    async def main():
        a, b = await _socketpair_conns()
        for i in range(5):
            await a.send(("item", i))
        a.close()
        await a.wait_closed()
        got = [obj async for obj in b]
        assert got == [("item", i) for i in range(5)]
        with pytest.raises(EOFError):
            await b.recv_bytes()
        b.close()
    run(main)


# -- arrays ----------------------------------------------------------------------

def test_arrays_with_a_blocking_peer(run):
    a64 = np.arange(3 * MiB // 8, dtype=np.float64).reshape(3, -1)
    fortran = np.asfortranarray(np.arange(6000, dtype=np.int32).reshape(60, 100))
    rec = np.zeros(10, dtype=[("x", "<i4"), ("y", "<f8")])
    rec["x"] = np.arange(10)

    with fastnet.Listener(("127.0.0.1", 0), authkey=KEY) as listener:
        def peer():
            with listener.accept() as c:
                for _ in range(3):
                    a = c.recv_array()
                    c.send_array(a if a.dtype.names else a * 2)
                c.send_array(a64)
                c.send_array(a64)

        t = threading.Thread(target=peer)
        t.start()

        async def main():
            async with await aio.connect(listener.address, authkey=KEY) as c:
                await c.send_array(a64)
                assert np.array_equal(await c.recv_array(), a64 * 2)
                await c.send_array(fortran)
                got = await c.recv_array()
                assert got.flags.f_contiguous and np.array_equal(got, fortran * 2)
                await c.send_array(rec)
                got = await c.recv_array()
                assert got.dtype == rec.dtype and np.array_equal(got, rec)
                out = np.empty_like(a64)
                assert await c.recv_array(out=out) is out and np.array_equal(out, a64)
                with pytest.raises(ValueError):
                    await c.recv_array(out=np.empty((2, 2)))      # wrong shape: dropped, usable
                await c.send_bytes(b"still usable")
        run(main)
        t.join(WAIT)


def test_array_larger_than_max_message_size_is_refused(run):
    async def main():
        a, b = await _socketpair_conns(max_message_size=MiB)
        sender = asyncio.ensure_future(a.send_array(np.zeros(MiB // 4, dtype=np.float64)))  # 2 MiB
        with pytest.raises(MessageTooLarge):
            await b.recv_array()
        assert b.closed
        with pytest.raises(ConnectionLost):      # the receiver is gone
            await sender
        a.close()
    run(main)


# -- cancellation and timeouts -----------------------------------------------------

def test_cancelled_recv_loses_no_frame(run):
    """A receive cancelled mid-frame leaves the frame whole for the next receive."""
    async def main():
        raw, conn = await _raw_and_conn()
        big = pattern(3 * MiB, 5)
        wire = _framing.encode_header(len(big)) + big + _framing.encode_header(2) + b"ok"
        buf = bytearray(len(big))
        for recv, reused in [(conn.recv_bytes, None), (lambda: conn.recv_bytes_into(buf), buf),
                             (conn.recv_many, None)]:
            await _cancel_mid_frame(raw, conn, recv, wire, MiB, [big, b"ok"], reused)
        raw.close()
        conn.close()
    run(main)


def test_cancelled_recv_array_into_out_keeps_the_payload(run):
    async def main():
        raw, conn = await _raw_and_conn()
        arr = np.arange(MiB, dtype=np.int64)
        header, _ = fastnet.zerocopy.encode_array(arr)
        payload = arr.tobytes()
        enc = _framing.encode_header
        wire = enc(len(header)) + header + enc(len(payload)) + payload
        out = np.zeros_like(arr)
        # cut a MiB into the payload
        await _cancel_mid_frame(raw, conn, lambda: conn.recv_array(out=out), wire,
                                len(wire) - len(payload) + MiB, [payload], out)
        raw.close()
        conn.close()
    run(main)


def test_backpressure_and_a_cancelled_send_goes_out_whole(run):
    async def main():
        a, b = await _socketpair_conns()
        a.high_water, a.low_water = 256 * 1024, 64 * 1024
        small = pattern(1000, 1)
        sent = 0
        # the peer does not read: sends queue up to the high water mark, then wait
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                while True:
                    # a send is queued whole before it waits: even the cancelled one goes out
                    sent += 1
                    await a.send_bytes(small)
        assert a.write_buffer_size > a.high_water
        big = pattern(4 * MiB, 2)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await a.send_bytes(big)
        last = asyncio.ensure_future(a.send_bytes(b"last"))    # waits: the queue is above high water
        await asyncio.sleep(0.05)
        assert not last.done()
        for _ in range(sent):
            assert await b.recv_bytes() == small
        # the cancelled large send still arrives whole, and before "last"
        assert await b.recv_bytes() == big
        assert await b.recv_bytes() == b"last"
        await last
        await a.drain()
        assert a.write_buffer_size == 0
        a.close()
        b.close()
    run(main)


def test_a_lone_message_leaves_at_once_and_a_burst_is_coalesced(run):
    async def main():
        raw, conn = await _raw_and_conn()
        await conn.send_bytes(b"first")
        # in the socket before the sender yielded to the loop
        assert raw.recv(100) == _framing.encode_header(5) + b"first"
        for i in range(1000):
            await conn.send_bytes(b"m%d" % i)
        await asyncio.sleep(0)          # the end of this loop iteration sends the rest
        data = b""
        while len(data) < sum(4 + len(b"m%d" % i) for i in range(1000)):
            await asyncio.sleep(0.001)
            try:
                data += raw.recv(1 << 20)
            except BlockingIOError:
                pass
        d = _framing.FrameDecoder()
        d.feed(data)
        assert d.frames() == [b"m%d" % i for i in range(1000)]
        conn.close()
        raw.close()
    run(main)


def test_a_corked_message_leaves_when_a_receive_starts_waiting(run):
    """A request sent behind another in one loop iteration is not held back while its reply is awaited."""
    async def main():
        raw, conn = await _raw_and_conn()
        await conn.send_bytes(b"one")
        await conn.send_bytes(b"two")           # the second in this loop iteration: corked
        waiting = conn.recv_bytes()
        waiting.send(None)                      # the receive runs up to its wait on the loop
        enc = _framing.encode_header
        assert raw.recv(100) == enc(3) + b"one" + enc(3) + b"two"
        waiting.close()
        raw.send(enc(5) + b"reply")
        assert await conn.recv_bytes() == b"reply"
        conn.close()
        raw.close()
    run(main)


def test_a_large_frame_trickling_in_arrives_whole(run):
    """Short reads and empty sockets in the middle of large frames, into every kind of receive."""
    async def main():
        raw, conn = await _raw_and_conn()
        arr = np.arange(3 * MiB // 8, dtype=np.float64)
        header, _ = fastnet.zerocopy.encode_array(arr)
        big = pattern(3 * MiB + 7, 3)
        enc = _framing.encode_header
        wire = (enc(len(big)) + big + enc(len(header)) + header + enc(arr.nbytes) + arr.tobytes()
                + enc(len(big)) + big)
        loop = asyncio.get_running_loop()

        async def trickle():
            pos, step = 0, 1
            while pos < len(wire):
                await loop.sock_sendall(raw, wire[pos:pos + step])
                pos += step
                step = step * 7 % 300007 + 1
                await asyncio.sleep(0)
        sender = asyncio.ensure_future(trickle())
        assert await conn.recv_bytes() == big
        out = np.zeros_like(arr)
        assert (await conn.recv_array(out=out) is out) and (out == arr).all()
        buf = bytearray(len(big) + 10)
        assert await conn.recv_bytes_into(buf, 3) == len(big) and buf[3:3 + len(big)] == big
        await sender
        raw.close()
        conn.close()
    run(main)


def test_one_receiver_at_a_time(run):
    async def main():
        a, b = await _socketpair_conns()
        t = asyncio.ensure_future(b.recv_bytes())
        await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError):
            await b.recv_bytes()
        await a.send_bytes(b"x")
        assert await t == b"x"
        a.close()
        b.close()
    run(main)


# -- bad peers -------------------------------------------------------------------

@pytest.mark.parametrize("wire, error", [
    (struct.pack("!i", -5), ProtocolError),
    (struct.pack("!i", 2 * MiB), MessageTooLarge),
    (struct.pack("!iQ", -1, 2**63 + 5), MessageTooLarge),
    (struct.pack("!i", 100) + b"x" * 10, TruncatedFrameError),
])
def test_bad_frames_close_only_that_connection(run, wire, error):
    async def main():
        a, b = socket.socketpair()
        b.setblocking(False)
        conn = aio.AsyncConnection(b, max_message_size=MiB)
        a.sendall(wire)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(error):
            await conn.recv_bytes()
        if error is not TruncatedFrameError:
            assert conn.closed
            with pytest.raises(ConnectionLost):
                await conn.recv_bytes()
        conn.close()
        await conn.wait_closed()
        assert b.fileno() == -1
        a.close()
    run(main)


def test_bad_handshakes_never_reach_the_handler_and_leak_nothing(run):
    reached = []

    async def handler(conn):
        reached.append(conn)
        await conn.send_bytes(b"in")

    async def main():
        before = count_fds()
        async with await aio.serve(("127.0.0.1", 0), handler, authkey=KEY, handshake_timeout=0.3) as srv:
            loop = asyncio.get_running_loop()
            # garbage, a wrong key, a header claiming 1 GiB, and a peer that never speaks
            garbage = socket.create_connection(srv.address)
            garbage.sendall(struct.pack("!i", 5) + b"hello")
            huge = socket.create_connection(srv.address)
            huge.sendall(struct.pack("!i", 1 << 30))
            silent = socket.create_connection(srv.address)
            with pytest.raises(AuthenticationError):
                await aio.connect(srv.address, authkey=b"wrong")
            with pytest.raises(AuthenticationError):
                await loop.run_in_executor(None, lambda: fastnet.Client(srv.address, authkey=b"wrong"))
            deadline = loop.time() + WAIT
            while srv.failed_handshakes < 5 and loop.time() < deadline:
                await asyncio.sleep(0.02)
            assert srv.failed_handshakes == 5
            assert srv.connections == 0
            for s in (garbage, huge, silent):
                s.close()
            async with await aio.connect(srv.address, authkey=KEY) as good:
                assert await good.recv_bytes() == b"in"
        assert len(reached) == 1
        assert count_fds() == before
    run(main)


# -- servers -------------------------------------------------------------------

def test_max_connections_and_allow(run):
    async def main():
        gate = asyncio.Event()

        async def handler(conn):
            await conn.send_bytes(b"hi")
            await gate.wait()

        async with await aio.serve(("127.0.0.1", 0), handler, max_connections=2) as srv:
            c1 = await aio.connect(srv.address)
            c2 = await aio.connect(srv.address)
            assert await c1.recv_bytes() == b"hi" and await c2.recv_bytes() == b"hi"
            c3 = await aio.connect(srv.address)      # waits in the backlog
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await c3.recv_bytes()
            assert srv.connections == 2
            gate.set()
            assert await c3.recv_bytes() == b"hi"
            for c in (c1, c2, c3):
                c.close()
        async with await aio.serve(("127.0.0.1", 0), handler, allow=["10.0.0.0/8"]) as srv:
            c = await aio.connect(srv.address)
            with pytest.raises(EOFError):
                await c.recv_bytes()
            assert srv.refused == 1
            c.close()
    run(main)


def test_close_cancels_handlers(run):
    async def main():
        started = asyncio.Event()
        cancelled = []

        async def handler(conn):
            started.set()
            try:
                await conn.recv_bytes()
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        srv = await aio.serve(("127.0.0.1", 0), handler)
        c = await aio.connect(srv.address)
        await started.wait()
        srv.close()
        await srv.wait_closed()
        assert cancelled == [True]
        with pytest.raises(EOFError):
            await c.recv_bytes()
        c.close()
        with pytest.raises(OSError):
            await aio.connect(srv.address)
    run(main)


def test_serve_forever_until_cancelled(run):
    async def main():
        srv = await aio.serve(("127.0.0.1", 0), echo_bytes)
        forever = asyncio.ensure_future(srv.serve_forever())
        async with await aio.connect(srv.address) as c:
            await c.send_bytes(b"ping")
            assert await c.recv_bytes() == b"ping"
        assert srv.is_serving()
        forever.cancel()
        with pytest.raises(asyncio.CancelledError):
            await forever
        assert not srv.is_serving()
        await srv.wait_closed()
        with pytest.raises(OSError):
            await aio.connect(srv.address)
    run(main)


# -- the blocking side -----------------------------------------------------------

@pytest.mark.parametrize("key", [None, KEY])
def test_blocking_client_to_aio_server(run, address, key):
    sizes = [0, 100, 70000, 2 * MiB]

    async def main():
        async with await aio.serve(address, echo_bytes, authkey=key) as srv:
            def client():
                with fastnet.Client(srv.address, authkey=key) as c:
                    for n in sizes:
                        c.send_bytes(pattern(n, n))
                        assert c.recv_bytes() == pattern(n, n)
                    return True
            assert await asyncio.get_running_loop().run_in_executor(None, client)
    run(main)


@pytest.mark.parametrize("key", [None, KEY])
def test_aio_client_to_blocking_listener(run, address, key):
    with fastnet.Listener(address, authkey=key) as listener:
        def peer():
            with listener.accept() as c:
                while True:
                    try:
                        c.send_bytes(c.recv_bytes())
                    except EOFError:
                        return
        t = threading.Thread(target=peer)
        t.start()

        async def main():
            async with await aio.connect(listener.address, authkey=key) as c:
                for n in (0, 5, 65536, 3 * MiB):
                    await c.send_bytes(pattern(n, 1))
                    assert await c.recv_bytes() == pattern(n, 1)
        run(main)
        t.join(WAIT)


def test_aio_client_to_fastnet_server(run):
    class Echo(fserver.MessageHandler):
        def message_received(self, data):
            self.reply(data)

    srv = fserver.TCPServer(("127.0.0.1", 0), Echo, authkey=KEY)
    srv.start()
    try:
        async def main():
            async with await aio.connect(srv.address, authkey=KEY) as c:
                msgs = [pattern(i * 997, i) for i in range(50)]
                await c.send_many(msgs)
                got = []
                while len(got) < len(msgs):
                    got += await c.recv_many()
                assert got == msgs
        run(main)
    finally:
        srv.shutdown()
        srv.server_close()


# -- the stdlib, CPython 3.10-3.13 ---------------------------------------------------

STDLIB_PEER = r'''
import sys
from multiprocessing.connection import Listener, Client
mode, where, key = sys.argv[1], sys.argv[2], sys.argv[3]
key = bytes.fromhex(key) if key != "-" else None
addr = where if where.startswith("/") else ("127.0.0.1", int(where))
if mode == "listen":
    with Listener(addr, authkey=key) as l:
        a = l.address
        print(a if isinstance(a, str) else a[1], flush=True)
        c = l.accept()
else:
    c = Client(addr, authkey=key)
try:
    c.send(("hello", sys.version_info[:2]))
    while True:
        c.send_bytes(c.recv_bytes())
except EOFError:
    print("eof", flush=True)
except Exception as e:
    print(type(e).__name__, flush=True)
'''


@pytest.fixture(params=_interp_params())
def interp(request):
    it = request.param
    if it.exe is None:
        pytest.skip(f"pyenv has no CPython {it.name} on this machine")
    return it


async def _stdlib_session(conn, interp):
    kind, version = await conn.recv()
    assert kind == "hello" and tuple(version) == interp.version[:2]
    for n in (0, 1, 16384, 16385, 2 * MiB + 3):
        await conn.send_bytes(pattern(n, n))
        assert await conn.recv_bytes() == pattern(n, n)


@pytest.mark.parametrize("key", [None, KEY])
def test_stdlib_listener_aio_client(run, interp, workdir, key):
    where = os.path.join(workdir, "l")
    p = subprocess.Popen([interp.exe, "-I", "-c", STDLIB_PEER, "listen", where, key.hex() if key else "-"],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == where

        async def main():
            async with await aio.connect(where, authkey=key) as c:
                await _stdlib_session(c, interp)
        run(main)
        assert p.stdout.readline().strip() == "eof"
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("key", [None, KEY])
def test_stdlib_client_aio_server(run, interp, key):
    done = []

    async def handler(conn):
        await _stdlib_session(conn, interp)
        done.append(True)

    async def main():
        async with await aio.serve(("127.0.0.1", 0), handler, authkey=key) as srv:
            p = await asyncio.create_subprocess_exec(
                interp.exe, "-I", "-c", STDLIB_PEER, "connect", str(srv.address[1]), key.hex() if key else "-",
                stdout=subprocess.PIPE)
            out = await p.stdout.readline()
            await p.wait()
            assert out.strip() == b"eof"
        assert done == [True]
    run(main)


def test_stdlib_wrong_key_both_ways(run, interp, workdir):
    where = os.path.join(workdir, "l")
    p = subprocess.Popen([interp.exe, "-I", "-c", STDLIB_PEER, "listen", where, KEY.hex()],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert p.stdout.readline().strip() == where

        async def main():
            with pytest.raises(AuthenticationError):
                await aio.connect(where, authkey=b"wrong")
        run(main)
    finally:
        p.kill()
        p.wait()

    async def server_side():
        async with await aio.serve(("127.0.0.1", 0), echo_bytes, authkey=KEY) as srv:
            p = await asyncio.create_subprocess_exec(
                interp.exe, "-I", "-c", STDLIB_PEER, "connect", str(srv.address[1]), b"wrong".hex(),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            _, err = await p.communicate()
            assert p.returncode != 0 and b"AuthenticationError" in err
            assert srv.failed_handshakes == 1
    run(server_side)


# -- TLS ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pytest.importorskip("cryptography")
    import tlsutil
    return tlsutil.make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_aio_to_aio_with_authkey(run, pki):
    import tlsutil

    async def main():
        async with await aio.serve(("127.0.0.1", 0), echo_bytes, authkey=KEY,
                                   ssl_context=tlsutil.server_ctx(pki)) as srv:
            host = ("localhost", srv.address[1])
            async with await aio.connect(host, authkey=KEY, ssl_context=tlsutil.client_ctx(pki)) as c:
                assert c.get_extra_info("cipher") is not None
                for n in (0, 10, 70000, 5 * MiB):
                    await c.send_bytes(pattern(n, 7))
                    assert await c.recv_bytes() == pattern(n, 7)
                buf = bytearray(5 * MiB)
                await c.send_bytes(pattern(5 * MiB, 8))
                assert await c.recv_bytes_into(buf) == 5 * MiB and buf == pattern(5 * MiB, 8)
                arr = np.arange(MiB)
                await c.send_array(arr)
                assert np.array_equal(await c.recv_array(), arr)
            with pytest.raises(AuthenticationError):
                await aio.connect(host, ssl_context=tlsutil.client_ctx(pki, cafile="ca2"))
    run(main)


def test_tls_aio_client_to_blocking_tls_listener(run, pki):
    import tlsutil
    with fastnet.Listener(("127.0.0.1", 0), authkey=KEY, ssl_context=tlsutil.server_ctx(pki)) as listener:
        def peer():
            with listener.accept() as c:
                c.send_array(c.recv_array() + 1)
        t = threading.Thread(target=peer)
        t.start()

        async def main():
            async with await aio.connect(("localhost", listener.address[1]), authkey=KEY,
                                         ssl_context=tlsutil.client_ctx(pki)) as c:
                arr = np.arange(2 * MiB, dtype=np.int32)
                await c.send_array(arr)
                assert np.array_equal(await c.recv_array(), arr + 1)
                with pytest.raises(EOFError):
                    await c.recv_bytes()
        run(main)
        t.join(WAIT)


# -- RPC -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rpc_server():
    srv = fastnet.RPCServer(("127.0.0.1", 0), authkey=KEY, codec=["msgpack", "pickle"])

    @srv.register
    def add(a, b):
        return a + b

    @srv.register
    async def slow_double(x, delay=0.01):
        await asyncio.sleep(delay)
        return x * 2

    @srv.register
    async def fail(msg):
        raise KeyError(msg)

    @srv.register
    def echo(x):
        return x

    srv.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_rpc_calls_gather_and_notify(run, rpc_server):
    async def main():
        async with aio.RPCProxy(rpc_server.address, authkey=KEY) as p:
            assert await p.add(2, 3) == 5
            assert await p.slow_double(x=21) == 42
            results = await asyncio.gather(*(p.add(i, i) for i in range(500)),
                                           *(p.slow_double(i) for i in range(20)))
            assert results == [2 * i for i in range(500)] + [2 * i for i in range(20)]
            await p.notify("add", 1, 1)
            with pytest.raises(fastnet.RemoteError) as info:
                await p.fail("nope")
            assert info.value.type_name == "KeyError"
            with pytest.raises(fastnet.MethodNotFound):
                await p.missing()
            assert "slow_double" in await p.system.list_methods()
            with pytest.raises(fastnet.TimeoutError):
                await p.invoke("slow_double", [1], {"delay": 1.0}, timeout=0.05)
            assert await p.add(1, 1) == 2            # usable after a timeout
            assert p.pending == 0
    run(main)


def test_rpc_pickle_out_of_band_arrays(run, rpc_server):
    async def main():
        async with aio.RPCProxy(rpc_server.address, authkey=KEY, codec="pickle") as p:
            arr = np.arange(200_000, dtype=np.float64)
            got = await p.echo(arr)
            assert np.array_equal(got, arr)
            with pytest.raises(KeyError):
                await p.fail("k")
    run(main)


def test_blocking_proxy_calls_async_methods(rpc_server):
    with fastnet.RPCProxy(rpc_server.address, authkey=KEY) as p:
        assert p.slow_double(5) == 10
        futs = [p.call_async("slow_double", i) for i in range(50)]
        assert [f.result(WAIT) for f in futs] == [2 * i for i in range(50)]


def test_rpc_proxy_reconnects_after_the_server_goes(run):
    def serve_one():
        srv = fastnet.RPCServer(("127.0.0.1", port))
        srv.register_function(lambda: os.getpid(), "pid")
        srv.start()
        return srv

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main():
        srv = serve_one()
        p = aio.RPCProxy(("127.0.0.1", port))
        assert await p.pid() == os.getpid()
        srv.shutdown()
        srv.server_close()
        with pytest.raises(ConnectionLost):
            await p.pid()
        srv = serve_one()
        try:
            assert await p.pid() == os.getpid()
        finally:
            await p.close()
            srv.shutdown()
            srv.server_close()
    run(main)


# -- loops -------------------------------------------------------------------------

def test_no_threads_and_nothing_outlives_a_loop(run):
    before = threading.active_count()

    async def main():
        async with await aio.serve(("127.0.0.1", 0), echo_bytes, authkey=KEY) as srv:
            async with await aio.connect(srv.address, authkey=KEY) as c:
                await c.send_bytes(b"x" * 100000)
                assert await c.recv_bytes() == b"x" * 100000
                assert threading.active_count() == before
    fds = count_fds()
    for _ in range(3):          # one loop after another, as test suites do
        run(main)
    gc.collect()
    assert count_fds() == fds
    assert threading.active_count() == before


def test_async_methods_run_on_the_servers_loop_which_stops_with_it():
    srv = fastnet.RPCServer(("127.0.0.1", 0))
    seen = []

    @srv.register
    async def where():
        return threading.current_thread().name

    @srv.register
    async def remember(x):
        seen.append(x)

    srv.start()
    try:
        with fastnet.RPCProxy(srv.address) as p:
            assert p.where() == "fastnet-rpc-asyncio"
            p.notify("remember", 7)
            assert p.where() == "fastnet-rpc-asyncio"
        deadline = time.monotonic() + WAIT
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == [7]
        thread = srv._aio_thread
        assert thread is not None and thread.is_alive()
    finally:
        srv.shutdown()
        srv.server_close()
    assert not thread.is_alive()


# -- descriptor passing (AF_UNIX) -------------------------------------------------------------


def _pipe_fds(k):
    """k pipes: (read ends, write ends)."""
    pipes = [os.pipe() for _ in range(k)]
    return [r for r, _ in pipes], [w for _, w in pipes]


def _close(fds):
    for f in fds:
        os.close(f)


def test_descriptors_ride_on_messages_and_arrive_in_order(run):
    async def main():
        before = count_fds()
        a, b = await _socketpair_conns()
        b.accept_fds()
        rs, ws = _pipe_fds(3)
        await a.send_many([b"one", b"two"], fds=ws[:2])
        a.write_many([b"three"], fds=ws[2:])
        _close(ws)              # the caller's own: the connection needs them no longer
        assert await b.recv_bytes() == b"one"
        assert await b.recv_bytes() == b"two"
        assert await b.recv_bytes() == b"three"
        assert b.pending_fds == 3
        got = b.take_fds(2) + b.take_fds(1)
        assert b.pending_fds == 0
        for i, (r, w) in enumerate(zip(rs, got)):
            os.write(w, b"%d" % i)          # the write end of the same pipe, in send order
            assert os.read(r, 8) == b"%d" % i
        _close(got + rs)
        await a.send_many([b"none"])
        assert await b.recv_bytes() == b"none"
        with pytest.raises(ProtocolError, match="1 descriptors expected, 0 arrived"):
            b.take_fds(1)
        assert b.closed               # the peer's messages said more than it sent
        a.close()
        await a.wait_closed()
        assert count_fds() == before
    run(main)


def test_descriptors_queued_behind_unsent_bytes_leave_with_their_message(run):
    async def main():
        before = count_fds()
        a, b = await _socketpair_conns()
        b.accept_fds()
        big = pattern(8 * MiB)
        a.write_many([big])                     # more than the socket takes: the rest is queued
        assert a.write_buffer_size > 0
        rs, ws = _pipe_fds(4)
        a.write_many([b"x"], fds=ws[:1])
        a.write_many([b"y"], fds=ws[1:3])
        a.write_many([b"z"], fds=ws[3:])
        _close(ws)                              # the connection keeps copies until they leave
        assert await b.recv_bytes() == big
        for m in (b"x", b"y", b"z"):
            assert await b.recv_bytes() == m
        got = b.take_fds(4)
        for i, (r, w) in enumerate(zip(rs, got)):
            os.write(w, b"%d" % i)
            assert os.read(r, 8) == b"%d" % i
        _close(got + rs)
        a.close()
        b.close()
        await a.wait_closed()
        assert count_fds() == before
    run(main)


def test_descriptors_left_queued_or_unsent_close_with_the_connection(run):
    async def main():
        before = count_fds()
        a, b = await _socketpair_conns()
        b.accept_fds()
        a.write_many([pattern(8 * MiB)])
        rs, ws = _pipe_fds(2)
        a.write_many([b"x"], fds=ws)            # still queued behind the big message
        a.write_many([b"y"], fds=rs)            # ... and so are these
        _close(rs + ws)
        assert len(await b.recv_bytes()) == 8 * MiB
        assert await b.recv_bytes() == b"x"
        assert b.pending_fds >= 2
        a.abort()
        b.abort()
        assert count_fds() == before
    run(main)


def test_descriptors_beyond_the_queue_bound_close_the_connection(run):
    async def main():
        before = count_fds()
        a, b = await _socketpair_conns()
        b.accept_fds(max_queued=2)
        rs, ws = _pipe_fds(3)
        await a.send_many([b"x"], fds=ws)
        _close(ws)
        with pytest.raises(ProtocolError, match="at most 2"):
            await b.recv_bytes()
        assert b.closed
        _close(rs)
        a.abort()
        assert count_fds() == before
    run(main)


def test_a_truncated_control_message_closes_the_connection(run):
    import resource

    async def main():
        a, b = await _socketpair_conns()
        b.accept_fds()
        rs, ws = _pipe_fds(8)
        await a.send_many([b"x"], fds=ws)
        _close(ws)
        # every descriptor number up to the highest taken, so the limit below leaves room for two
        top = max(int(x) for x in os.listdir("/proc/self/fd"))
        fillers = []
        while not fillers or fillers[-1] < top:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        before = count_fds()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        # room for fewer descriptors than were sent: the kernel truncates the control message
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(fillers) + 3, hard))
        try:
            with pytest.raises(ProtocolError, match="control message truncated"):
                await b.recv_bytes()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert b.closed
        assert count_fds() == before - 1       # b's socket; none of what arrived
        _close(rs + fillers)
        a.abort()
    run(main)


def test_descriptors_need_a_plain_af_unix_connection(run):
    async def main():
        a, b = await _socketpair_conns()
        with pytest.raises(ValueError, match="accept_fds"):
            b.take_fds(1)
        with pytest.raises(ValueError, match="between 1 and 253"):
            a.write_many([b"x"], fds=[0] * 254)
        with pytest.raises(ValueError, match="at least one message"):
            await a.send_many([], fds=[0])
        a.abort()
        b.abort()
        server = await aio.serve(("127.0.0.1", 0), echo_bytes)
        try:
            c = await aio.connect(server.address)
            with pytest.raises(ValueError, match="AF_UNIX"):
                c.accept_fds()
            with pytest.raises(ValueError, match="AF_UNIX"):
                await c.send_many([b"x"], fds=[0])
            c.abort()
        finally:
            server.close()
    run(main)
