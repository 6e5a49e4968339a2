"""Busy-polling in the event loop: ``spin=`` microseconds on the reactor of
both kernel sets, on EventLoop, on every server and on RPCServer.

A spinning loop polls its descriptors without sleeping before each wait that
would block. It must dispatch what arrives, fire timers no earlier than they
are due and without waiting out the spin, and still be woken by other
threads. Real sockets, threads and processes; the only bounds on time are
generous ones that a loop which overran its timeout by the spin would miss.
"""
import os
import socket
import threading
import time

import pytest

import fastnet
from fastnet.loop import BACKENDS, EventLoop
from fastnet.server import CONCURRENCY, MessageHandler, TCPServer, ThreadingTCPServer, StreamRequestHandler

WAIT = 20.0            # deadline for what should take milliseconds
LONG_SPIN = 5e6        # microseconds: 5 s, far beyond every wait of these tests
WATCHDOG_SECONDS = 180


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _reactor(kernels, backend, spin):
    return kernels.reactor.Reactor(backend, spin=spin)


@pytest.mark.parametrize("spin", [50.0, LONG_SPIN])
def test_spinning_reactor_dispatches_reads(kernels, backend, spin):
    """Ping-pong between a thread and the loop: every message arrives and is answered."""
    r = _reactor(kernels, backend, spin)
    a, b = socket.socketpair()
    a.setblocking(False)
    got = []

    def on_readable():
        data = a.recv(100)
        got.append(data)
        a.send(data.upper())

    def peer():
        for i in range(50):
            b.sendall(b"m%d" % i)
            assert b.recv(100) == b"M%d" % i

    try:
        r.add_reader(a, on_readable)
        t = threading.Thread(target=peer)
        t.start()
        assert r.run_until(lambda: len(got) == 50, timeout=WAIT)
        t.join(WAIT)
        assert got == [b"m%d" % i for i in range(50)]
    finally:
        r.close()
        a.close()
        b.close()


def test_spinning_loop_serves_framed_streams(backend):
    """A framed echo on a spinning EventLoop, the client on a thread."""
    class Echo:
        def connection_made(self, transport):
            self.transport = transport

        def message_received(self, data):
            self.transport.send_bytes(data[::-1])

    loop = EventLoop(backend, spin=200)
    a, b = socket.socketpair()
    replies = []

    def client():
        with fastnet.Connection(b) as c:
            for i in range(100):
                c.send_bytes(b"abc%d" % i)
                replies.append(c.recv_bytes())

    try:
        loop.add_stream(a, Echo())
        t = threading.Thread(target=client)
        t.start()
        assert loop.run_until(lambda: len(replies) == 100, timeout=WAIT)
        t.join(WAIT)
        assert replies == [(b"abc%d" % i)[::-1] for i in range(100)]
    finally:
        loop.close()


@pytest.mark.parametrize("spin", [1000.0, LONG_SPIN])
def test_timer_fires_when_due_not_before(kernels, backend, spin):
    """A timer 50 ms ahead fires at its time, whether the spin is shorter or longer than the wait."""
    r = _reactor(kernels, backend, spin)
    fired = []

    def due():
        fired.append(r.time())
        r.stop()

    try:
        t0 = r.time()
        h = r.call_later(0.05, due)
        r.run_forever()
        elapsed = r.time() - t0
        assert fired and fired[0] >= h.when() >= t0 + 0.05
        # the spin never outlasts the wait it precedes: with it, this would take 5 s
        assert elapsed < LONG_SPIN * 1e-6 / 2
    finally:
        r.close()


def test_run_once_returns_after_its_timeout(kernels, backend):
    """run_once(timeout) with nothing ready spins at most that long, not the spin's budget."""
    r = _reactor(kernels, backend, LONG_SPIN)
    try:
        t0 = time.monotonic()
        r.run_once(0.02)
        assert time.monotonic() - t0 < LONG_SPIN * 1e-6 / 2
    finally:
        r.close()


@pytest.mark.parametrize("spin", [1000.0, LONG_SPIN])
def test_call_soon_threadsafe_wakes_a_spinning_loop(kernels, backend, spin):
    """From another thread, during the spin (5 s) or after it (1 ms, then asleep)."""
    r = _reactor(kernels, backend, spin)
    ran = []

    def later():
        time.sleep(0.05)
        r.call_soon_threadsafe(ran.append, threading.get_ident())
        r.call_soon_threadsafe(r.stop)

    try:
        t = threading.Thread(target=later)
        t0 = time.monotonic()
        t.start()
        r.run_forever()
        elapsed = time.monotonic() - t0
        t.join(WAIT)
        assert ran == [t.ident]
        assert elapsed < LONG_SPIN * 1e-6 / 2
        t = threading.Thread(target=lambda: (time.sleep(0.05), r.stop()))
        t.start()
        r.run_forever()      # stop() from a thread wakes it too
        t.join(WAIT)
    finally:
        r.close()


def test_spin_is_validated_and_kept(kernels):
    R = kernels.reactor.Reactor
    for bad in (-1.0, -1e-9, float("nan")):
        with pytest.raises(ValueError):
            R("epoll", spin=bad)
    r = R()
    assert r.spin == 0.0
    r.close()
    for value in (50, 12.5, LONG_SPIN):
        r = R("poll", spin=value)
        assert r.spin == value and isinstance(r.spin, float)
        with pytest.raises(AttributeError):
            r.spin = 1.0
        r.close()


def test_event_loop_and_servers_take_spin():
    with EventLoop(spin=25.5) as loop:
        assert loop.spin == 25.5
    with EventLoop() as loop:
        assert loop.spin == 0.0
    for bad in (-5, float("nan")):
        with pytest.raises(ValueError):
            EventLoop(spin=bad)
        with pytest.raises(ValueError):
            TCPServer(("127.0.0.1", 0), StreamRequestHandler, bind_and_activate=False, spin=bad)
        with pytest.raises(ValueError):
            fastnet.RPCServer(("127.0.0.1", 0), spin=bad)


class LoopSpin(MessageHandler):
    """Replies with the message and the spin of the loop that serves this connection."""

    def message_received(self, data):
        loop = self.transport._loop if self.transport is not None else self.server._loop
        self.reply(b"%d:%s:%r" % (os.getpid(), data, loop.spin))


@pytest.mark.parametrize("mode", CONCURRENCY)
def test_every_concurrency_mode_serves_with_spin(serve, mode):
    """The spin reaches the loop that serves each connection: the server's, a worker's, a child's."""
    srv = serve(TCPServer, ("127.0.0.1", 0), LoopSpin, concurrency=mode, workers=2, spin=50,
                authkey=b"k")
    assert srv.spin == 50.0
    for _ in range(3):
        with fastnet.Client(srv.address, authkey=b"k", spin=50, timeout=WAIT) as c:
            for i in range(20):
                c.send_bytes(b"%d" % i)
                pid, data, spin = c.recv_bytes().split(b":")
                assert data == b"%d" % i and float(spin) == 50.0
                assert (int(pid) == os.getpid()) == (mode in ("loop", "thread"))


def test_stdlib_style_server_with_spin(serve):
    class Upper(StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                self.wfile.write(line.upper())

    srv = serve(ThreadingTCPServer, ("127.0.0.1", 0), Upper, spin=100, backend="poll")
    assert srv._loop.spin == 100.0 and srv._loop.backend == "poll"
    with socket.create_connection(srv.address, timeout=WAIT) as s:
        f = s.makefile("rwb")
        for i in range(20):
            f.write(b"line %d\n" % i)
            f.flush()
            assert f.readline() == b"LINE %d\n" % i


def test_rpc_server_in_process_spins():
    srv = fastnet.RPCServer(("127.0.0.1", 0), spin=75)
    srv.register_function(lambda x, y: x + y, "add")
    srv.start()
    try:
        assert srv.server._loop.spin == 75.0
        with fastnet.RPCProxy(srv.address, timeout=WAIT) as proxy:
            assert [proxy.add(i, 2) for i in range(100)] == [i + 2 for i in range(100)]
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("workers", [1, 2])
def test_rpc_server_and_proxy_spinning_in_separate_processes(workers):
    from rpcutil import ServerProcess
    srv = ServerProcess(("127.0.0.1", 0), spin=50, workers=workers)
    try:
        with fastnet.RPCProxy(srv.address, spin=50, timeout=WAIT) as proxy:
            assert [proxy.add(i, 1) for i in range(1000)] == list(range(1, 1001))
            assert proxy.kw(1, c=9) == [1, 2, 9]
            futures = [proxy.call_async("ident", i) for i in range(64)]
            assert [f.result(WAIT) for f in futures] == [["reply", i, i * 7 + 1] for i in range(64)]
            with pytest.raises(fastnet.RemoteError):
                proxy.fail("boom")
            assert proxy.echo(b"x" * 200_000) == b"x" * 200_000
        assert srv.terminate() == 0
    finally:
        srv.close()
