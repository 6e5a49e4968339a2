"""Listener / Client / Connection / Pipe / wait over real sockets.

Every blocking call in here is bounded: a Client gets a timeout, an accept()
is preceded by wait([listener], T), a recv() by poll(T), threads and child
processes are joined with a timeout, and a watchdog dumps the stacks and
exits if a test still hangs.
"""
import array
import multiprocessing
import os
import pickle
import select
import socket
import struct
import subprocess
import sys
import textwrap
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

import fastnet
from fastnet import Client, Listener, Pipe, wait

T = 10.0  # bound on anything that should happen "at once"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(fastnet.__file__)))
KEY = b"test-connection-key"


WATCHDOG_SECONDS = 120


@pytest.fixture
def pool():
    with ThreadPoolExecutor(4) as ex:
        yield ex


def _ipv6_available():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _ipv6_available(), reason="::1 is not available")


def abstract_name():
    return f"\0fastnet-test-{os.getpid()}-{uuid.uuid4().hex}"


def accept(listener):
    assert wait([listener], T) == [listener], "no connection arrived"
    return listener.accept()


def connect_pair(listener, pool, address=None, **client_kw):
    """(client, server) Connections, running the Client in a thread for handshakes."""
    client_kw.setdefault("timeout", T)
    fut = pool.submit(Client, listener.address if address is None else address, **client_kw)
    server = accept(listener)
    return fut.result(T), server


def rx(conn):
    assert conn.poll(T), "nothing arrived"
    return conn.recv()


def rx_bytes(conn, *args):
    assert conn.poll(T), "nothing arrived"
    return conn.recv_bytes(*args)


def roundtrip(a, b):
    a.send({"ping": [1, 2.5, "three"]})
    assert rx(b) == {"ping": [1, 2.5, "three"]}
    b.send_bytes(b"pong")
    assert rx_bytes(a) == b"pong"


def sockname(conn):
    with socket.socket(fileno=os.dup(conn.fileno())) as s:
        return s.getsockname()


def peername(conn):
    with socket.socket(fileno=os.dup(conn.fileno())) as s:
        return s.getpeername()


def nodelay(conn):
    with socket.socket(fileno=os.dup(conn.fileno())) as s:
        return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def read_line(proc, timeout=T):
    """One line of a child's stdout, without blocking past timeout."""
    buf = b""
    fd = proc.stdout.fileno()
    while not buf.endswith(b"\n"):
        r, _, _ = select.select([fd], [], [], timeout)
        assert r, f"child printed nothing in {timeout}s"
        chunk = os.read(fd, 4096)
        assert chunk, f"child exited early: {proc.wait(T)} {proc.stderr.read().decode()}"
        buf += chunk
    return buf.decode()


# -- addresses and families ----------------------------------------------------


def test_tcp_ipv4_listener_address_last_accepted_and_roundtrip(pool):
    with Listener(("127.0.0.1", 0)) as l:
        host, port = l.address
        assert host == "127.0.0.1" and port != 0
        assert l.url == f"tcp://127.0.0.1:{port}"
        c = Client(l.address, timeout=T)
        s = accept(l)
        with c, s:
            assert c.family == s.family == socket.AF_INET
            assert l.last_accepted == sockname(c)
            assert peername(c) == (host, port)
            roundtrip(c, s)


def test_listener_family_without_address_binds_a_real_port():
    with Listener(family="AF_INET") as l:
        assert l.address[1] != 0
        with Client(l.address, timeout=T) as c, accept(l) as s:
            roundtrip(s, c)


def test_default_listener_is_af_unix_and_unlinks_its_path():
    with Listener() as l:
        path = l.address
        assert isinstance(path, str) and os.path.exists(path)
        with Client(path, timeout=T) as c, accept(l) as s:
            roundtrip(c, s)
    assert not os.path.exists(path)


@needs_ipv6
def test_tcp_ipv6(pool):
    with Listener(("::1", 0)) as l:
        assert l.address[0] == "::1" and l.address[1] != 0
        c = Client(l.address, timeout=T)
        s = accept(l)
        with c, s:
            assert c.family == s.family == socket.AF_INET6
            assert l.last_accepted[:2] == sockname(c)[:2]
            assert nodelay(c) and nodelay(s)
            roundtrip(c, s)


@needs_ipv6
def test_tcp_ipv6_url_forms(pool):
    with Listener("tcp://[::1]:0") as l:
        port = l.address[1]
        assert port != 0 and l.url == f"tcp://[::1]:{port}"
        with Client(f"tcp://[::1]:{port}", timeout=T) as c, accept(l) as s:
            assert c.family == socket.AF_INET6
            roundtrip(c, s)


def test_unix_path(tmp_path):
    path = str(tmp_path / "l.sock")
    with Listener(path) as l:
        assert l.address == path
        assert l.url == "unix://" + path
        c = Client(path, timeout=T)
        s = accept(l)
        with c, s:
            assert c.family == socket.AF_UNIX
            assert l.last_accepted == ""  # an unbound AF_UNIX client, as in the stdlib
            roundtrip(c, s)
    assert not os.path.exists(path)


def test_unix_abstract():
    name = abstract_name()
    with Listener(name) as l:
        assert l.address == name
        assert l.url == "unix://@" + name[1:]
        with Client(name, timeout=T) as c, accept(l) as s:
            roundtrip(c, s)
        # the URL form of the abstract name reaches the same listener
        with Client(l.url, timeout=T) as c, accept(l) as s:
            roundtrip(s, c)


def test_url_forms_tcp_and_unix(tmp_path):
    with Listener("tcp://127.0.0.1:0") as l:
        host, port = l.address
        assert (host, port != 0) == ("127.0.0.1", True)
        with Client(f"tcp://127.0.0.1:{port}", timeout=T) as c, accept(l) as s:
            assert c.family == socket.AF_INET
            roundtrip(c, s)
    path = str(tmp_path / "u.sock")
    with Listener("unix://" + path) as l:
        assert l.address == path and os.path.exists(path)
        with Client("unix://" + path, timeout=T) as c, accept(l) as s:
            assert c.family == socket.AF_UNIX
            roundtrip(c, s)
        with Client(path, timeout=T) as c, accept(l) as s:
            roundtrip(c, s)


def test_authenticated_roundtrip_every_family(pool, tmp_path):
    addresses = [("127.0.0.1", 0), str(tmp_path / "a.sock"), abstract_name()]
    if _ipv6_available():
        addresses.append(("::1", 0))
    for address in addresses:
        with Listener(address, authkey=KEY) as l:
            c, s = connect_pair(l, pool, authkey=KEY)
            with c, s:
                roundtrip(c, s)


def test_tcp_nodelay_on_both_ends(pool):
    with Listener(("127.0.0.1", 0), authkey=KEY) as l:
        c, s = connect_pair(l, pool, authkey=KEY)
        with c, s:
            assert nodelay(c) != 0
            assert nodelay(s) != 0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_connect_refused_is_an_oserror(host):
    # a literal host is connected to directly, a name through getaddrinfo: the same error
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening
        with pytest.raises(ConnectionRefusedError):
            Client((host, port), timeout=T)


@pytest.mark.parametrize("timeout", [None, T])
def test_sockets_of_client_and_accept_are_the_stdlibs(timeout):
    # Client(host literal) and accept() make their sockets without the stdlib's
    # helpers: what a user sees of them is what socket.create_connection and
    # socket.accept would give
    with Listener(("127.0.0.1", 0)) as l:
        for host in ("127.0.0.1", "localhost"):
            with Client((host, l.address[1]), timeout=timeout) as c, accept(l) as s:
                for conn in (c, s):
                    sock = socket.socket(fileno=os.dup(conn.fileno()))
                    with sock:
                        assert sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM
                        assert os.get_blocking(conn.fileno())
                        assert os.get_inheritable(conn.fileno()) is False
                assert l.last_accepted == sockname(c)
                roundtrip(c, s)


# -- state, context managers, fileno -------------------------------------------


def test_closed_readable_writable_and_double_close():
    a, b = Pipe()
    assert (a.closed, a.readable, a.writable) == (False, True, True)
    a.close()
    assert a.closed
    a.close()  # harmless
    assert a.closed
    b.close()


def test_context_managers_close(tmp_path):
    path = str(tmp_path / "cm.sock")
    with Listener(path) as l:
        with Client(path, timeout=T) as c:
            with accept(l) as s:
                assert not s.closed
            assert s.closed
            assert not c.closed
        assert c.closed
    with pytest.raises(OSError):
        l.accept()
    assert not os.path.exists(path)


def test_fileno_is_the_socket_and_closed_handle_errors():
    a, b = Pipe()
    fd = a.fileno()
    assert isinstance(fd, int) and fd >= 0
    with socket.socket(fileno=os.dup(fd)) as s:
        assert s.family == socket.AF_UNIX and s.type == socket.SOCK_STREAM
    a.close()
    calls = {
        "fileno": lambda: a.fileno(),
        "send": lambda: a.send(1),
        "recv": lambda: a.recv(),
        "send_bytes": lambda: a.send_bytes(b"x"),
        "send_bytes_offset": lambda: a.send_bytes(b"xyz", 1, 1),
        "recv_bytes": lambda: a.recv_bytes(),
        "recv_bytes_into": lambda: a.recv_bytes_into(bytearray(8)),
        "poll": lambda: a.poll(),
        "send_many": lambda: a.send_many([b"x"]),
        "recv_many": lambda: a.recv_many(),
        "send_array": lambda: a.send_array(b"x"),
        "recv_array": lambda: a.recv_array(),
    }
    for name, call in calls.items():
        with pytest.raises(OSError, match="closed"):
            call()
    # the peer sees a clean close
    with pytest.raises(EOFError):
        rx_bytes(b)
    b.close()


def test_closed_handle_matches_stdlib_message():
    a, b = multiprocessing.Pipe()
    a.close()
    with pytest.raises(OSError) as std:
        a.send(1)
    b.close()
    a, b = Pipe()
    a.close()
    with pytest.raises(OSError) as ours:
        a.send(1)
    b.close()
    assert str(ours.value) == str(std.value)


def test_listener_fileno_and_wait_on_listener():
    with Listener(("127.0.0.1", 0)) as l:
        assert isinstance(l.fileno(), int)
        assert wait([l], 0) == []
        with Client(l.address, timeout=T) as c:
            assert wait([l], T) == [l]
            with l.accept() as s:
                roundtrip(c, s)


# -- Pipe ------------------------------------------------------------------------


def test_pipe_duplex():
    a, b = Pipe()
    with a, b:
        roundtrip(a, b)
        roundtrip(b, a)


def test_pipe_simplex():
    r, w = Pipe(duplex=False)
    with r, w:
        assert (r.readable, r.writable) == (True, False)
        assert (w.readable, w.writable) == (False, True)
        w.send([1, 2, 3])
        assert rx(r) == [1, 2, 3]
        with pytest.raises(OSError, match="read-only"):
            r.send(1)
        with pytest.raises(OSError, match="write-only"):
            w.recv()
        with pytest.raises(OSError, match="write-only"):
            w.poll()


# -- poll and wait -----------------------------------------------------------------


def test_poll_semantics(pool):
    a, b = Pipe()
    with a, b:
        assert a.poll() is False
        assert a.poll(0) is False
        assert a.poll(0.05) is False
        fut = pool.submit(b.send, "hello")
        assert a.poll(None) is True  # blocks until the thread's message arrives
        fut.result(T)
        assert a.poll(0) is True
        assert a.poll(0) is True  # polling does not consume
        assert a.recv() == "hello"
        assert a.poll(0) is False
        b.close()
        assert a.poll(T) is True  # EOF is "readable"
        with pytest.raises(EOFError):
            a.recv()


def test_poll_sees_frames_already_buffered():
    a, b = Pipe(readahead=True)
    with a, b:
        b.send_many([pickle.dumps(i) for i in range(3)])
        assert rx(a) == 0
        # the first read drained the socket; the rest sits in a's buffer
        assert select.select([a.fileno()], [], [], 0)[0] == []
        assert a.poll(0) is True
        assert a.recv() == 1
        assert a.poll() is True
        assert a.recv() == 2
        assert a.poll() is False


def test_wait_returns_only_ready_objects(pool):
    pairs = [Pipe() for _ in range(4)]
    readers = [p[0] for p in pairs]
    try:
        assert wait(readers, 0) == []
        assert wait(readers, 0.05) == []
        pairs[2][1].send_bytes(b"two")
        assert wait(readers, T) == [readers[2]]
        pairs[0][1].send_bytes(b"zero")
        got = wait(readers, T)
        assert set(map(id, got)) == {id(readers[0]), id(readers[2])}
        assert rx_bytes(readers[2]) == b"two"
        assert wait(readers, T) == [readers[0]]
        assert rx_bytes(readers[0]) == b"zero"
        # a message sent by another thread while wait() blocks without timeout
        fut = pool.submit(pairs[3][1].send_bytes, b"three")
        assert wait(readers) == [readers[3]]
        fut.result(T)
        # a closed peer makes the reader ready (recv then raises EOFError)
        pairs[1][1].close()
        got = wait(readers, T)
        assert set(map(id, got)) == {id(readers[1]), id(readers[3])}
        with pytest.raises(EOFError):
            readers[1].recv_bytes()
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_wait_accepts_sockets_and_raw_fds():
    s1, s2 = socket.socketpair()
    r, w = os.pipe()
    try:
        assert wait([s1, r], 0) == []
        s2.sendall(b"x")
        assert wait([s1, r], T) == [s1]
        os.write(w, b"y")
        got = wait([s1, r], T)
        assert len(got) == 2 and s1 in got and r in got
    finally:
        for s in (s1, s2):
            s.close()
        os.close(r)
        os.close(w)


def test_wait_reports_a_connection_with_buffered_frames_at_once():
    a, b = Pipe(readahead=True)
    other_a, other_b = Pipe()
    with a, b, other_a, other_b:
        b.send_many([pickle.dumps(("msg", i)) for i in range(5)])
        assert rx(a) == ("msg", 0)
        # nothing is left on the socket itself: only in fastnet's buffer
        assert select.select([a.fileno()], [], [], 0)[0] == []
        assert wait([other_a, a], 0) == [a]
        assert wait([other_a, a], T) == [a]
        assert wait([a]) == [a]  # no timeout: must not block
        for i in range(1, 5):
            assert wait([other_a, a], 0) == [a]
            assert a.recv() == ("msg", i)
        assert wait([other_a, a], 0) == []


# -- pickles and bytes ----------------------------------------------------------------


def test_send_recv_pickle_roundtrip(tmp_path):
    objects = [
        None, True, 0, -1, 2**100, 3.25, "héllo", b"\x00\xff" * 10, [], {},
        {"nested": [1, (2, 3), {4: frozenset({5})}]},
        ValueError("boom"), list(range(100_000)),  # a few hundred KiB
        bytes(range(256)) * 40_000,  # ~10 MiB
    ]
    with Listener(str(tmp_path / "p.sock")) as l:
        with Client(l.address, timeout=T) as c, accept(l) as s, ThreadPoolExecutor(1) as ex:
            fut = ex.submit(lambda: [c.send(o) for o in objects])
            got = [rx(s) for _ in objects]
            fut.result(T)
    for want, have in zip(objects, got):
        if isinstance(want, Exception):
            assert type(have) is type(want) and have.args == want.args
        else:
            assert have == want


def _send_bytes_outcome(conn_pair, buf, offset, size):
    a, b = conn_pair
    with a, b:
        try:
            a.send_bytes(buf, offset, size)
        except Exception as exc:
            return ("raised", type(exc), str(exc))
        assert b.poll(T)
        return ("sent", b.recv_bytes())


SEND_BYTES_CASES = [
    (b"0123456789", 0, None), (b"0123456789", 3, None), (b"0123456789", 3, 4),
    (b"0123456789", 10, None), (b"0123456789", 10, 0), (b"0123456789", 0, 10),
    (b"0123456789", 0, 0), (b"0123456789", -1, None), (b"0123456789", 11, None),
    (b"0123456789", 3, -1), (b"0123456789", 3, 8), (b"0123456789", 0, 11),
    (bytearray(b"abcdefgh"), 2, 3), (memoryview(b"abcdefgh")[2:], 1, 2),
    (array.array("i", range(8)), 4, 8), (array.array("i", range(8)), 4, None),
    (array.array("i", range(8)), 33, None), (array.array("i", range(8)), 0, 33),
    (array.array("d", range(4)), 8, 16),
    (memoryview(array.array("q", range(12))).cast("B").cast("q", (3, 4)), 8, 40),
    (bytes(range(256)) * 512, 100, 100_000),  # a payload above the copy threshold
]


@pytest.mark.parametrize("buf,offset,size", SEND_BYTES_CASES,
                         ids=[f"{type(c[0]).__name__}-{c[1]}-{c[2]}" for c in SEND_BYTES_CASES])
def test_send_bytes_offset_size_is_identical_to_stdlib(buf, offset, size):
    ours = _send_bytes_outcome(Pipe(), buf, offset, size)
    std = _send_bytes_outcome(multiprocessing.Pipe(), buf, offset, size)
    assert ours == std
    if ours[0] == "sent":
        raw = memoryview(buf).cast("B") if memoryview(buf).format != "B" else memoryview(buf)
        stop = None if size is None else offset + size
        assert ours[1] == bytes(raw)[offset:stop]


def test_recv_bytes_maxlength():
    a, b = Pipe()
    with a, b:
        a.send_bytes(b"x" * 100)
        assert rx_bytes(b, 100) == b"x" * 100  # exactly maxlength is fine
        a.send_bytes(b"y" * 101)
        with pytest.raises(OSError) as info:
            rx_bytes(b, 100)
        assert isinstance(info.value, fastnet.MessageTooLarge)
        with pytest.raises(ValueError):
            a.recv_bytes(-1)


def test_recv_bytes_maxlength_large_frame_is_refused_before_reading_it():
    a, b = Pipe()
    with a, b, ThreadPoolExecutor(1) as ex:
        fut = ex.submit(a.send_bytes, bytes(4 << 20))
        with pytest.raises(fastnet.MessageTooLarge):
            rx_bytes(b, 1 << 20)
        b.close()
        with pytest.raises(OSError):  # the reader went away: EPIPE/ECONNRESET
            fut.result(T)


def test_recv_bytes_into_with_offset():
    a, b = Pipe()
    with a, b:
        buf = bytearray(b"." * 32)
        a.send_bytes(b"hello")
        assert b.poll(T)
        assert b.recv_bytes_into(buf, 5) == 5
        assert buf == b"....." + b"hello" + b"." * 22
        # offsets count bytes, whatever the item size (as in the stdlib)
        arr = array.array("i", [0] * 8)
        a.send_bytes(struct.pack("=3i", 7, 8, 9))
        assert b.poll(T)
        assert b.recv_bytes_into(arr, 8) == 12
        assert arr.tolist() == [0, 0, 7, 8, 9, 0, 0, 0]
        # a message that exactly fills the rest of the buffer
        a.send_bytes(b"0123456789")
        assert b.poll(T)
        assert b.recv_bytes_into(buf, 22) == 10
        assert buf[22:] == b"0123456789"
        # an empty message at the very end
        a.send_bytes(b"")
        assert b.poll(T)
        assert b.recv_bytes_into(buf, 32) == 0


def test_recv_bytes_into_offset_errors_match_stdlib():
    for offset in (-1, 9):
        results = []
        for a, b in (Pipe(), multiprocessing.Pipe()):
            with a, b:
                a.send_bytes(b"abc")
                with pytest.raises(ValueError) as info:
                    b.recv_bytes_into(bytearray(8), offset)
                results.append(str(info.value))
                # nothing was consumed
                assert b.recv_bytes() == b"abc"
        assert results[0] == results[1]


def test_recv_bytes_into_large_message_with_offset_and_prebuffered_part():
    a, b = Pipe()
    big = bytes(range(256)) * 4096  # 1 MiB
    with a, b, ThreadPoolExecutor(1) as ex:
        # a small message and the start of the big one arrive in the same read
        fut = ex.submit(a.send_many, [b"small", big])
        assert rx_bytes(b) == b"small"
        buf = bytearray(len(big) + 100)
        assert b.recv_bytes_into(buf, 100) == len(big)
        fut.result(T)
        assert buf[:100] == bytes(100) and buf[100:] == big


@pytest.mark.parametrize("size", [20, 200_000])
def test_buffer_too_short_carries_the_message_and_connection_stays_usable(size):
    a, b = Pipe()
    msg = bytes(range(256)) * (size // 256) + b"!" * (size % 256)
    with a, b, ThreadPoolExecutor(1) as ex:
        fut = ex.submit(a.send_many, [msg, b"next"])
        assert b.poll(T)
        with pytest.raises(fastnet.BufferTooShort) as info:
            b.recv_bytes_into(bytearray(size - 1))
        assert isinstance(info.value, multiprocessing.BufferTooShort)
        assert info.value.args[0] == msg
        # offset makes a buffer too short as well
        fut.result(T)
        a.send_bytes(msg)
        with pytest.raises(fastnet.BufferTooShort) as info:
            b.recv_bytes_into(bytearray(8), 5)
        assert info.value.args[0] == b"next"
        assert b.poll(T)
        buf = bytearray(size + 10)
        assert b.recv_bytes_into(buf, 10) == size
        assert buf[10:] == msg


# -- batched sending --------------------------------------------------------------------


def test_send_many_recv_many_order_and_content():
    a, b = Pipe()
    sizes = [(i * 37) % 300 for i in range(20_000)]
    msgs = [(i.to_bytes(4, "big") * 80)[:n] or b"" for i, n in enumerate(sizes)]
    # frames above the copy threshold, enough of them for more than 512 iovecs in one call
    msgs += [i.to_bytes(4, "big") * 16_385 for i in range(300)]
    msgs += [b"", b"tail"]
    with a, b, ThreadPoolExecutor(1) as ex:
        def sender():
            for k in range(0, 20_000, 1000):
                a.send_many(msgs[k:k + 1000])
            a.send_many(msgs[20_000:])
        fut = ex.submit(sender)
        got = []
        batches = 0
        while len(got) < len(msgs):
            got.extend(b.recv_many(timeout=T))
            batches += 1
        fut.result(T)
        assert len(got) == len(msgs)
        assert got == msgs
        assert batches < len(msgs)
        assert b.poll(0) is False


def test_send_many_accepts_any_buffers():
    a, b = Pipe()
    bufs = [b"bytes", bytearray(b"bytearray"), memoryview(b"xxmemoryview")[2:],
            array.array("H", [1, 2, 3]), b"", bytes(70_000)]
    with a, b:
        a.send_many(bufs)
        a.send_many([])  # nothing at all
        got = []
        while len(got) < len(bufs):
            got.extend(b.recv_many(timeout=T))
        assert got == [bytes(memoryview(x).cast("B")) for x in bufs]


def test_recv_many_returns_everything_buffered_in_one_call():
    a, b = Pipe()
    with a, b:
        a.send_many([b"a", b"b", b"c"])
        assert b.poll(T)
        assert b.recv_many() == [b"a", b"b", b"c"]


def test_recv_many_timeout_then_still_usable():
    a, b = Pipe()
    with a, b:
        with pytest.raises(fastnet.TimeoutError):
            b.recv_many(timeout=0.05)
        a.send_bytes(b"later")
        assert b.recv_many(timeout=T) == [b"later"]


# -- timeouts ----------------------------------------------------------------------------


def _full_backlog_tcp():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    held = socket.create_connection(srv.getsockname(), timeout=T)
    return srv, [held]


def _full_backlog_unix(path):
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(0)
    held = []
    while True:
        s = socket.socket(socket.AF_UNIX)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            break
        held.append(s)
        assert len(held) < 100
    return srv, held


@pytest.mark.parametrize("family", ["tcp", "unix"])
@pytest.mark.parametrize("authkey", [None, KEY])
def test_client_timeout_on_a_listener_that_never_accepts(family, authkey, tmp_path, pool):
    if family == "tcp":
        srv, held = _full_backlog_tcp()
    else:
        srv, held = _full_backlog_unix(str(tmp_path / "full.sock"))
    try:
        fut = pool.submit(Client, srv.getsockname(), authkey=authkey, timeout=0.3)
        with pytest.raises(fastnet.TimeoutError):
            fut.result(T)
    finally:
        for s in held:
            s.close()
        srv.close()


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_client_timeout_on_a_listener_that_accepts_but_never_challenges(family, tmp_path, pool):
    if family == "tcp":
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
    else:
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(str(tmp_path / "silent.sock"))
    srv.listen(4)
    with srv:
        fut = pool.submit(Client, srv.getsockname(), authkey=KEY, timeout=0.3)
        srv.settimeout(T)
        peer, _ = srv.accept()
        with peer:
            with pytest.raises(fastnet.TimeoutError) as info:
                fut.result(T)
            assert isinstance(info.value, TimeoutError)
            # the client closed its socket: the silent server sees EOF
            peer.settimeout(T)
            assert peer.recv(100) == b""


def test_client_timeout_when_welcome_never_comes(pool):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    with srv:
        fut = pool.submit(Client, srv.getsockname(), authkey=KEY, timeout=0.5)
        srv.settimeout(T)
        peer, _ = srv.accept()
        with peer:
            raw = fastnet.Connection(peer.dup())
            with raw:
                raw.send_bytes(b"#CHALLENGE#{sha256}" + os.urandom(40))
                assert raw.poll(T)
                assert raw.recv_bytes().startswith(b"{sha256}")
                # and now nothing: no #WELCOME#
                with pytest.raises(fastnet.TimeoutError):
                    fut.result(T)
                # the client may have pipelined its own challenge; then it closed
                with pytest.raises(EOFError):
                    while True:
                        assert rx_bytes(raw).startswith(b"#CHALLENGE#")


def test_listener_handshake_timeout_then_keeps_accepting(pool):
    with Listener(("127.0.0.1", 0), authkey=KEY, handshake_timeout=1.0) as l:
        silent = socket.create_connection(l.address, timeout=T)
        with silent:
            with pytest.raises(fastnet.TimeoutError):
                accept(l)
            # the listener sent its challenge, then closed the silent socket
            data = b""
            while True:
                chunk = silent.recv(4096)
                if not chunk:
                    break
                data += chunk
            assert data[4:].startswith(b"#CHALLENGE#")
            assert len(data) == 4 + struct.unpack("!i", data[:4])[0]
        c, s = connect_pair(l, pool, authkey=KEY)
        with c, s:
            roundtrip(c, s)


# -- real child processes --------------------------------------------------------------

CHILD_SERVER = textwrap.dedent("""
    import ast, sys, fastnet
    address = ast.literal_eval(sys.argv[1])
    with fastnet.Listener(address, authkey=b"child-key") as l:
        print(repr(l.address), flush=True)
        with l.accept() as c:
            while True:
                try:
                    obj = c.recv()
                except EOFError:
                    break
                c.send(("echo", obj))
                c.send_bytes(repr(obj).encode())
    print("done", fastnet.backend, flush=True)
""")


@pytest.mark.parametrize("address", [("127.0.0.1", 0), "abstract"])
def test_listener_in_a_child_process(address):
    if address == "abstract":
        address = abstract_name()
    proc = subprocess.Popen([sys.executable, "-c", CHILD_SERVER, repr(address)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    try:
        import ast
        child_address = ast.literal_eval(read_line(proc))
        with Client(child_address, authkey=b"child-key", timeout=T) as c:
            for obj in [1, "two", {"three": [3.0]}, bytes(200_000)]:
                c.send(obj)
                assert rx(c) == ("echo", obj)
                assert rx_bytes(c) == repr(obj).encode()
        assert read_line(proc) == f"done {fastnet.backend}\n"
        assert proc.wait(T) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(T)
        proc.stdout.close()
        proc.stderr.close()


def test_client_in_a_spawned_child_process(tmp_path):
    """A child started by multiprocessing('spawn') connects with fastnet.Client."""
    ctx = multiprocessing.get_context("spawn")
    with Listener(str(tmp_path / "spawn.sock"), authkey=KEY) as l:
        proc = ctx.Process(target=_child_client, args=(l.address, KEY), daemon=True)
        proc.start()
        try:
            with accept(l) as s:
                assert rx(s) == ("hello from", fastnet.backend)
                s.send(list(range(1000)))
                assert rx_bytes(s) == b"ok"
            proc.join(T)
            assert proc.exitcode == 0
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join(T)


def _child_client(address, key):
    with Client(address, authkey=key, timeout=10) as c:
        c.send(("hello from", fastnet.backend))
        assert c.poll(10)
        assert c.recv() == list(range(1000))
        c.send_bytes(b"ok")


def test_nodelay_false_leaves_nagle_on_and_messages_flow():
    with fastnet.Listener(("127.0.0.1", 0), nodelay=False) as listener:
        client = fastnet.Client(listener.address, nodelay=False, timeout=T)
        server = listener.accept()
        with client, server:
            assert nodelay(client) == 0 and nodelay(server) == 0
            for i in range(50):
                client.send_bytes(b"m%d" % i)
            assert [server.recv_bytes() for _ in range(50)] == [b"m%d" % i for i in range(50)]
        default = fastnet.Client(listener.address, timeout=T)
        with default, listener.accept() as peer:
            # each end sets its own option: the default client, the nodelay=False listener
            assert nodelay(default) != 0 and nodelay(peer) == 0
