"""Faults, nothing lost: peers killed mid-frame, mid-handshake, mid-array, mid-fd-pass; a
prefork worker killed under load; the RPC server restarted under its clients; peers that
vanish without a FIN.

Two workloads run through the faults that hit a server (tools/soak.py has them):

* a sequence-numbered stream: each connection sends 0, 1, 2, ...; every reply must
  carry the number sent, the server's "in order" flag and the payload; every message
  whose send returned is answered, or that connection ended in an error;
* RPC calls with unique numbers: the server appends each number to a log file before
  returning ``3n + 1``; no number may appear twice, every call that returned must appear
  once, and every call ends in its correct result, ConnectionLost or TimeoutError.

Servers run in processes of their own (``tools/soak.py serve``) so that their
descriptors can be counted in /proc and a fault can kill them. Descriptors are counted
before and after every fault, in this process and in the server's. Nothing asserts on
timing except the documented bound of the idle sweep (idle_timeout plus one sweep of
idle_timeout/2), with a stated slack for scheduling; measured times are reported as
figures (``FIGURE`` lines, and $FASTNET_FIGURES if set).
"""
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import fastnet
from fastnet.errors import AuthenticationError, ConnectionLost, TruncatedFrameError

import fastnet_soak as soak   # tools/soak.py, loaded by conftest: server hosts, checked workloads, figures

np = pytest.importorskip("numpy")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WAIT = 30.0           # generous deadline for what should take milliseconds
KEY = "faults-key"
# Errors a stream client may see when its server side goes away: clean ends, not data.
CLEAN_END = ("EOFError", "ConnectionResetError", "BrokenPipeError", "ConnectionAbortedError")


# -- helpers ----------------------------------------------------------------------------


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


class Child:
    """A Python child process running ``code``; it speaks lines on stdout."""

    def __init__(self, code):
        self.proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env(), start_new_session=True)
        self.buf = b""

    def line(self, timeout=WAIT):
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"no line from the child in {timeout} s: {self.buf!r}")
            chunk = os.read(fd, 4096)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
                raise AssertionError(f"child ended: {self.buf!r} {err[-2000:]}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def kill(self, sig=signal.SIGKILL):
        os.kill(self.proc.pid, sig)
        if sig == signal.SIGKILL:
            self.proc.wait(WAIT)

    def close(self):
        if self.proc.stdout.closed:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(WAIT)
        self.proc.stdout.close()
        self.proc.stderr.close()


_children = []


@pytest.fixture
def child():
    made = []

    def make(code):
        c = Child(code)
        made.append(c)
        _children.append(c)
        return c

    yield make
    for c in made:
        c.close()


def fds():
    return soak.fd_count()


def assert_no_leak(before, what="this process"):
    # the children's own pipes are not the library's: close them first
    while _children:
        _children.pop().close()
    after = fds()
    assert after == before, f"{what}: {before} descriptors before the fault, {after} after"


def settle(host, base, timeout=WAIT):
    """Wait until the host has no connection open and its descriptors are back to ``base``."""
    rep = host.wait_stats(lambda r: r["stats"]["connections_open"] == 0 and r["fds"] == base["fds"], timeout)
    assert rep["stats"]["connections_open"] == 0, rep
    assert rep["fds"] == base["fds"], (f"server leaked descriptors: {base['fds']} -> {rep['fds']}",
                                       host.fdlist())
    return rep


def check_workloads(stream=None, rpc=None, log=None, stream_errors_allowed=False):
    if stream is not None:
        assert stream.check() == []
        assert stream.messages > 0
        if not stream_errors_allowed:
            assert [r.as_dict() for r in stream.records if r.error] == []
    if rpc is not None:
        assert rpc.check(log) == []
        assert rpc.counts["ok"] > 0


# -- killed mid-frame -------------------------------------------------------------------

SEND_THEN_PARTIAL = """
    import socket, struct, sys, time, fastnet
    address = {address!r}
    c = fastnet.Client(tuple(address) if isinstance(address, list) else address)
    for n in range({count}):
        c.send_bytes(struct.pack("!Q", n) + b"payload %d" % n)
    s = socket.socket(fileno=c.fileno())
    s.sendall(struct.pack("!i", {claimed}) + b"x" * {sent})   # a frame cut short
    print("SENT", flush=True)
    time.sleep(600)
"""


def test_killed_mid_frame_receiver_gets_every_message_then_truncated_frame_error(child):
    before = fds()
    with fastnet.Listener(("127.0.0.1", 0)) as listener:
        claimed, sent, count = 1 << 20, 1000, 500
        c = child(SEND_THEN_PARTIAL.format(address=list(listener.address), count=count, claimed=claimed,
                                           sent=sent))
        conn = listener.accept()
        assert c.line() == "SENT"
        c.kill()
        for n in range(count):
            data = conn.recv_bytes()
            assert struct.unpack_from("!Q", data)[0] == n, "messages must arrive once each, in order"
            assert data[8:] == b"payload %d" % n
        with pytest.raises(TruncatedFrameError) as ei:
            conn.recv_bytes()
        assert ei.value.missing == claimed - sent
        assert f"{claimed - sent} bytes missing" in str(ei.value)
        assert isinstance(ei.value, EOFError)       # code that treats any end of stream as one
        # the stream is over: the connection closed itself and refuses further use
        assert conn.closed
        with pytest.raises(OSError):
            conn.recv_bytes()
    assert_no_leak(before)
    soak.record_figure("killed mid-frame (blocking Connection)", messages=count, lost=0,
                       missing=ei.value.missing, fds_leaked=fds() - before)


RPC_PARTIAL = """
    import json, socket, struct, time, msgpack, fastnet
    address = {address!r}
    c = fastnet.Client(tuple(address), authkey={key!r})
    c.send_bytes(json.dumps({{"fastnet-rpc": 1, "codec": "msgpack"}}).encode())
    assert b"error" not in c.recv_bytes()
    for i, seq in enumerate({seqs!r}):
        c.send_bytes(msgpack.packb([0, i + 1, "do", [seq], None]))
        kind, msgid, err, result = msgpack.unpackb(c.recv_bytes())
        assert err is None and result == 3 * seq + 1, (err, result)
    s = socket.socket(fileno=c.fileno())
    s.sendall(struct.pack("!i", 4096) + msgpack.packb([0, 99, "do", [{cut}], None]))
    print("SENT", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("concurrency", ["loop", "thread"])
def test_servers_keep_serving_when_a_client_dies_mid_frame(hosts, child, tmp_path, concurrency):
    log = str(tmp_path / "calls.log")
    echo = hosts({"kind": "echo", "address": ["127.0.0.1", 0], "concurrency": concurrency})
    rpc = hosts({"kind": "rpc", "address": ["127.0.0.1", 0], "log": log, "authkey": KEY})
    base_e, base_r = echo.stats(), rpc.stats()
    before = fds()
    stream = soak.StreamWorkload(echo.address, clients=4, window=4).start()
    calls = soak.RPCWorkload(rpc.address, threads=3, authkey=KEY.encode()).start()
    try:
        time.sleep(0.3)
        # a small frame cut short, and a large one (32 MiB claimed, 1 MiB sent: the
        # large-frame path that receives straight into a buffer of the frame's size)
        c1 = child(SEND_THEN_PARTIAL.format(address=list(echo.address), count=50, claimed=1 << 16, sent=100))
        c3 = child(SEND_THEN_PARTIAL.format(address=list(echo.address), count=50, claimed=32 << 20,
                                            sent=1 << 20))
        seqs = [-1000 - i for i in range(20)]
        c2 = child(RPC_PARTIAL.format(address=list(rpc.address), key=KEY.encode(), seqs=seqs, cut=-999))
        for c in (c1, c2, c3):
            assert c.line() == "SENT"
            c.kill()
        time.sleep(0.5)     # the workloads go on after the faults
    finally:
        stream.stop()
        calls.stop()
    check_workloads(stream)
    assert calls.check(log, others=seqs) == []
    # the child's calls ran once each, the one cut short never
    ran = [int(x) for x in open(log).read().split()]
    assert sorted(s for s in ran if s < 0) == sorted(seqs)
    settle(echo, base_e)
    settle(rpc, base_r)
    assert_no_leak(before)
    soak.record_figure(f"client killed mid-frame, servers ({concurrency})", stream_messages=stream.messages,
                       rpc_calls=calls.counts["ok"], lost=0, fds_leaked=0)


# -- killed mid-handshake ---------------------------------------------------------------

HALF_HANDSHAKE = """
    import socket, struct, time
    s = socket.create_connection(({host!r}, {port}))
    n = struct.unpack("!i", s.recv(4))[0]
    challenge = s.recv(n)
    s.sendall(struct.pack("!i", 40) + b"{{sha256}}0123")   # half a response
    print("SENT", flush=True)
    time.sleep(600)
"""


def test_servers_survive_a_client_killed_mid_handshake(hosts, child, tmp_path):
    log = str(tmp_path / "calls.log")
    echo = hosts({"kind": "echo", "address": ["127.0.0.1", 0], "authkey": KEY})
    rpc = hosts({"kind": "rpc", "address": ["127.0.0.1", 0], "log": log, "authkey": KEY})
    base_e, base_r = echo.stats(), rpc.stats()
    before = fds()
    stream = soak.StreamWorkload(echo.address, clients=3, authkey=KEY.encode()).start()
    calls = soak.RPCWorkload(rpc.address, threads=3, authkey=KEY.encode()).start()
    try:
        time.sleep(0.2)
        kids = [child(HALF_HANDSHAKE.format(host=h.address[0], port=h.address[1])) for h in (echo, rpc)]
        for k in kids:
            assert k.line() == "SENT"
            k.kill()
        for h in (echo, rpc):
            rep = h.wait_stats(lambda r: r["stats"]["handshake_failures"] == 1)
            assert rep["stats"]["handshake_failures"] == 1
        time.sleep(0.3)
    finally:
        stream.stop()
        calls.stop()
    check_workloads(stream, calls, log)
    settle(echo, base_e)
    settle(rpc, base_r)
    assert_no_leak(before)
    soak.record_figure("client killed mid-handshake, servers", stream_messages=stream.messages,
                       rpc_calls=calls.counts["ok"], handshake_failures=1, lost=0, fds_leaked=0)


TLS_CHILDREN = {
    # a ClientHello cut short: the first bytes of a TLS record, then nothing
    "mid-tls-handshake": """
        import socket, time
        s = socket.create_connection(({host!r}, {port}))
        s.sendall(bytes([22, 3, 1, 2, 0, 1, 0, 1, 252, 3, 3]) + b"\\x00" * 20)
        print("SENT", flush=True)
        time.sleep(600)
    """,
    # inside TLS: ten messages answered, then a frame cut short, then killed (no close_notify)
    "mid-frame-in-tls": """
        import socket, ssl, struct, time
        ctx = ssl.create_default_context(cafile={ca!r})
        s = ctx.wrap_socket(socket.create_connection(({host!r}, {port})), server_hostname="localhost")
        for n in range(10):
            body = struct.pack("!Q", n) + b"tls %d" % n
            s.sendall(struct.pack("!i", len(body)) + body)
            want = 4 + 8 + 5 + len(body) - 8
            got = b""
            while len(got) < want:
                got += s.recv(want - len(got))
            assert got[4:12] == body[:8] and got[12 + 4:12 + 5] == b"\\x01", got
        s.sendall(struct.pack("!i", 1 << 20) + b"x" * 1000)
        print("SENT", flush=True)
        time.sleep(600)
    """,
}


def test_tls_server_survives_clients_killed_mid_tls_handshake_and_mid_frame(hosts, child, tmp_path):
    pytest.importorskip("cryptography")
    from fastnet import tls
    pki = soak.make_pki(str(tmp_path))
    echo = hosts({"kind": "echo", "address": ["127.0.0.1", 0], "tls": {"cert": pki["cert"], "key": pki["key"]}})
    base = echo.stats()
    before = fds()
    ctx = tls.client_context(cafile=pki["ca"], check_hostname=False)
    stream = soak.StreamWorkload(echo.address, clients=3, window=2, ssl_context=ctx).start()
    try:
        time.sleep(0.2)
        for name, code in TLS_CHILDREN.items():
            k = child(code.format(host="127.0.0.1", port=echo.address[1], ca=pki["ca"]))
            assert k.line() == "SENT"
            k.kill()
        rep = echo.wait_stats(lambda r: r["stats"]["handshake_failures"] == 1 and
                              r["stats"]["connections_open"] == 3)
        assert rep["stats"]["handshake_failures"] == 1 and rep["stats"]["connections_open"] == 3, rep
        time.sleep(0.3)
    finally:
        stream.stop()
    check_workloads(stream)
    settle(echo, base)
    assert_no_leak(before)
    soak.record_figure("TLS server: clients killed mid-TLS-handshake and mid-frame inside TLS",
                       stream_messages=stream.messages, lost=0, handshake_failures=1, fds_leaked=0)


DYING_SERVER = """
    import socket, struct, time
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(({host!r}, {port}))
    s.listen(8)
    print("LISTENING", flush=True)
    c, _ = s.accept()
    c.sendall(struct.pack("!i", 51) + b"#CHALLENGE#{{sha256}}01234")   # half a challenge
    print("SENT", flush=True)
    time.sleep(600)
"""


SILENT_DYING_SERVER = """
    import socket, time
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(({host!r}, {port}))
    s.listen(8)
    print("LISTENING", flush=True)
    c, _ = s.accept()
    print("SENT", flush=True)       # nothing: it dies before its challenge
    time.sleep(600)
"""


@pytest.mark.parametrize("when", ["mid-challenge", "before-challenge"])
def test_client_whose_server_dies_mid_handshake_gets_a_clean_error(child, when):
    port = free_port()
    before = fds()
    k = child((DYING_SERVER if when == "mid-challenge" else SILENT_DYING_SERVER).format(host="127.0.0.1",
                                                                                         port=port))
    assert k.line() == "LISTENING"
    box = {}

    def connect():
        t0 = time.monotonic()
        try:
            fastnet.Client(("127.0.0.1", port), authkey=KEY.encode(), timeout=WAIT)
        except Exception as e:
            box["error"] = e
        box["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=connect)
    t.start()
    assert k.line() == "SENT"
    k.kill()
    t.join(WAIT)
    assert not t.is_alive(), "Client() hangs on a server that died mid-handshake"
    e = box.get("error")
    assert isinstance(e, (AuthenticationError, EOFError, ConnectionError)), repr(e)
    assert "handshake" in str(e), str(e)
    # the message says what happened to the connection
    reason = str(e).split("handshake", 1)[1].strip(" :")
    assert reason, f"the error gives no reason: {str(e)!r}"
    if when == "mid-challenge":
        assert "missing" in reason, str(e)
    assert_no_leak(before)


@pytest.mark.parametrize("phase", ["handshake", "hello"])
def test_rpc_proxy_reconnecting_to_a_server_that_dies_mid_handshake_raises_connection_lost(
        hosts, child, tmp_path, phase):
    """The RPC contract: a call returns its result or raises ConnectionLost / TimeoutError.

    The proxy's server is killed; something dies on the same port in the middle of the
    proxy's reconnection (the authkey handshake, or the RPC hello). The proxy's call must
    fail with ConnectionLost ("could not be re-opened"), not with an authentication or
    protocol error that tells the caller its key or its server is wrong.
    """
    log = str(tmp_path / "calls.log")
    rpc = hosts({"kind": "rpc", "address": ["127.0.0.1", 0], "log": log, "authkey": KEY})
    port = rpc.address[1]
    proxy = fastnet.RPCProxy(rpc.address, authkey=KEY.encode(), timeout=WAIT, connect_timeout=2.0)
    try:
        assert proxy.do(1) == 4
        rpc.kill()
        with pytest.raises(ConnectionLost):
            proxy.do(2)          # it was pending on (or sent to) the killed server
        if phase == "handshake":
            k = child(DYING_SERVER.format(host="127.0.0.1", port=port))
        else:
            k = child(f"""
                import time, fastnet
                l = fastnet.Listener(("127.0.0.1", {port}), authkey={KEY.encode()!r})
                print("LISTENING", flush=True)
                c = l.accept()
                c.recv_bytes()          # the proxy's hello, never answered
                print("SENT", flush=True)
                time.sleep(600)
            """)
        assert k.line() == "LISTENING"
        box = {}

        def call():
            try:
                box["result"] = proxy.do(3)
            except Exception as e:
                box["error"] = e

        t = threading.Thread(target=call)
        t.start()
        assert k.line() == "SENT"
        k.kill()
        t.join(WAIT)
        assert not t.is_alive()
        e = box.get("error")
        assert isinstance(e, ConnectionLost), (
            f"a call whose reconnection met a server dying mid-{phase} raised {type(e).__name__}: {e}")
    finally:
        proxy.close()


# -- killed mid-array -------------------------------------------------------------------

SEND_ARRAY = """
    import struct, time, numpy as np, fastnet
    c = fastnet.Client(tuple({address!r}))
    for n in range(100):
        c.send_bytes(struct.pack("!Q", n))
    a = np.arange({n}, dtype=np.int64)
    print("SENDING", flush=True)
    c.send_array(a)
    print("SENT", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("into", [False, True], ids=["new", "out"])
def test_killed_mid_array_receiver_gets_truncated_frame_error(child, into):
    n = 32 << 20           # 256 MiB of int64: far more than the socket buffers hold
    before = fds()
    with fastnet.Listener(("127.0.0.1", 0)) as listener:
        c = child(SEND_ARRAY.format(address=list(listener.address), n=n))
        conn = listener.accept()
        assert c.line() == "SENDING"
        # the sender blocks once the socket buffers are full: kill it there
        time.sleep(0.3)
        c.kill()
        for i in range(100):
            assert struct.unpack("!Q", conn.recv_bytes())[0] == i
        out = np.zeros(n, dtype=np.int64) if into else None
        with pytest.raises(TruncatedFrameError) as ei:
            conn.recv_array(out=out)
        missing = ei.value.missing
        assert 0 < missing < n * 8
        assert conn.closed
        del out
    assert_no_leak(before)
    soak.record_figure(f"killed mid-array ({'out=' if into else 'new'})", array_bytes=n * 8,
                       arrived=n * 8 - missing, missing=missing, fds_leaked=0)


def test_receiver_killed_mid_array_sender_gets_an_error(child):
    before = fds()
    with fastnet.Listener(("127.0.0.1", 0)) as listener:
        c = child(f"""
            import time, fastnet
            c = fastnet.Client(tuple({list(listener.address)!r}))
            c.recv_bytes(1 << 20)
            print("READING", flush=True)
            time.sleep(600)
        """)
        conn = listener.accept()
        a = np.arange(32 << 20, dtype=np.int64)
        box = {}

        def send():
            try:
                conn.send_bytes(b"x" * 100)
                conn.send_array(a)
                box["ok"] = True
            except Exception as e:
                box["error"] = e

        t = threading.Thread(target=send)
        t.start()
        assert c.line() == "READING"
        time.sleep(0.3)
        c.kill()
        t.join(WAIT)
        assert not t.is_alive(), "send_array hangs after its receiver died"
        assert isinstance(box.get("error"), (ConnectionResetError, BrokenPipeError)), box
        conn.close()
    assert_no_leak(before)


def test_rpc_server_survives_a_client_killed_mid_array_argument(hosts, child, tmp_path):
    log = str(tmp_path / "calls.log")
    rpc = hosts({"kind": "rpc", "address": ["127.0.0.1", 0], "log": log, "authkey": KEY})
    base = rpc.stats()
    before = fds()
    calls = soak.RPCWorkload(rpc.address, threads=3, authkey=KEY.encode(), array_every=10).start()
    try:
        k = child(f"""
            import time, numpy as np, fastnet
            p = fastnet.RPCProxy(tuple({list(rpc.address)!r}), authkey={KEY.encode()!r})
            a = np.arange(16 << 20, dtype=np.int64)      # 128 MiB argument
            print("CALLING", flush=True)
            p.checksum(a)
        """)
        assert k.line() == "CALLING"
        time.sleep(0.3)
        k.kill()
        time.sleep(0.3)
    finally:
        calls.stop()
    check_workloads(rpc=calls, log=log)
    settle(rpc, base)
    assert_no_leak(before)
    soak.record_figure("client killed mid-array argument, RPC server", rpc_calls=calls.counts["ok"], lost=0,
                       fds_leaked=0)


# -- killed mid-fd-pass -----------------------------------------------------------------

FD_SENDER = """
    import array, os, socket, struct, time, fastnet
    c = fastnet.Client({address!r})
    for n in range({count}):
        r, w = os.pipe()
        os.write(w, b"pipe %d" % n)
        os.close(w)
        c.send_fds([r], b"message %d" % n)
        os.close(r)
    r, w = os.pipe()
    os.write(w, b"in flight")
    s = socket.socket(fileno=os.dup(c.fileno()))
    first = struct.pack("!i", 100) + ({first!r})
    s.sendmsg([first], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]))])
    print("SENT", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("cut", ["after-header", "mid-payload"])
def test_killed_mid_fd_pass_every_descriptor_arrives_or_is_closed(child, tmp_path, cut):
    count = 40
    before = fds()
    path = str(tmp_path / "fds.sock")
    with fastnet.Listener(path) as listener:
        c = child(FD_SENDER.format(address=path, count=count, first=b"" if cut == "after-header" else b"abc"))
        conn = listener.accept()
        assert c.line() == "SENT"
        c.kill()
        for n in range(count):
            data, got = conn.recv_fds(4)
            assert data == b"message %d" % n and len(got) == 1
            assert os.read(got[0], 100) == b"pipe %d" % n, "each descriptor stays with its own message"
            os.close(got[0])
        with pytest.raises(TruncatedFrameError) as ei:
            conn.recv_fds(4)
        assert ei.value.missing == (100 if cut == "after-header" else 97)
        assert conn.closed
    # the descriptor that rode on the truncated frame was closed, not leaked
    assert_no_leak(before)
    soak.record_figure(f"killed mid-fd-pass ({cut})", messages=count, descriptors=count, lost=0,
                       missing=ei.value.missing, fds_leaked=0)


# -- a prefork worker killed under load -------------------------------------------------

def test_prefork_worker_killed_under_load(hosts):
    echo = hosts({"kind": "echo", "address": ["127.0.0.1", 0], "concurrency": "prefork", "workers": 2})
    base = echo.stats()
    before = fds()
    pids = base["workers"]
    assert len(pids) == 2
    stream = soak.StreamWorkload(echo.address, clients=6, window=2).start()
    try:
        # wait until both workers serve someone
        deadline = time.monotonic() + WAIT
        while {p for r in list(stream.records) for p in r.pids} != set(pids):
            assert time.monotonic() < deadline, "connections did not spread over both workers"
            time.sleep(0.01)
        time.sleep(0.3)
        victim, survivor = pids
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        rep = echo.wait_stats(lambda r: r["stats"]["worker_restarts"] == 1 and len(r["workers"]) == 2)
        replaced_at = time.monotonic()
        assert rep["stats"]["worker_restarts"] == 1 and len(rep["workers"]) == 2, rep
        replacement = (set(rep["workers"]) - {survivor}).pop()
        time.sleep(0.5)
        # new connections are served (by the survivor or the replacement)
        with fastnet.Client(echo.address, timeout=WAIT) as c:
            c.send_bytes(soak.SEQ.pack(0) + b"new")
            assert c.poll(WAIT)
            assert c.recv_bytes()[13:] == b"new"
    finally:
        stream.stop()
    assert stream.check() == []
    on_victim = [r for r in stream.records if victim in r.pids]
    others = [r for r in stream.records if victim not in r.pids and r.opened < killed_at]
    assert on_victim and others
    for r in on_victim:
        # a clean error for the killed worker's clients, never wrong data
        assert r.error is not None and r.error.split(":")[0] in CLEAN_END, r.as_dict()
    for r in others:
        assert r.error is None, f"a client of the surviving worker was disturbed: {r.as_dict()}"
    # reconnections made while the worker was dying may have been handed to it before the
    # server knew: those may end, but only in a clean error and never with data served
    dying = [r for r in stream.records if killed_at < r.opened <= replaced_at and victim not in r.pids]
    for r in dying:
        assert r.error is None or (r.error.split(":")[0] in CLEAN_END and not r.pids), r.as_dict()
    # the killed worker's clients reconnect and are served by the others
    reconnected = [r for r in stream.records if r.opened > killed_at and r.acked > 0]
    assert reconnected and {p for r in reconnected for p in r.pids} <= {survivor, replacement}
    after = [r for r in stream.records if r.opened > replaced_at]
    assert [r.as_dict() for r in after if r.error] == [], "connections after the replacement must be served"
    settle(echo, base)
    assert_no_leak(before)
    soak.record_figure("prefork worker killed under load (stream)", messages=stream.messages, lost=0,
                       victim_clients=len(on_victim), other_clients_disturbed=0, worker_restarts=1,
                       victim_errors=sorted({r.error.split(":")[0] for r in on_victim}),
                       handed_to_the_dying_worker=sum(1 for r in dying if r.error),
                       fds_leaked=0)


def test_prefork_rpc_worker_killed_under_load(hosts, tmp_path):
    log = str(tmp_path / "calls.log")
    rpc = hosts({"kind": "rpc", "address": ["127.0.0.1", 0], "workers": 2, "log": log, "authkey": KEY})
    base = rpc.stats()
    before = fds()
    pids = base["workers"]
    calls = soak.RPCWorkload(rpc.address, threads=6, authkey=KEY.encode(), slow_every=5, slow_time=0.1).start()
    try:
        time.sleep(0.5)
        killed_at = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        rep = rpc.wait_stats(lambda r: r["stats"]["worker_restarts"] == 1 and len(r["workers"]) == 2)
        assert rep["stats"]["worker_restarts"] == 1 and len(rep["workers"]) == 2, rep
        time.sleep(0.8)
    finally:
        calls.stop()
    assert calls.check(log) == []
    assert calls.counts["lost"] >= 1, "the killed worker's pending calls must fail with ConnectionLost"
    late_ok = [s for s, (o, t) in calls.outcomes.items() if o == "ok" and t > killed_at + 0.5]
    assert late_ok, "calls after the kill reconnect and succeed"
    settle(rpc, base)
    assert_no_leak(before)
    soak.record_figure("prefork RPC worker killed under load", rpc_calls=calls.counts["ok"],
                       connection_lost=calls.counts["lost"], ran_twice=0, worker_restarts=1, fds_leaked=0)


# -- the RPC server restarted while its clients run --------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rpc_server_restarted_while_clients_run(hosts, tmp_path):
    log = str(tmp_path / "calls.log")
    cfg = {"kind": "rpc", "address": ["127.0.0.1", free_port()], "log": log, "authkey": KEY}
    first = hosts(cfg)
    before = fds()
    own = soak.RPCWorkload(first.address, threads=4, authkey=KEY.encode(), slow_every=3, slow_time=0.3)
    shared = soak.RPCWorkload(first.address, threads=4, authkey=KEY.encode(), shared=True, slow_every=4,
                              slow_time=0.3, seq_base=10 ** 9)
    own.start()
    shared.start()
    try:
        time.sleep(1.0)
        first.kill()
        killed_at = time.monotonic()
        time.sleep(0.5)
        second = hosts(cfg)
        ready_at = time.monotonic()
        time.sleep(1.5)
    finally:
        own.stop()
        shared.stop()
    for w, other in ((own, shared), (shared, own)):
        assert w.check(log, others=other.outcomes) == []
        assert w.counts["lost"] >= 1, "calls pending when the server died fail with ConnectionLost"
        after = [(s, o) for s, (o, t) in w.outcomes.items() if t > ready_at + 0.5]
        assert after and all(o == "ok" for s, o in after), [x for x in after if x[1] != "ok"][:5]
    second.stop()
    assert_no_leak(before)
    soak.record_figure("RPC server SIGKILLed and restarted under 8 threads",
                       calls_ok=own.counts["ok"] + shared.counts["ok"],
                       connection_lost=own.counts["lost"] + shared.counts["lost"],
                       timeouts=own.counts["timeout"] + shared.counts["timeout"], ran_twice=0,
                       restart_gap_s=round(ready_at - killed_at, 2), fds_leaked=0)


# -- idle and half-open peers -----------------------------------------------------------

IDLE = 1.0
# the documented bound (server/_engine.py: two sweeps, every idle_timeout/2, without traffic)
IDLE_BOUND = IDLE + IDLE / 2
SLACK = 1.0           # scheduling and polling slack on a loaded 2-core machine


@pytest.mark.parametrize("concurrency", ["loop", "thread", "fork", "prefork"])
def test_stopped_peer_is_closed_by_idle_timeout_within_the_bound(hosts, child, concurrency):
    echo = hosts({"kind": "echo", "address": ["127.0.0.1", 0], "idle_timeout": IDLE,
                  "concurrency": concurrency, "workers": 4})
    base = echo.stats()
    before = fds()
    # busy connections are never idle: a paced workload runs through the whole test
    stream = soak.StreamWorkload(echo.address, clients=2, pace=0.05).start()
    try:
        k = child(f"""
            import signal, struct, time, fastnet
            c = fastnet.Client(tuple({list(echo.address)!r}))
            c.send_bytes(struct.pack("!Q", 0))
            c.recv_bytes()
            print("IDLE %r" % time.monotonic(), flush=True)
            time.sleep(1e-3)
            # after SIGCONT: what does the stopped peer find?
            try:
                print("GOT %r" % c.recv_bytes(), flush=True)
            except Exception as e:
                print("ERROR " + type(e).__name__, flush=True)
        """)
        line = k.line()
        k.kill(signal.SIGSTOP)
        last_io = float(line.split()[1])
        # the stopped peer's connection is the only one that goes: two busy ones stay
        rep = echo.wait_stats(lambda r: r["stats"]["connections_open"] == 2, timeout=WAIT, interval=0.02)
        detected = time.monotonic() - last_io
        assert rep["stats"]["connections_open"] == 2
        assert detected <= IDLE_BOUND + SLACK, f"idle connection closed after {detected:.2f} s"
        k.kill(signal.SIGCONT)
        end = k.line()
        assert end in ("ERROR EOFError", "ERROR ConnectionResetError"), end
    finally:
        stream.stop()
    check_workloads(stream)
    rep = settle(echo, base)
    assert_no_leak(before)
    soak.record_figure(f"SIGSTOPped peer, idle_timeout=1.0 ({concurrency})", detected_s=round(detected, 3),
                       bound_s=IDLE_BOUND, peer_saw=end.split()[1], busy_clients_closed=0, fds_leaked=0,
                       stats_idle_closed=rep["stats"]["idle_closed"])
    # fork and prefork: the sweep runs in the child, and the count must still reach stats()
    assert rep["stats"]["idle_closed"] == 1, f"stats() does not count the idle close: {rep['stats']}"


NETNS_SKIP = soak.netns_available()


KEEPALIVE = 2.0       # seconds; fastnet.set_keepalive: idle 1 s, then one 1 s probe


@pytest.mark.skipif(NETNS_SKIP is not None, reason=str(NETNS_SKIP))
def test_half_open_peer_vanished_without_fin(hosts):
    """The client's host vanishes (the veth pair is deleted): no FIN, no RST ever arrives.

    The server's idle sweep closes the connection within idle_timeout + idle_timeout/2.
    On the client side, a Connection without keepalive (the default, as in the
    stdlib) sees nothing: no data, no error. ``Client(keepalive=2)`` makes a
    blocking ``recv()`` fail with OSError within the bound instead of waiting forever.
    """
    with soak.NetnsPair("fnf") as net:
        echo = hosts({"kind": "echo", "address": [net.ip_a, 0], "idle_timeout": IDLE}, netns=net.a)
        base = echo.stats()
        server_addr = echo.address

        def connect(**kw):
            c = fastnet.Client(server_addr, timeout=WAIT, **kw)
            c.send_bytes(soak.SEQ.pack(0))
            assert c.recv_bytes()[:8] == soak.SEQ.pack(0)
            return c

        plain = soak.in_netns(net.b, connect)
        guarded = soak.in_netns(net.b, connect, keepalive=KEEPALIVE)
        last_io = time.monotonic()
        net.delete_link()
        rep = echo.wait_stats(lambda r: r["stats"]["idle_closed"] == 2, timeout=WAIT, interval=0.02)
        detected = time.monotonic() - last_io
        assert rep["stats"]["idle_closed"] == 2
        assert detected <= IDLE_BOUND + SLACK, f"half-open connections closed after {detected:.2f} s"
        settle(echo, base)

        # blocking recv() on the keepalive connection: it must end, with an error, by itself
        with pytest.raises(OSError) as ei:
            guarded.recv_bytes()
        ka_detected = time.monotonic() - last_io
        assert ka_detected <= KEEPALIVE + SLACK, f"keepalive={KEEPALIVE} detected after {ka_detected:.2f} s"
        guarded.close()
        # without keepalive the vanished peer is invisible: nothing arrives and nothing fails
        assert plain.poll(0.5) is False
        plain.close()
    soak.record_figure("half-open peer (veth deleted), idle_timeout=1.0", server_detected_s=round(detected, 3),
                       bound_s=IDLE_BOUND, client_keepalive_s=KEEPALIVE,
                       client_error_with_keepalive=type(ei.value).__name__,
                       client_detected_with_keepalive_s=round(ka_detected, 2),
                       client_without_keepalive="no error, no data")


@pytest.mark.skipif(NETNS_SKIP is not None, reason=str(NETNS_SKIP))
def test_rpc_call_to_a_vanished_host_fails_within_the_keepalive_bound(hosts):
    """An RPC call in flight when the server's host vanishes: ConnectionLost within keepalive seconds.

    The call has no timeout of its own; only the proxy's ``keepalive`` can end it.
    After the link is back the proxy reconnects and calls work again.
    """
    with soak.NetnsPair("fnk") as net:
        rpc = hosts({"kind": "rpc", "address": [net.ip_a, 0], "idle_timeout": None}, netns=net.a)
        proxy = soak.in_netns(net.b, fastnet.RPCProxy, rpc.address, keepalive=KEEPALIVE, connect_timeout=WAIT)
        try:
            assert proxy.do(1) == 4
            fut = proxy.call_async("slow", 2, 60.0)     # runs on the server far longer than the test
            time.sleep(0.1)
            t0 = time.monotonic()
            net.delete_link()
            with pytest.raises(fastnet.ConnectionLost):
                fut.result(WAIT)
            detected = time.monotonic() - t0
            assert detected <= KEEPALIVE + SLACK, f"keepalive={KEEPALIVE} detected after {detected:.2f} s"
        finally:
            proxy.close()
    soak.record_figure("RPC call to a vanished host (veth deleted), keepalive=2", detected_s=round(detected, 2),
                       bound_s=KEEPALIVE, error="ConnectionLost")
