"""fastnet.EventLoop on every backend: readiness, timers, threads, signals, framed streams.

Real sockets and processes; every wait is bounded by a deadline (run_until
with a timeout, subprocess timeouts), and nothing asserts on timing.
"""
import logging
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import fastnet
from fastnet import _kernels
from fastnet.errors import MessageTooLarge, ProtocolError, TruncatedFrameError
from fastnet.loop import BACKENDS, EventLoop, Protocol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 20.0   # generous deadline for anything that should take milliseconds


@pytest.fixture(params=BACKENDS)
def loop(request):
    lp = EventLoop(request.param)
    yield lp
    if lp.is_running():
        lp.stop()
    lp.close()


@pytest.fixture
def epoll_loop():
    lp = EventLoop("epoll")
    yield lp
    lp.close()


def _child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _spawn(code, *args):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_child_env())


def _raise_nofile(n):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= n:
        return True
    if hard != resource.RLIM_INFINITY and hard < n:
        return False
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    return True


class Echo(Protocol):
    def message_received(self, data):
        self.transport.send_bytes(data)


class Recorder(Protocol):
    """Keeps what arrived and how the connection ended."""

    def __init__(self):
        self.messages = []
        self.lost = []
        self.made = 0

    def connection_made(self, transport):
        super().connection_made(transport)
        self.made += 1

    def message_received(self, data):
        self.messages.append(data)

    def connection_lost(self, exc):
        self.lost.append(exc)


def frame(payload):
    return len(payload).to_bytes(4, "big") + payload


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_frame(sock):
    n = int.from_bytes(recv_exact(sock, 4), "big", signed=True)
    return recv_exact(sock, n)


# -- kernel selection and construction ---------------------------------------------

def test_reactor_kernel_is_the_selected_set():
    expected = "fastnet._pure.reactor" if _kernels.PURE else "fastnet._c.reactor"
    assert _kernels.reactor.__name__ == expected
    assert issubclass(EventLoop, _kernels.reactor.Reactor)


def test_exports():
    assert fastnet.EventLoop is EventLoop
    assert "EventLoop" in fastnet.__all__ and "EventHandler" in fastnet.__all__


def test_auto_backend_is_epoll_and_bad_backend_is_refused():
    with EventLoop() as lp:
        assert lp.backend == "epoll"
    with pytest.raises(ValueError, match="unknown backend"):
        EventLoop("kqueue")


def test_closed_loop_refuses_work(loop):
    loop.close()
    assert loop.is_closed()
    with pytest.raises(RuntimeError):
        loop.call_soon(print)
    with pytest.raises(RuntimeError):
        loop.call_soon_threadsafe(print)
    with pytest.raises(RuntimeError):
        loop.run_until(0.01)
    loop.close()   # idempotent


# -- readiness ---------------------------------------------------------------------

def test_reader_gets_args_and_data(loop):
    a, b = socket.socketpair()
    got = []
    try:
        loop.add_reader(a, lambda s, tag: got.append((tag, s.recv(100))), a, "r")
        b.sendall(b"hello")
        assert loop.run_until(lambda: got, WAIT)
        assert got == [("r", b"hello")]
        assert loop.remove_reader(a.fileno())
        assert not loop.remove_reader(a.fileno())
        b.sendall(b"more")
        loop.run_until(0.05)
        assert got == [("r", b"hello")]
    finally:
        a.close()
        b.close()


def test_writer_fires_until_removed(loop):
    a, b = socket.socketpair()
    calls = []

    def writable():
        calls.append(1)
        if len(calls) == 3:
            loop.remove_writer(a)

    try:
        loop.add_writer(a.fileno(), writable)
        assert loop.run_until(lambda: len(calls) >= 3, WAIT)
        loop.run_until(0.05)
        assert len(calls) == 3
    finally:
        a.close()
        b.close()


def test_interest_is_changed_only_when_it_changes(loop):
    a, b = socket.socketpair()
    try:
        fd = a.fileno()
        base = loop.ctl_calls
        loop.add_reader(fd, lambda: None)
        assert loop.interest(fd) == {"read"} and loop.ctl_calls == base + 1
        loop.add_reader(fd, lambda: None)           # new callback, same interest
        assert loop.ctl_calls == base + 1
        loop.add_writer(fd, lambda: None)
        assert loop.interest(fd) == {"read", "write"} and loop.ctl_calls == base + 2
        loop.remove_writer(fd)
        assert loop.interest(fd) == {"read"} and loop.ctl_calls == base + 3
        loop.remove_writer(fd)                      # nothing to change
        assert loop.ctl_calls == base + 3
        loop.remove_reader(fd)
        assert loop.interest(fd) == set() and loop.ctl_calls == base + 4
    finally:
        a.close()
        b.close()


def test_traffic_changes_no_interest_with_idle_peers(loop):
    """Ping-pong on one framed connection among many idle ones: zero interest changes."""
    idle = [socket.socketpair() for _ in range(200)]
    try:
        for x, _y in idle:
            loop.add_reader(x, lambda: pytest.fail("idle socket became readable"))
        server_side, client = socket.socketpair()
        loop.add_stream(server_side, Echo())
        client.setblocking(False)
        replies = []
        state = {"buf": b""}

        def on_reply():
            state["buf"] += client.recv(65536)
            while len(state["buf"]) >= 8:
                replies.append(state["buf"][4:8])
                state["buf"] = state["buf"][8:]
                if len(replies) < 500:
                    client.send(frame(b"%04d" % len(replies)))

        loop.add_reader(client, on_reply)
        client.send(frame(b"0000"))
        assert loop.run_until(lambda: len(replies) >= 5, WAIT)
        before = loop.ctl_calls
        assert loop.run_until(lambda: len(replies) >= 500, WAIT)
        assert loop.ctl_calls == before
        assert replies[:3] == [b"0000", b"0001", b"0002"]
        assert loop.registered == 200 + 3   # idle + stream + client reader + wake-up fd
        loop.remove_reader(client)
        client.close()
    finally:
        for x, y in idle:
            loop.remove_reader(x)
            x.close()
            y.close()


def test_removing_another_reader_inside_a_callback(loop):
    pairs = [socket.socketpair() for _ in range(2)]
    calls = []
    try:
        (a1, b1), (a2, b2) = pairs

        def first():
            calls.append(1)
            a1.recv(10)
            loop.remove_reader(a2)

        def second():
            calls.append(2)
            a2.recv(10)
            loop.remove_reader(a1)

        loop.add_reader(a1, first)
        loop.add_reader(a2, second)
        b1.send(b"x")
        b2.send(b"y")
        loop.run_until(lambda: calls, WAIT)
        loop.run_until(0.05)
        assert calls in ([1], [2])
    finally:
        for x, y in pairs:
            x.close()
            y.close()


def test_add_reader_rejects_bad_arguments(loop):
    with pytest.raises(TypeError):
        loop.add_reader(0, "not callable")
    with pytest.raises(ValueError):
        loop.add_reader(-1, print)


def test_select_backend_refuses_descriptors_past_fd_setsize():
    if not _raise_nofile(1200):
        pytest.skip("cannot raise RLIMIT_NOFILE to 1200")
    a, b = socket.socketpair()
    high = os.dup2(a.fileno(), 1100)
    try:
        with EventLoop("select") as lp:
            with pytest.raises(ValueError, match="FD_SETSIZE"):
                lp.add_reader(high, print)
            with pytest.raises(ValueError, match="FD_SETSIZE"):
                lp.add_writer(high, print)
            assert lp.interest(a.fileno()) == set()
        for backend in ("epoll", "poll"):
            with EventLoop(backend) as lp:
                got = []
                lp.add_reader(high, lambda: got.append(os.read(high, 10)))
                b.send(b"hi")
                assert lp.run_until(lambda: got, WAIT)
                lp.remove_reader(high)
                assert got == [b"hi"]
    finally:
        os.close(high)
        a.close()
        b.close()


# -- time, callbacks, running -------------------------------------------------------

def test_call_soon_runs_in_order_and_new_ones_wait_an_iteration(loop):
    out = []

    def first():
        out.append("a")
        loop.call_soon(out.append, "c")

    loop.call_soon(first)
    loop.call_soon(out.append, "b")
    loop.run_once(0)
    assert out == ["a", "b"]
    loop.run_once(0)
    assert out == ["a", "b", "c"]


def test_timers_fire_in_order_under_load(loop):
    """Hundreds of timers while a framed connection carries traffic."""
    rng = random.Random(7)
    fired = []
    t0 = loop.time()
    expected = []
    for i in range(400):
        when = t0 + rng.uniform(0.0, 0.3)
        expected.append((when, i))
        loop.call_at(when, lambda i=i, when=when: fired.append((i, when, loop.time())))
    for i in range(100):   # equal deadlines keep call order
        expected.append((t0 + 0.15, 400 + i))
        loop.call_at(t0 + 0.15, lambda i=i: fired.append((400 + i, t0 + 0.15, loop.time())))
    server_side, client = socket.socketpair()
    loop.add_stream(server_side, Echo())

    def pump():
        client.setblocking(False)
        try:
            while True:
                client.recv(65536)
        except BlockingIOError:
            pass
        client.send(frame(b"x" * 100))

    loop.add_reader(client, pump)
    client.send(frame(b"x" * 100))
    assert loop.run_until(lambda: len(fired) == 500, WAIT)
    order = [i for i, _w, _t in fired]
    assert order == [i for _w, i in sorted(expected)]
    assert all(t >= w for _i, w, t in fired)
    loop.remove_reader(client)
    client.close()


def test_cancelled_timers_do_not_fire(loop):
    fired = []
    handles = [loop.call_later(0.01 + i * 0.0001, fired.append, i) for i in range(300)]
    for h in handles[::2]:
        h.cancel()
    assert loop.timers == 150
    assert handles[0].cancelled() and not handles[1].cancelled()
    assert loop.run_until(lambda: len(fired) == 150, WAIT)
    loop.run_until(0.05)
    assert fired == list(range(1, 300, 2))
    assert loop.timers == 0
    h = loop.call_soon(fired.append, "no")
    h.cancel()
    loop.run_once(0)
    assert "no" not in fired


def test_call_later_and_call_at_use_the_monotonic_clock(loop):
    assert abs(loop.time() - time.monotonic()) < 1.0
    out = []
    h = loop.call_later(0.02, out.append, "later")
    assert h.when() >= loop.time()
    loop.call_at(loop.time() + 0.01, out.append, "at")
    assert loop.run_until(lambda: len(out) == 2, WAIT)
    assert out == ["at", "later"]


def test_run_until_predicate_and_timeout(loop):
    state = {"n": 0}
    loop.call_later(0.01, lambda: state.update(n=1))
    assert loop.run_until(lambda: state["n"] == 1, WAIT) is True
    assert loop.run_until(lambda: False, 0.02) is False
    assert loop.run_until(0.01) is False
    loop.call_soon(loop.stop)
    assert loop.run_until(WAIT) is True


def test_run_forever_stops_from_another_thread(loop):
    t = threading.Timer(0.05, loop.stop)
    t.start()
    watchdog = threading.Timer(WAIT, loop.stop)
    watchdog.start()
    try:
        start = time.monotonic()
        loop.run_forever()
        assert time.monotonic() - start < WAIT
    finally:
        watchdog.cancel()
        t.join()


def test_nested_run_is_refused(loop):
    errors = []

    def nested():
        try:
            loop.run_until(0.01)
        except RuntimeError as exc:
            errors.append(exc)

    loop.call_soon(nested)
    loop.run_until(lambda: errors, WAIT)
    assert "already running" in str(errors[0])


def test_call_soon_threadsafe_from_many_threads(loop):
    got = []
    idents = set()
    n_threads, per = 8, 200

    def on_loop(k):
        got.append(k)
        idents.add(threading.get_ident())

    def worker(t):
        for i in range(per):
            loop.call_soon_threadsafe(on_loop, (t, i))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    assert loop.run_until(lambda: len(got) == n_threads * per, WAIT)
    for t in threads:
        t.join(WAIT)
    assert idents == {threading.get_ident()}
    for t in range(n_threads):
        assert [i for tt, i in got if tt == t] == list(range(per))


def test_exceptions_in_callbacks_are_logged_and_the_loop_goes_on(loop, caplog):
    out = []

    def boom():
        raise ValueError("boom in callback")

    with caplog.at_level(logging.ERROR, logger="fastnet.loop"):
        loop.call_soon(boom)
        loop.call_later(0.001, boom)
        loop.call_later(0.01, out.append, "after")
        assert loop.run_until(lambda: out, WAIT)
    recs = [r for r in caplog.records if r.name == "fastnet.loop"]
    assert len(recs) == 2
    assert all(r.exc_info and r.exc_info[0] is ValueError for r in recs)


# -- worker threads ----------------------------------------------------------------

def test_run_in_thread_results_arrive_on_the_loop_thread(loop):
    loop_ident = threading.get_ident()
    results = []

    def work(x):
        return x * x, threading.get_ident()

    def done(fut):
        value, worker_ident = fut.result()
        results.append((value, worker_ident, threading.get_ident()))

    futs = [loop.run_in_thread(work, i, callback=done) for i in range(50)]
    assert loop.run_until(lambda: len(results) == 50, WAIT)
    assert sorted(v for v, _w, _l in results) == [i * i for i in range(50)]
    assert all(l == loop_ident for _v, _w, l in results)
    assert all(w != loop_ident for _v, w, _l in results)
    assert all(f.done() for f in futs)


def test_run_in_thread_delivers_exceptions(loop):
    got = []

    def fail():
        raise KeyError("worker failed")

    fut = loop.run_in_thread(fail, callback=got.append)
    assert loop.run_until(lambda: got, WAIT)
    assert got[0] is fut
    assert isinstance(fut.exception(), KeyError)
    with pytest.raises(KeyError):
        fut.result()


def test_run_in_thread_pool_is_bounded():
    with EventLoop(max_workers=2) as lp:
        lock = threading.Lock()
        state = {"now": 0, "max": 0}
        done = []

        def work():
            with lock:
                state["now"] += 1
                state["max"] = max(state["max"], state["now"])
            time.sleep(0.01)
            with lock:
                state["now"] -= 1

        for _ in range(12):
            lp.run_in_thread(work, callback=done.append)
        assert lp.run_until(lambda: len(done) == 12, WAIT)
        assert state["max"] <= 2


def test_run_in_thread_without_callback_returns_a_future(loop):
    fut = loop.run_in_thread(sum, [1, 2, 3])
    assert fut.result(WAIT) == 6


# -- signals -------------------------------------------------------------------------

def test_sigterm_to_self_runs_the_handler_on_the_loop(loop):
    previous = signal.getsignal(signal.SIGTERM)
    hits = []
    loop.add_signal_handler(signal.SIGTERM, lambda tag: hits.append((tag, threading.get_ident())), "t")
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert loop.run_until(lambda: hits, WAIT)
        assert hits == [("t", threading.get_ident())]
        os.kill(os.getpid(), signal.SIGTERM)
        assert loop.run_until(lambda: len(hits) == 2, WAIT)
    finally:
        assert loop.remove_signal_handler(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == previous
    assert not loop.remove_signal_handler(signal.SIGTERM)


@pytest.fixture
def python_sigint():
    """SIGINT as Python sets it up, whatever this run inherited (nohup ignores it)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_sigint_handler_replaces_keyboardinterrupt(loop, python_sigint):
    hits = []
    loop.add_signal_handler(signal.SIGINT, hits.append, "int")
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert loop.run_until(lambda: hits, WAIT)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_signal_handlers_only_from_the_main_thread(loop):
    errors = []

    def other():
        try:
            loop.add_signal_handler(signal.SIGTERM, print)
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join(WAIT)
    assert errors


def test_sigterm_stops_a_child_server_gracefully():
    child = _spawn("""
        import signal, sys, fastnet
        from fastnet.loop import Protocol
        class Echo(Protocol):
            def message_received(self, data):
                self.transport.send_bytes(data)
        loop = fastnet.EventLoop()
        srv = loop.create_server(("127.0.0.1", 0), Echo)
        loop.add_signal_handler(signal.SIGTERM, loop.stop)
        print(srv.address[1], flush=True)
        loop.run_forever()
        srv.shutdown()
        loop.close()
        print("graceful", flush=True)
    """)
    try:
        port = int(child.stdout.readline())
        with fastnet.Client(("127.0.0.1", port), timeout=WAIT) as c:
            c.send_bytes(b"ping")
            assert c.recv_bytes() == b"ping"
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=WAIT)
        assert child.returncode == 0, err
        assert "graceful" in out
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


# -- framed streams ------------------------------------------------------------------

CLIENTS_SCRIPT = """
    import sys, fastnet
    port, nconn, nmsg = map(int, sys.argv[1:4])
    conns = [fastnet.Client(("127.0.0.1", port), timeout=30) for _ in range(nconn)]
    for i in range(nmsg):
        for k, c in enumerate(conns):
            msg = b"%d:%d:" % (k, i) + bytes([i % 256]) * (i % 97)
            c.send_bytes(msg)
        for k, c in enumerate(conns):
            expect = b"%d:%d:" % (k, i) + bytes([i % 256]) * (i % 97)
            got = c.recv_bytes()
            assert got == expect, (k, i, got[:40])
    for c in conns:
        c.close()
    print("ok", nconn * nmsg, flush=True)
"""


def test_framed_echo_server_with_many_clients(loop):
    server = loop.create_server(("127.0.0.1", 0), Echo)
    port = server.address[1]
    children = [_spawn(CLIENTS_SCRIPT, port, 20, 60) for _ in range(2)]
    try:
        assert loop.run_until(lambda: all(c.poll() is not None for c in children), 60)
        for c in children:
            out, err = c.communicate(timeout=WAIT)
            assert c.returncode == 0, err
            assert out.split() == ["ok", str(20 * 60)]
        assert server.accepted == 40
        assert loop.run_until(lambda: not server.transports, WAIT)
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()
        server.close()


def test_client_threads_message_by_message(loop):
    server = loop.create_server(("127.0.0.1", 0), Echo)
    addr = server.address
    errors, done = [], []

    def client(k):
        try:
            with fastnet.Client(addr, timeout=WAIT) as c:
                for i in range(200):
                    msg = b"t%d-%d" % (k, i)
                    c.send_bytes(msg)
                    assert c.recv_bytes() == msg
                c.send_many([b"a", b"", b"b" * 70000])
                assert [c.recv_bytes() for _ in range(3)] == [b"a", b"", b"b" * 70000]
        except Exception as exc:   # reported below, on the test thread
            errors.append(exc)
        done.append(k)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    assert loop.run_until(lambda: len(done) == 6, 60)
    for t in threads:
        t.join(WAIT)
    assert not errors, errors
    server.close()


def test_large_messages_both_ways(loop):
    server = loop.create_server(("127.0.0.1", 0), Echo, max_message_size=None)
    addr = server.address
    sizes = [0, 1, 65535, 65536, 65537, 300_000, 3 * 1024 * 1024]
    result = {}

    def client():
        try:
            with fastnet.Client(addr, timeout=WAIT) as c:
                for n in sizes:
                    payload = bytes(random.Random(n).randbytes(n))
                    c.send_bytes(payload)
                    assert c.recv_bytes() == payload, n
            result["ok"] = True
        except Exception as exc:
            result["err"] = exc

    t = threading.Thread(target=client)
    t.start()
    assert loop.run_until(lambda: result, 60)
    t.join(WAIT)
    assert result.get("ok"), result
    server.close()


def test_send_many_and_buffer_types(loop):
    a, b = socket.socketpair()
    try:
        t = loop.add_stream(a, Recorder())
        t.send_many([b"one", bytearray(b"two"), memoryview(b"three")])
        t.send_bytes(bytearray(b"four"))
        t.send_bytes(memoryview(b"xfivex")[1:5])
        t.send_many([b"z" * 40000, b"y" * 40000])
        b.settimeout(WAIT)
        got = [recv_frame(b) for _ in range(7)]
        assert got == [b"one", b"two", b"three", b"four", b"five", b"z" * 40000, b"y" * 40000]
        assert t.messages_sent == 7
    finally:
        b.close()


def test_send_many_sends_large_buffers_from_their_own_memory(loop):
    """A large array handed to send_many is queued as a view, not a copy: what
    arrives is the array's content at the time the kernel takes it, in order
    with the frames around it, even when the peer reads slowly."""
    np = pytest.importorskip("numpy")
    a, b = socket.socketpair()
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        t = loop.add_stream(a, Recorder())
        arr = np.arange(3 << 20, dtype=np.uint8)            # 3 MiB, far above the socket buffer
        strided = np.arange(200000, dtype=np.int32)[::2]      # not contiguous: sent as a copy
        t.send_many([b"head", arr, arr.reshape(3, -1)[1], strided, b"tail"])
        assert t.get_write_buffer_size() > 0                 # the peer has not read yet
        got = []

        def reader():
            b.settimeout(WAIT)
            for _ in range(5):
                got.append(recv_frame(b))

        th = threading.Thread(target=reader)
        th.start()
        assert loop.run_until(lambda: not th.is_alive() and t.get_write_buffer_size() == 0, WAIT)
        th.join()
        assert got[0] == b"head" and got[4] == b"tail"
        assert got[1] == arr.tobytes()
        assert got[2] == arr.reshape(3, -1)[1].tobytes()
        assert got[3] == strided.tobytes()
        assert t.messages_sent == 5
    finally:
        b.close()


def test_protocol_callbacks_and_extra_info(loop):
    server = loop.create_server(("127.0.0.1", 0), Recorder)
    fut = loop.connect(server.address, Recorder, timeout=WAIT)
    assert loop.run_until(fut.done, WAIT)
    ct = fut.result()
    assert ct.protocol.made == 1
    assert loop.run_until(lambda: server.transports, WAIT)
    (st,) = server.transports
    assert st.get_extra_info("peername") == ct.get_extra_info("sockname")
    assert st.get_extra_info("socket") is st.socket
    ct.send_bytes(b"hello")
    assert loop.run_until(lambda: st.protocol.messages, WAIT)
    assert st.protocol.messages == [b"hello"]
    ct.close()
    assert loop.run_until(lambda: st.protocol.lost and ct.protocol.lost, WAIT)
    assert st.protocol.lost == [None] and ct.protocol.lost == [None]
    loop.run_until(0.02)
    assert len(st.protocol.lost) == 1 and len(ct.protocol.lost) == 1
    assert ct.closed and ct.fileno() == -1
    with pytest.raises(ConnectionError):
        ct.send_bytes(b"late")
    server.close()


def test_connect_refused_and_timeout(loop):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    fut = loop.connect(("127.0.0.1", port), Recorder)
    assert loop.run_until(fut.done, WAIT)
    assert isinstance(fut.exception(), ConnectionRefusedError)


def test_connect_to_a_host_name_resolves_it_off_the_loop(loop, monkeypatch):
    # the real getaddrinfo, watched: which thread calls it, and a slow name
    # service (0.3 s) during which the loop must go on running timers
    server = loop.create_server(("127.0.0.1", 0), Recorder)
    real = socket.getaddrinfo
    callers = []

    def slow_getaddrinfo(*args, **kw):
        callers.append(threading.current_thread())
        time.sleep(0.3)
        return real(*args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)
    ticks = []
    loop.call_later(0.05, ticks.append, time.monotonic())
    t0 = time.monotonic()
    fut = loop.connect(("localhost", server.address[1]), Recorder, timeout=WAIT)
    assert time.monotonic() - t0 < 0.25          # connect() itself did not wait for the name
    assert loop.run_until(fut.done, WAIT)
    t = fut.result()
    assert callers and threading.main_thread() not in callers
    assert ticks and ticks[0] - t0 < 0.25         # the timer ran while the name was looked up
    assert t.get_extra_info("peername") == ("127.0.0.1", server.address[1])
    t.close()
    server.close()


def test_connect_tries_each_address_of_a_name(loop, monkeypatch):
    # the name has two addresses; nothing listens on the first (127.0.0.2),
    # so the connection is made to the second
    server = loop.create_server(("127.0.0.1", 0), Recorder)
    port = server.address[1]
    real = socket.getaddrinfo

    def two_addresses(host, *args, **kw):
        if host == "two.test":
            return real("127.0.0.2", *args, **kw) + real("127.0.0.1", *args, **kw)
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
    fut = loop.connect(("two.test", port), Recorder, timeout=WAIT)
    assert loop.run_until(fut.done, WAIT)
    t = fut.result()
    assert t.get_extra_info("peername") == ("127.0.0.1", port)
    t.close()
    # all of them refused: the last refusal is the error, and no socket is left open
    server.close()
    assert loop.run_until(lambda: t.closed and all(st.closed for st in server.transports), WAIT)
    before = len(os.listdir("/proc/self/fd"))
    fut = loop.connect(("two.test", port), Recorder, timeout=WAIT)
    assert loop.run_until(fut.done, WAIT)
    assert isinstance(fut.exception(), ConnectionRefusedError)
    assert len(os.listdir("/proc/self/fd")) == before


def test_connect_to_an_unknown_name_fails_with_the_lookup_error(loop):
    # .invalid never resolves (RFC 6761)
    fut = loop.connect(("no-such-host.invalid", 80), Recorder, timeout=WAIT)
    assert loop.run_until(fut.done, WAIT)
    assert isinstance(fut.exception(), socket.gaierror)


def test_close_drains_queued_writes_then_closes(loop):
    a, b = socket.socketpair()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    rec = Recorder()
    t = loop.add_stream(a, rec)
    big = bytes(range(256)) * 16384   # 4 MiB: far more than the socket buffers
    t.send_bytes(big)
    t.send_bytes(b"tail")
    assert t.get_write_buffer_size() > 0
    t.close()
    assert t.is_closing() and not t.closed
    got = {}

    def reader():
        b.settimeout(WAIT)
        got["big"] = recv_frame(b)
        got["tail"] = recv_frame(b)
        got["eof"] = b.recv(1)

    th = threading.Thread(target=reader)
    th.start()
    assert loop.run_until(lambda: rec.lost, WAIT)
    th.join(WAIT)
    b.close()
    assert got["big"] == big and got["tail"] == b"tail" and got["eof"] == b""
    assert rec.lost == [None]


def test_abort_closes_now(loop):
    a, b = socket.socketpair()
    rec = Recorder()
    t = loop.add_stream(a, rec)
    t.send_bytes(b"x" * (8 << 20))
    t.abort()
    assert t.closed and t.get_write_buffer_size() == 0
    loop.run_once(0)
    assert rec.lost == [None]
    b.close()


def test_pause_and_resume_reading(loop):
    a, b = socket.socketpair()
    rec = Recorder()
    t = loop.add_stream(a, rec)
    try:
        b.sendall(frame(b"1"))
        assert loop.run_until(lambda: rec.messages, WAIT)
        t.pause_reading()
        assert t.reading_paused
        b.sendall(frame(b"2") + frame(b"3"))
        loop.run_until(0.05)
        assert rec.messages == [b"1"]
        t.resume_reading()
        assert loop.run_until(lambda: len(rec.messages) == 3, WAIT)
        assert rec.messages == [b"1", b"2", b"3"]
    finally:
        b.close()


class SlowEcho(Protocol):
    """Echo with small kernel buffers, recording the largest write queue seen."""

    def __init__(self, registry):
        self.registry = registry
        self.max_queued = 0
        self.count = 0

    def connection_made(self, transport):
        super().connection_made(transport)
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        self.registry.append(self)

    def message_received(self, data):
        self.transport.send_bytes(data)
        self.count += 1
        self.max_queued = max(self.max_queued, self.transport.get_write_buffer_size())


def test_backpressure_pauses_reading_and_resumes(loop):
    high, msg_size, nmsg = 65536, 1000, 3000
    protos = []
    server = loop.create_server(("127.0.0.1", 0), lambda: SlowEcho(protos), high_water=high)
    c = socket.socket()
    # small buffers before connect(), so the window stays small and the
    # server's queue, not the kernels', absorbs what the peer does not read
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
    c.settimeout(WAIT)
    c.connect(server.address)
    sent = threading.Event()
    payloads = [bytes([i % 251]) * msg_size for i in range(nmsg)]

    def writer():
        try:
            for p in payloads:
                c.sendall(frame(p))
        except OSError:
            pass
        sent.set()

    wt = threading.Thread(target=writer)
    wt.start()
    try:
        paused = loop.run_until(lambda: protos and protos[0].transport.reading_paused, WAIT)
        assert paused, ("reading never paused", len(protos), sent.is_set(),
                        protos and (protos[0].count, protos[0].max_queued, protos[0].transport.get_write_buffer_size()))
        p = protos[0]
        t = p.transport
        # the peer reads nothing: the loop stays paused with a bounded queue
        loop.run_until(0.2)
        assert t.reading_paused and t.pauses >= 1
        assert p.count < nmsg
        assert p.max_queued <= high + msg_size + 4
        got = []

        def reader():
            c.settimeout(WAIT)
            for _ in range(nmsg):
                got.append(recv_frame(c))

        rt = threading.Thread(target=reader)
        rt.start()
        assert loop.run_until(lambda: len(got) == nmsg and sent.is_set(), 60)
        rt.join(WAIT)
        assert got == payloads
        assert not t.reading_paused
        assert p.max_queued <= high + msg_size + 4
    finally:
        c.close()
        wt.join(WAIT)
        server.close()


@pytest.mark.parametrize("bad,error", [
    (b"\xff\xff\xff\xfe", ProtocolError),
    (b"\x80\x00\x00\x00", ProtocolError),
    ((1 << 20).to_bytes(4, "big"), MessageTooLarge),
    (b"\xff\xff\xff\xff" + (1 << 40).to_bytes(8, "big"), MessageTooLarge),
    (frame(b"ok") + b"\x00\x00\x00\x10abc", TruncatedFrameError),
])
def test_bad_frames_close_only_that_connection(loop, bad, error):
    protos = []

    def factory():
        p = Recorder()
        p.message_received = lambda data, p=p: (p.messages.append(data), p.transport.send_bytes(data))
        protos.append(p)
        return p

    server = loop.create_server(("127.0.0.1", 0), factory, max_message_size=4096)
    good = socket.create_connection(server.address, timeout=WAIT)
    evil = socket.create_connection(server.address, timeout=WAIT)
    try:
        assert loop.run_until(lambda: len(protos) == 2, WAIT)
        evil.sendall(bad)
        if error is TruncatedFrameError:
            evil.shutdown(socket.SHUT_WR)
        assert loop.run_until(lambda: any(p.lost for p in protos), WAIT)
        (bad_proto,) = [p for p in protos if p.lost]
        assert isinstance(bad_proto.lost[0], error)
        evil.settimeout(WAIT)
        rest = b""
        while True:   # the server closed its end (after echoing any good frame)
            chunk = evil.recv(65536)
            if not chunk:
                break
            rest += chunk
        good.sendall(frame(b"still here"))
        got = []
        th = threading.Thread(target=lambda: got.append(recv_frame(good)))
        th.start()
        assert loop.run_until(lambda: got, WAIT)
        th.join(WAIT)
        assert got == [b"still here"]
        assert len(server.transports) == 1
    finally:
        good.close()
        evil.close()
        server.close()


def test_exception_in_message_received_closes_that_connection(loop, caplog):
    a, b = socket.socketpair()
    rec = Recorder()

    def boom(data):
        raise RuntimeError("protocol bug")

    rec.message_received = boom
    with caplog.at_level(logging.ERROR, logger="fastnet.loop"):
        loop.add_stream(a, rec)
        b.sendall(frame(b"x"))
        assert loop.run_until(lambda: rec.lost, WAIT)
    assert isinstance(rec.lost[0], RuntimeError)
    assert any("message_received" in r.getMessage() for r in caplog.records)
    b.close()


def test_loop_close_aborts_open_transports(loop):
    a, b = socket.socketpair()
    rec = Recorder()
    t = loop.add_stream(a, rec)
    server = loop.create_server(("127.0.0.1", 0), Echo)
    loop.close()
    assert t.closed and rec.lost == [None]
    assert not server.is_serving()
    b.settimeout(WAIT)
    assert b.recv(1) == b""
    b.close()


def test_stream_and_reader_on_one_descriptor_are_refused(loop):
    a, b = socket.socketpair()
    try:
        loop.add_stream(a, Recorder())
        with pytest.raises(ValueError):
            loop.add_reader(a.fileno(), print)
    finally:
        b.close()


def test_unix_server_and_url_address(loop, tmp_path):
    path = str(tmp_path / "loop.sock")
    server = loop.create_server("unix://" + path, Echo)
    got = []

    def client():
        with fastnet.Client(path, timeout=WAIT) as c:
            c.send_bytes(b"over unix")
            got.append(c.recv_bytes())

    th = threading.Thread(target=client)
    th.start()
    assert loop.run_until(lambda: got, WAIT)
    th.join(WAIT)
    assert got == [b"over unix"]
    server.close()
    assert not os.path.exists(path)


def test_accept_filter_refuses_and_counts(loop):
    server = loop.create_server(("127.0.0.1", 0), Echo, accept_filter=lambda sock, addr: False)
    c = socket.create_connection(server.address, timeout=WAIT)
    try:
        assert loop.run_until(lambda: server.refused == 1, WAIT)
        assert c.recv(1) == b""
        assert server.accepted == 0
    finally:
        c.close()
        server.close()


# -- many connections -------------------------------------------------------------

MANY_SCRIPT = """
    import resource, socket, sys
    port, n = int(sys.argv[1]), int(sys.argv[2])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 200), hard))
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        socks.append(s)
    for i, s in enumerate(socks):
        m = b"%06d" % i
        s.sendall(len(m).to_bytes(4, "big") + m)
    for i, s in enumerate(socks):
        buf = b""
        while len(buf) < 10:
            chunk = s.recv(10 - len(buf))
            assert chunk, i
            buf += chunk
        assert buf[4:] == b"%06d" % i, (i, buf)
    print("ok", n, flush=True)
"""


def test_thousands_of_connections_on_epoll(epoll_loop):
    n = 3000
    if not _raise_nofile(n + 300):
        pytest.skip("cannot raise RLIMIT_NOFILE")
    loop = epoll_loop
    server = loop.create_server(("127.0.0.1", 0), Echo, backlog=4096)
    child = _spawn(MANY_SCRIPT, server.address[1], n)
    try:
        assert loop.run_until(lambda: child.poll() is not None, 90)
        out, err = child.communicate(timeout=WAIT)
        assert child.returncode == 0, err
        assert out.split() == ["ok", str(n)]
        assert server.accepted == n
        assert loop.run_until(lambda: not server.transports, WAIT)
        assert loop.registered <= 3
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        server.close()


def test_pipelined_frames_split_at_every_byte_boundary(loop):
    """Random sizes (small, 64 KiB-crossing, 12-byte headers excluded) sent in random slices."""
    rng = random.Random(11)
    sizes = [rng.choice([0, 1, 3, 4, 5, 100, 4095, 65535, 65536, 70000, 300000]) for _ in range(120)]
    payloads = [rng.randbytes(n) for n in sizes]
    stream = b"".join(frame(p) for p in payloads)
    a, b = socket.socketpair()
    rec = Recorder()
    loop.add_stream(a, rec, max_message_size=None)

    def writer():
        pos = 0
        while pos < len(stream):
            k = rng.choice([1, 2, 3, 5, 7, 13, 4096, 65536, 200000])
            b.sendall(stream[pos:pos + k])
            pos += k

    th = threading.Thread(target=writer)
    th.start()
    assert loop.run_until(lambda: len(rec.messages) == len(payloads), 60)
    th.join(WAIT)
    assert rec.messages == payloads
    b.close()
    assert loop.run_until(lambda: rec.lost, WAIT)
    assert rec.lost == [None]
