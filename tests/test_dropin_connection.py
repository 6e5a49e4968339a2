"""Connections behave as multiprocessing.connection's where programs rely on it.

A receive takes from the socket no more than the message it returns, so
select() on fileno() stays truthful, an end shared by several processes loses
nothing, and a descriptor sent after a message is left for recv_handle.
Connections pickle (spawn and forkserver children, over a connection);
poll() and wait() take negative timeouts; Windows pipe addresses, a missing
descriptor and socket files left at exit go as in the stdlib. Real
processes and the real stdlib peer throughout; the Connection tests run on
whichever kernel set FASTNET_PURE selects, the Channel tests on both.
"""
import faulthandler
import multiprocessing
import multiprocessing.connection as mpc
import os
import pickle
import select
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from multiprocessing import reduction

import pytest

import fastnet
import fastnet._c.framing as cframing
import fastnet._pure.framing as pframing
from fastnet import Client, Listener, Pipe, wait
from fastnet.errors import NoDescriptorError, ProtocolError, TimeoutError as FastnetTimeout

T = 10.0  # bound on anything that should happen "at once"
KEY = b"dropin-key"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(fastnet.__file__)))
IMPLS = {"c": cframing, "pure": pframing}


@pytest.fixture(autouse=True)
def watchdog():
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def readable(fd):
    return select.select([fd], [], [], 0)[0] != []


@pytest.fixture(params=["unix", "tcp"])
def pair(request, tmp_path):
    """A connected (server end, client end) over AF_UNIX or TCP, default read policy."""
    addr = str(tmp_path / "p.sock") if request.param == "unix" else ("127.0.0.1", 0)
    with Listener(addr) as lst:
        c = Client(lst.address, timeout=T)
        s = lst.accept()
    yield s, c
    s.close()
    c.close()


# -- exact reads: select stays truthful ------------------------------------


def test_select_sees_the_second_message_after_the_first_is_received(pair):
    s, c = pair
    assert s.readahead is False and c.readahead is False
    c.send("one")
    c.send("two")
    assert s.poll(T)
    assert s.recv() == "one"
    # the stdlib leaves "two" in the socket; so must we
    assert readable(s.fileno())
    assert s.recv() == "two"
    assert not readable(s.fileno())
    assert s.poll(0) is False


def test_the_same_under_the_stdlib_peer(tmp_path):
    """A stdlib Client sends two messages; a fastnet Listener's connection sees each with select()."""
    with Listener(str(tmp_path / "s.sock"), authkey=KEY) as lst:
        got = {}
        t = threading.Thread(target=lambda: got.setdefault("c", mpc.Client(lst.address, authkey=KEY)))
        t.start()
        s = lst.accept()
        t.join(T)
        c = got["c"]
        with s, c:
            c.send_bytes(b"a")
            c.send_bytes(b"b")
            assert s.poll(T) and s.recv_bytes() == b"a"
            assert readable(s.fileno())
            assert s.recv_bytes() == b"b"
            assert not readable(s.fileno())


def test_readahead_is_an_opt_in_that_reads_ahead(tmp_path):
    a, b = Pipe(readahead=True)
    with a, b:
        assert a.readahead and b.readahead
        b.send_many([b"1", b"2", b"3"])
        assert a.poll(T) and a.recv_bytes() == b"1"
        # the documented caveat: the rest sits in fastnet's buffer, not the socket
        assert not readable(a.fileno())
        assert a.poll(0) and wait([a], 0) == [a]
        assert a.recv_bytes() == b"2" and a.recv_bytes() == b"3"
    with Listener(str(tmp_path / "r.sock"), readahead=True) as lst:
        c = Client(lst.address, readahead=True, timeout=T)
        s = lst.accept()
        with s, c:
            assert s.readahead and c.readahead
            c.send_many([b"x", b"y"])
            assert s.poll(T) and s.recv_bytes() == b"x"
            assert not readable(s.fileno()) and s.recv_bytes() == b"y"


def test_recv_many_takes_whole_messages_and_leaves_a_partial_one(pair):
    s, c = pair
    raw = socket.socket(fileno=os.dup(c.fileno()))
    try:
        c.send_many([b"m1", b"m2", b"m3"])
        whole = b"\x00\x00\x00\x08partial!"
        raw.sendall(whole[:7])   # header and 3 bytes of a fourth message
        time.sleep(0.05)
        got = []
        while len(got) < 3:
            got += s.recv_many(timeout=T)
        assert got == [b"m1", b"m2", b"m3"]
        # the partial message is still in the socket, not in fastnet's buffer
        assert readable(s.fileno())
        raw.sendall(whole[7:])
        assert s.recv_many(timeout=T) == [b"partial!"]
        assert not readable(s.fileno())
    finally:
        raw.close()


def test_recv_many_on_a_large_message_and_a_timeout(pair):
    s, c = pair
    big = os.urandom(300000)
    with pytest.raises(fastnet.TimeoutError):
        s.recv_many(timeout=0.05)
    t = threading.Thread(target=c.send_many, args=([big, b"after"],))
    t.start()
    got = []
    while len(got) < 2:
        got += s.recv_many(timeout=T)
    t.join(T)
    assert got == [big, b"after"]


def test_recv_bytes_into_and_arrays_leave_the_next_message_in_the_socket(pair):
    s, c = pair
    c.send_bytes(b"x" * 100)
    c.send_bytes(b"next")
    buf = bytearray(200)
    assert s.poll(T) and s.recv_bytes_into(buf) == 100
    assert readable(s.fileno())
    assert s.recv_bytes() == b"next"
    big = os.urandom(200000)
    t = threading.Thread(target=lambda: (c.send_bytes(big), c.send_bytes(b"tail")))
    t.start()
    out = bytearray(len(big))
    assert s.recv_bytes_into(out) == len(big) and out == big
    t.join(T)
    assert s.poll(T) and readable(s.fileno())
    assert s.recv_bytes() == b"tail"


# -- a pipe end shared by several processes ---------------------------------


def _take_one(r, results):
    results.send(r.recv())


def test_two_processes_sharing_one_end_each_receive_one_message():
    ctx = multiprocessing.get_context("fork")
    r, w = Pipe(duplex=False)
    res_r, res_w = Pipe(duplex=False)
    with r, w, res_r, res_w:
        w.send("task 1")
        w.send("task 2")
        procs = [ctx.Process(target=_take_one, args=(r, res_w), daemon=True) for _ in range(2)]
        try:
            for p in procs:
                p.start()
                p.join(T)   # one after the other: the first must leave the second message
            got = []
            for _ in range(2):
                assert res_r.poll(T), "a worker got nothing: the other swallowed its message"
                got.append(res_r.recv())
            assert sorted(got) == ["task 1", "task 2"]
            assert [p.exitcode for p in procs] == [0, 0]
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(T)


def _pool_worker(tasks, lock, results, result_lock, per_worker):
    # pebble's shape: workers share the task end (reads under a lock) and
    # the result end (writes under a lock), and exit after a few tasks
    for _ in range(per_worker):
        with lock:
            task = tasks.recv()
        if task is None:
            return
        with result_lock:
            results.send(task * task)


def test_a_recycling_worker_pool_sharing_pipe_ends_loses_no_task():
    ctx = multiprocessing.get_context("fork")
    tasks_r, tasks_w = Pipe(duplex=False)
    res_r, res_w = Pipe(duplex=False)
    lock, result_lock = ctx.Lock(), ctx.Lock()
    n, per_worker = 40, 3
    with tasks_r, tasks_w, res_r, res_w:
        for i in range(n):
            tasks_w.send(i)
        workers = []
        got = []
        deadline = time.monotonic() + 60
        try:
            while len(got) < n:
                assert time.monotonic() < deadline, f"stalled with {len(got)} of {n} results"
                workers = [p for p in workers if p.is_alive() or p.join() or False]
                while len(workers) < 2:
                    p = ctx.Process(target=_pool_worker, daemon=True,
                                    args=(tasks_r, lock, res_w, result_lock, per_worker))
                    p.start()
                    workers.append(p)
                # the pool's result thread waits with select() on the result end's fileno()
                if select.select([res_r.fileno()], [], [], 1.0)[0]:
                    got.append(res_r.recv())
            for _ in workers:
                tasks_w.send(None)
            for p in workers:
                p.join(T)
            assert sorted(got) == [i * i for i in range(n)]
        finally:
            for p in workers:
                if p.is_alive():
                    p.kill()
                    p.join(T)


# -- descriptors: send_handle after a message -------------------------------


def _stdlib_sender(address, path, sent):
    c = mpc.Client(address, authkey=KEY)
    c.send("here comes a descriptor")
    fd = os.open(path, os.O_RDONLY)
    reduction.send_handle(c, fd, os.getppid())
    os.close(fd)
    sent.set()
    c.recv()     # wait until the parent has it
    c.close()


def test_stdlib_send_handle_after_a_message_reaches_recv_handle(tmp_path):
    data = tmp_path / "data.txt"
    data.write_bytes(b"through the descriptor")
    ctx = multiprocessing.get_context("fork")
    with Listener(str(tmp_path / "h.sock"), authkey=KEY) as lst:
        sent = ctx.Event()
        p = ctx.Process(target=_stdlib_sender, args=(lst.address, str(data), sent))
        p.start()
        try:
            with lst.accept() as conn:
                assert sent.wait(T)   # the message and the descriptor have both arrived
                assert conn.poll(T)
                assert conn.recv() == "here comes a descriptor"
                assert select.select([conn], [], [], T)[0], "recv() swallowed the descriptor"
                fd = reduction.recv_handle(conn)   # recv() must not have swallowed it
                try:
                    assert os.pread(fd, 100, 0) == b"through the descriptor"
                finally:
                    os.close(fd)
                conn.send("thanks")
        finally:
            p.join(T)
    assert p.exitcode == 0


def test_fastnet_recv_fd_after_a_message_sent_by_send_handle():
    a, b = Pipe()
    with a, b:
        r, w = os.pipe()
        try:
            a.send_bytes(b"first")
            reduction.send_handle(a, r, os.getpid())
            assert b.recv_bytes() == b"first"
            fd = fastnet.recv_fd(b.fileno())
            os.write(w, b"!")
            assert os.read(fd, 1) == b"!"
            os.close(fd)
        finally:
            os.close(r)
            os.close(w)


def test_recv_fd_without_a_descriptor_is_a_runtime_error_as_recv_handle():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"\x01")
        with pytest.raises(RuntimeError):   # the stdlib's own error here
            reduction.recv_handle(b)
        a.sendall(b"\x01")
        with pytest.raises(NoDescriptorError) as info:
            fastnet.recv_fd(b)
        assert isinstance(info.value, RuntimeError) and isinstance(info.value, ProtocolError)
        assert fastnet.NoDescriptorError is NoDescriptorError


# -- pickling ----------------------------------------------------------------


def _child_sends(w):
    w.send(("from child", os.getpid()))
    w.close()


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_connection_is_a_process_argument_under(method):
    ctx = multiprocessing.get_context(method)
    r, w = Pipe(duplex=False, max_message_size=12345)
    with r, w:
        p = ctx.Process(target=_child_sends, args=(w,))
        p.start()
        try:
            assert r.poll(60)
            msg, pid = r.recv()
            assert msg == "from child" and pid == p.pid
        finally:
            p.join(60)
        assert p.exitcode == 0


def _child_echoes_through_received_connection(chan):
    conn = chan.recv()   # a Connection sent over a connection
    assert isinstance(conn, fastnet.Connection)
    conn.send((conn.readable, conn.writable, conn.max_message_size, conn.readahead, conn.recv()))
    conn.close()


def test_a_connection_sent_over_a_connection():
    ctx = multiprocessing.get_context("spawn")
    chan_a, chan_b = Pipe()
    x, y = Pipe(max_message_size=999)
    with chan_a, chan_b, x, y:
        p = ctx.Process(target=_child_echoes_through_received_connection, args=(chan_b,))
        p.start()
        try:
            chan_a.send(y)
            x.send("hello")
            assert x.poll(60)
            assert x.recv() == (True, True, 999, False, "hello")
        finally:
            p.join(60)
        assert p.exitcode == 0


def test_a_duplicate_sees_what_was_not_yet_received():
    a, b = Pipe()
    with a, b:
        a.send(1)
        a.send(2)
        assert b.recv() == 1
        dup = pickle.loads(reduction.ForkingPickler.dumps(b))
        with dup:
            assert dup.poll(T) and dup.recv() == 2


def test_pickling_refuses_read_ahead_bytes():
    a, b = Pipe(readahead=True)
    with a, b:
        a.send_many([pickle.dumps(1), pickle.dumps(2)])
        assert b.recv() == 1
        with pytest.raises(ValueError, match="would lose"):
            reduction.ForkingPickler.dumps(b)
        assert b.recv() == 2
        dup = pickle.loads(reduction.ForkingPickler.dumps(b))   # nothing buffered now
        with dup:
            assert dup.readahead is True
            a.send(3)
            assert dup.poll(T) and dup.recv() == 3
    with pytest.raises(OSError):
        reduction.ForkingPickler.dumps(a)   # closed


# -- timeouts, addresses, socket files ---------------------------------------


def test_negative_timeouts_return_at_once_as_in_the_stdlib():
    a, b = Pipe()
    sa, sb = mpc.Pipe()
    with a, b, sa, sb:
        assert sa.poll(-1) is False
        assert a.poll(-1) is False and a.poll(-0.5) is False
        assert wait([a], -1) == mpc.wait([sa], -1) == []
        b.send(1)
        sb.send(1)
        assert a.poll(T) and sa.poll(T)
        assert a.poll(-1) is True and sa.poll(-1) is True
        assert wait([a], -1) == [a] and mpc.wait([sa], -1) == [sa]


@pytest.mark.parametrize("address", [r"\\.\test", r"\\.\pipe\fastnet"])
def test_a_windows_pipe_address_is_refused_as_by_the_stdlib(address, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as std:
        mpc.Listener(address)
    with pytest.raises(ValueError) as ours:
        Listener(address)
    assert str(ours.value) == str(std.value) == "Family AF_PIPE is not recognized."
    with pytest.raises(ValueError, match="AF_PIPE"):
        Client(address)
    with pytest.raises(ValueError, match="AF_PIPE"):
        Listener(family="AF_PIPE")
    assert os.listdir(tmp_path) == []   # no file named after the pipe
    assert fastnet.address.address_type(address) == mpc.address_type(address) == "AF_PIPE"


@pytest.mark.parametrize("address", [("localhost", 0), "/tmp/x.sock", "\0abstract", "relative.sock"])
def test_address_type_matches_the_stdlib(address):
    assert fastnet.address.address_type(address) == mpc.address_type(address)


_LEAVE_BEHIND = """
import sys
mod = sys.argv[1]
if mod == "fastnet":
    from fastnet import Listener
else:
    from multiprocessing.connection import Listener
auto = Listener()                    # an arbitrary address
given = Listener(sys.argv[2])        # an explicit path
print(auto.address, flush=True)
import os
if os.fork() == 0:
    os._exit(0)                      # a forked child leaves them alone
os.wait()
print(int(os.path.exists(auto.address) and os.path.exists(given.address)), flush=True)
"""


@pytest.mark.parametrize("mod", ["multiprocessing", "fastnet"])
def test_socket_files_of_a_listener_never_closed_go_at_exit(mod, tmp_path):
    given = str(tmp_path / "given.sock")
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", _LEAVE_BEHIND, mod, given], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    auto, both_after_fork = out.stdout.split()
    assert both_after_fork == "1"
    assert os.path.dirname(auto) and not os.path.exists(auto)
    assert not os.path.exists(given)


def test_close_removes_the_file_once(tmp_path):
    path = str(tmp_path / "c.sock")
    lst = Listener(path)
    assert os.path.exists(path)
    lst.close()
    assert not os.path.exists(path)
    lst.close()
    other = Listener(path)   # the path is free again
    other.close()


# -- the Channel kernel, both implementations ---------------------------------


@pytest.fixture(scope="module", params=sorted(IMPLS))
def fr(request):
    return IMPLS[request.param]


@pytest.fixture(params=["unix", "tcp"])
def socks(request):
    if request.param == "unix":
        a, b = socket.socketpair()
    else:
        with socket.create_server(("127.0.0.1", 0)) as srv:
            a = socket.create_connection(srv.getsockname())
            b, _ = srv.accept()
    yield a, b
    a.close()
    b.close()


def test_channel_defaults_to_exact_reads(fr, socks):
    a, b = fr.Channel(socks[0]), fr.Channel(socks[1])
    assert b.readahead is False and b.io is None
    a.send_frames([b"first", b"y" * 70000, b"third", b"", b"fifth"])
    assert b.recv_frame(timeout=T) == b"first"
    assert b.buffered() == 0 and not b.has_frame() and readable(socks[1])
    b.discard_frame()
    assert b.buffered() == 0 and readable(socks[1])
    buf = bytearray(10)
    assert b.recv_frame_into(buf) == 5 and buf[:5] == b"third"
    assert b.buffered() == 0 and readable(socks[1])
    assert b.recv_frame() == b""
    assert b.recv_frames(timeout=T) == [b"fifth"]
    assert not readable(socks[1])


def test_channel_timeout_mid_frame_resumes_exactly(fr, socks):
    a, b = fr.Channel(socks[0]), fr.Channel(socks[1])
    whole = b"\x00\x00\x00\x0aheader+pay"
    socks[0].sendall(whole[:6])
    with pytest.raises(FastnetTimeout):
        b.recv_frame(timeout=0.05)
    assert b.poll(0)    # what it took stays buffered
    socks[0].sendall(whole[6:] + b"\x00\x00\x00\x04next")
    assert b.recv_frame(timeout=T) == b"header+pay"
    assert b.buffered() == 0 and readable(socks[1])
    assert b.recv_frame(timeout=T) == b"next"


def test_channel_large_header_form_and_max_size_in_exact_reads(fr, socks):
    b = fr.Channel(socks[1], max_size=10)
    socks[0].sendall(b"\xff\xff\xff\xff" + (5).to_bytes(8, "big") + b"hello" + b"\x00\x00\x00\x0b" + b"z" * 11)
    assert b.recv_frame(timeout=T) == b"hello"
    assert b.buffered() == 0 and readable(socks[1])
    with pytest.raises(fastnet.MessageTooLarge):
        b.recv_frames(timeout=T)
    with pytest.raises(fastnet.MessageTooLarge):
        b.recv_frame()


def test_channel_descriptors_ride_with_their_frame_in_exact_reads(fr):
    s0, s1 = socket.socketpair()
    with s0, s1:
        a, b = fr.Channel(s0), fr.Channel(s1)
        r, w = os.pipe()
        try:
            a.send_frame(b"plain")
            a.send_frame_fds(b"with fd", [r])
            a.send_frame(b"after")
            assert b.recv_frame_fds() == (b"plain", [])
            assert b.buffered() == 0 and readable(s1)
            data, fds = b.recv_frame_fds()
            assert data == b"with fd" and len(fds) == 1
            os.write(w, b"?")
            assert os.read(fds[0], 1) == b"?"
            os.close(fds[0])
            assert b.recv_frames(timeout=T) == [b"after"]
        finally:
            os.close(r)
            os.close(w)


def test_channel_io_hook_over_a_real_tls_pair(fr, tmp_path):
    pytest.importorskip("cryptography")
    sys.path.insert(0, os.path.dirname(__file__))
    from tlsutil import client_ctx, make_pki, server_ctx
    pki = make_pki(tmp_path)
    sctx, cctx = server_ctx(pki), client_ctx(pki)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        raw_c = socket.create_connection(srv.getsockname())
        raw_s, _ = srv.accept()
    done = {}
    t = threading.Thread(target=lambda: done.setdefault(
        "s", sctx.wrap_socket(raw_s, server_side=True)))
    t.start()
    tc = cctx.wrap_socket(raw_c, server_hostname="localhost")
    t.join(T)
    ts = done["s"]
    with tc, ts:
        # readiness is waited on the socket's descriptor; every byte goes through the io
        a = fr.Channel(tc, io=tc)
        b = fr.Channel(ts, io=ts, readahead=False)   # readahead has no effect here
        assert a.io is tc
        with pytest.raises(TypeError):
            fr.Channel(tc, io=object())
        assert b.poll(0) is False
        with pytest.raises(FastnetTimeout):
            b.recv_frame(timeout=0.05)
        big = os.urandom(300000)
        sender = threading.Thread(target=lambda: (
            a.send_frame(b"small"), a.send_frames([b"m1", b"m2", big, b"m3"]),
            a.send_frame(big), a.send_frame(b"drop me"), a.send_frame(b"last")))
        sender.start()
        assert b.recv_frame(timeout=T) == b"small"
        got = []
        while len(got) < 4:
            got += b.recv_frames(timeout=T)
        assert got == [b"m1", b"m2", big, b"m3"]
        out = bytearray(len(big))
        assert b.recv_frame_into(out) == len(big) and out == big
        b.discard_frame()
        sender.join(T)
        # "last" is decrypted inside the SSLSocket or still on the wire: poll and
        # has_frame count what the io holds
        assert b.poll(T)
        deadline = time.monotonic() + T
        while not b.has_frame():
            assert time.monotonic() < deadline
            b.poll(0.1)
        assert b.buffered() > 0
        assert b.recv_frame() == b"last"
        b.send_frame(b"reply")
        assert a.recv_frame(timeout=T) == b"reply"
        # an SSLSocket passed as the socket alone is its own io
        c = fr.Channel(tc)
        assert c.io is tc and c.readahead is False
        c.send_frame(b"via sock")
        assert b.recv_frame(timeout=T) == b"via sock"


def test_a_duplicate_keeps_the_opt_ins_and_gets_the_queued_messages_first():
    a, b = Pipe(coalesce=4096, spin=20, shm=True)
    with a, b:
        a.send("queued")            # held back by coalescing
        dup = pickle.loads(reduction.ForkingPickler.dumps(a))
        with dup:
            assert (dup.coalesce, dup.spin, dup.shm) == (4096, 20.0, True)
            dup.send("from the copy")
            dup.flush()
            assert b.recv() == "queued"          # flushed before the copy existed
            assert b.recv() == "from the copy"
