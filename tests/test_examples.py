"""The Cookbook chapter 11 and course programs in examples/, run as real processes.

Each server runs as its own process (``--port 0``, its address read from its
"serving on host:port" line) and is stopped with a signal; clients run as
processes too, or are written here when the test checks the bytes itself.
The environment passes through, so ``FASTNET_PURE=1`` runs every example on
the pure-Python kernels.
"""
import multiprocessing.connection
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

import fastnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
WAIT = 30.0   # generous deadline for what should take milliseconds


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run(script, *args, rc=0):
    """Run an example to completion; its stdout lines."""
    p = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args],
                       capture_output=True, text=True, env=_env(), timeout=WAIT)
    assert p.returncode == rc, f"exit {p.returncode}\n{p.stdout}\n{p.stderr[-3000:]}"
    return p.stdout.splitlines()


def _default_sigint():
    # the examples stop on SIGINT even when this run inherited it ignored
    # (nohup, a shell's background job): at exec Python installs its handler
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Server:
    """An example running as a server process, its stdout read line by line."""

    def __init__(self, script, *args):
        self.proc = subprocess.Popen([sys.executable, os.path.join(EXAMPLES, script), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
                                     preexec_fn=_default_sigint)
        self.lines = []
        self._buf = b""

    def readline(self, timeout=WAIT):
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"no line from the example in {timeout} s; so far {self.lines}")
            chunk = os.read(fd, 65536)
            if not chunk:
                err = self.proc.stderr.read().decode(errors="replace")
                raise AssertionError(f"the example closed its stdout; so far {self.lines}\n{err[-3000:]}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        line = line.decode()
        self.lines.append(line)
        return line

    def expect(self, text):
        """Read lines until one contains text; return it."""
        while True:
            line = self.readline()
            if text in line:
                return line

    def address(self):
        line = self.expect("serving on ")
        host, port = line.rsplit(" ", 1)[1].rsplit(":", 1)
        return host, int(port)

    def stop(self, sig=signal.SIGINT):
        """Signal the server, wait for it to finish cleanly; all its stdout lines."""
        self.proc.send_signal(sig)
        try:
            out, err = self.proc.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the example did not stop on {sig!r}")
        rest = (self._buf + out).decode()
        self._buf = b""
        self.lines.extend(rest.splitlines())
        assert self.proc.returncode == 0, f"exit {self.proc.returncode}\n{err.decode()[-3000:]}"
        assert self.lines[-1] == "stopped", self.lines
        return self.lines

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def start():
    servers = []

    def _start(script, *args):
        s = Server(script, *args)
        servers.append(s)
        return s
    yield _start
    for s in servers:
        s.kill()


def _port(address):
    return str(address[1])


# -- recipe 11.6: the XML-RPC key-value server on fastnet.RPCServer -------------------

KV_SESSION = [
    "s.set('foo', 'bar') -> None",
    "s.set('spam', [1, 2, 3]) -> None",
    "s.keys() -> ['foo', 'spam']",
    "s.get('foo') -> 'bar'",
    "s.get('spam') -> [1, 2, 3]",
    "s.delete('spam') -> None",
    "s.exists('spam') -> False",
    "s.get('spam') raised RemoteError: KeyError: 'spam'",
    "s.set('foo', b'Hello World') -> None",
    "s.get('foo') -> b'Hello World'",
]


def test_rpc_keyvalue(start):
    server = start("rpc_keyvalue.py", "--port", "0")
    addr = server.address()
    assert run("rpc_keyvalue.py", "--client", "--port", _port(addr)) == KV_SESSION
    # the store lives in the server: another client sees what the session left
    with fastnet.RPCProxy(addr, timeout=WAIT) as s:
        assert s.keys() == ['foo']
        assert s.get('foo') == b'Hello World'
        # only the methods in _rpc_methods_ are exposed
        assert {'get', 'set', 'delete', 'exists', 'keys'} <= set(s.system.list_methods())
        with pytest.raises(fastnet.MethodNotFound):
            s.serve_forever()
    server.stop(signal.SIGTERM)


def test_rpc_keyvalue_demo():
    assert run("rpc_keyvalue.py", "--demo") == KV_SESSION


# -- recipe 11.8: pickle RPC with an authkey, and the JSON variant --------------------

PICKLE_SESSION = [
    "proxy.add(2, 3) -> 5",
    "proxy.sub(2, 3) -> -1",
    "proxy.sub([1, 2], 4) raised TypeError: unsupported operand type(s) for -: 'list' and 'int'",
    "proxy.add(Fraction(1, 3), Fraction(1, 6)) -> Fraction(1, 2)",
    "a client with the wrong key is refused: AuthenticationError: digest sent was rejected",
]


def _check_pickle_session(lines):
    where = [ln for ln in lines if ln.startswith("    raised on the server at: ")]
    assert len(where) == 1 and where[0].endswith(", in sub"), lines
    assert [ln for ln in lines if ln not in where] == PICKLE_SESSION


def test_rpc_pickle(start):
    server = start("rpc_pickle.py", "--port", "0")
    addr = server.address()
    _check_pickle_session(run("rpc_pickle.py", "--client", "--port", _port(addr)))
    lines = run("rpc_pickle.py", "--client", "--port", _port(addr), "--authkey", "guess", rc=1)
    assert lines == ["refused: AuthenticationError: digest sent was rejected"]
    # the remote exception is the original type, here too
    with fastnet.RPCProxy(addr, authkey=b'peekaboo', codec="pickle", timeout=WAIT) as proxy:
        assert proxy.add(2, 3) == 5
        with pytest.raises(TypeError) as info:
            proxy.sub([1, 2], 4)
        assert isinstance(info.value.__cause__, fastnet.RemoteError)
    # a client speaking another codec is turned away by a pickle-only server
    with pytest.raises(fastnet.ProtocolError, match="codec"):
        fastnet.RPCProxy(addr, authkey=b'peekaboo', codec="json", timeout=WAIT)
    server.stop()


def test_rpc_pickle_demo():
    _check_pickle_session(run("rpc_pickle.py", "--demo"))


JSON_SESSION = [
    "proxy.add(2, 3) -> 5",
    "proxy.sub(2, 3) -> -1",
    "proxy.add((1, 2), (3,)) -> [1, 2, 3]",
    "proxy.sub([1, 2], 4) raised RemoteError: type_name='TypeError' "
    "message=\"unsupported operand type(s) for -: 'list' and 'int'\"",
    "proxy.add(b'spam', b'eggs') raised TypeError: json codec cannot encode bytes object; "
    "use msgpack or pickle for bytes",
]


def test_rpc_json(start):
    server = start("rpc_json.py", "--port", "0")
    addr = server.address()
    assert run("rpc_json.py", "--client", "--port", _port(addr)) == JSON_SESSION
    with fastnet.RPCProxy(addr, codec="json", timeout=WAIT) as proxy:
        with pytest.raises(fastnet.RemoteError) as info:
            proxy.sub([1, 2], 4)
        assert info.value.type_name == "TypeError"
        assert not isinstance(info.value, TypeError)
    server.stop()


def test_rpc_json_demo():
    assert run("rpc_json.py", "--demo") == JSON_SESSION


# -- recipe 11.9: HMAC-authenticated echo ---------------------------------------------

@pytest.mark.parametrize("server_style", [[], ["--listener"]], ids=["socket-server", "listener"])
def test_auth_echo(start, server_style):
    name = "listener" if server_style else "socket server"
    server = start("auth_echo.py", "--port", "0", *server_style)
    addr = server.address()
    port = _port(addr)
    # both kinds of client, against either kind of server
    assert run("auth_echo.py", "--client", "--port", port) == [
        "socket client, key b'peekaboo': sent b'Hello World', got back b'Hello World'"]
    assert server.expect("authenticated").startswith(f"{name}: 127.0.0.1:")
    assert run("auth_echo.py", "--client", "--listener", "--port", port) == [
        "fastnet.Client, key b'peekaboo': sent b'Hello World', got back b'Hello World'"]
    server.expect("authenticated")
    # a wrong key is refused, and the server says so and goes on serving
    for client_style in ([], ["--listener"]):
        lines = run("auth_echo.py", "--client", "--port", port, "--key", "guess", *client_style, rc=1)
        assert len(lines) == 1 and lines[0].endswith("key b'guess': refused: digest sent was rejected")
        assert server.expect("refused").startswith(f"{name}: refused 127.0.0.1:")
    # and so is a peer that does not answer the challenge at all
    with socket.create_connection(addr, timeout=WAIT) as s:
        s.sendall(b"\0\0\0\x05hello")
        assert server.expect("refused").startswith(f"{name}: refused 127.0.0.1:")
    # the stdlib's client speaks the same handshake
    with multiprocessing.connection.Client(addr, authkey=b'peekaboo') as conn:
        conn.send_bytes(b'stdlib')
        assert conn.recv_bytes() == b'stdlib'
    with pytest.raises(multiprocessing.AuthenticationError):
        multiprocessing.connection.Client(addr, authkey=b'guess')
    server.stop(signal.SIGTERM)


def test_auth_echo_demo():
    lines = run("auth_echo.py", "--demo")
    echoed = [ln for ln in lines if ln.endswith("sent b'Hello World', got back b'Hello World'")]
    refused = [ln for ln in lines if ln.endswith("key b'wrong key': refused: digest sent was rejected")]
    pairings = {ln.split(",")[0] for ln in echoed}
    assert pairings == {f"{c} -> {s}" for c in ("socket client", "fastnet.Client")
                        for s in ("socket server", "listener")}
    assert {ln.split(",")[0] for ln in refused} == pairings
    assert not any("wrong key" in ln for ln in echoed)


# -- recipe 11.10: TLS echo -----------------------------------------------------------

def test_ssl_echo(start, tmp_path):
    pytest.importorskip("cryptography")
    certdir = tmp_path / "certs"
    server = start("ssl_echo.py", "--port", "0", "--certdir", str(certdir))
    cafile = server.expect("CA certificate: ").split(": ", 1)[1]
    assert cafile == str(certdir / "ca.pem")
    addr = server.address()
    lines = run("ssl_echo.py", "--client", "--port", _port(addr), "--cafile", cafile)
    assert re.fullmatch(r"ssl socket \(TLSv1\.[23]\): sent b'Hello World\?', "
                        r"got back b'Hello World\?', equal: True", lines[0])
    assert lines[1] == "fastnet.Client: sent b'Hello World?', got back b'Hello World?', equal: True"
    assert lines[2].startswith("fastnet.Client: sent 256000 bytes") and lines[2].endswith("equal: True")
    assert lines[3].startswith("a client that does not trust the CA is refused: TLS handshake failed")
    assert len(lines) == 4
    # the bytes really are encrypted: a plain TCP peer gets no echo, only a TLS alert or a close
    with socket.create_connection(addr, timeout=WAIT) as s:
        s.sendall(b"\0\0\0\x05hello")
        try:
            data = s.recv(100)
        except ConnectionResetError:
            data = b""
        assert b"hello" not in data
    # a fastnet.Client of the test's own, trusting the example's CA, is echoed
    ctx = fastnet.tls.client_context(cafile=cafile)
    with fastnet.Client(addr, ssl_context=ctx, timeout=WAIT) as conn:
        conn.send_bytes(b"over TLS")
        assert conn.recv_bytes() == b"over TLS"
    lines = server.stop()
    assert sum(ln.startswith("Got connection ('127.0.0.1', ") for ln in lines) == 3
    # the untrusting client and the plain TCP peer
    assert lines[-2] == "2 failed handshakes"


def test_ssl_echo_demo():
    pytest.importorskip("cryptography")
    lines = run("ssl_echo.py", "--demo")
    assert "fastnet.Client: sent b'Hello World?', got back b'Hello World?', equal: True" in lines
    assert sum(ln.endswith("equal: True") for ln in lines) == 3
    assert not any(ln.endswith("equal: False") for ln in lines)
    assert any(ln.startswith("a client that does not trust the CA is refused") for ln in lines)


# -- recipe 11.11: passing sockets to worker processes --------------------------------

def _echo(addr, messages):
    """Send each message on one connection, read it back; the client's port."""
    with socket.create_connection(addr, timeout=WAIT) as s:
        for msg in messages:
            s.sendall(msg)
            got = b""
            while len(got) < len(msg):
                chunk = s.recv(1024)
                assert chunk, "the connection closed before the echo"
                got += chunk
            assert got == msg
        return s.getsockname()[1]


def test_pass_socket(start):
    server = start("pass_socket.py", "--port", "0", "--workers", "2")
    workers = {int(server.expect("connected").split()[2]) for _ in range(2)}
    dispatcher = int(re.search(r"pid (\d+)", server.expect("SERVER: pid")).group(1))
    assert dispatcher == server.proc.pid and dispatcher not in workers and len(workers) == 2
    addr = server.address()
    served = {}
    for i in range(4):
        port = _echo(addr, [b"Hello %d\r\n" % i, b"World %d\r\n" % i])
        # the dispatcher reports once the descriptor is on its way: the echo may come first
        line = server.expect(f"SERVER: Got connection from 127.0.0.1:{port},")
        served[port] = int(line.rsplit(" ", 1)[1])
    ports = list(served)
    lines = server.stop()
    assert set(served.values()) == workers        # handed out in turn
    for i, port in enumerate(ports):
        pid = served[port]
        assert f"WORKER {pid}: RECV b'Hello {i}\\r\\n'" in lines
        assert f"WORKER {pid}: RECV b'World {i}\\r\\n'" in lines
        assert any(ln.startswith(f"WORKER {pid}: GOT FD ") and ln.endswith(f"for 127.0.0.1:{port}")
                   for ln in lines)


def test_pass_socket_worker_started_by_hand(start, tmp_path):
    work = str(tmp_path / "servconn")
    server = start("pass_socket.py", "--port", "0", "--workers", "0", "--work-address", work)
    addr = server.address()
    worker = start("pass_socket.py", "--worker", work)
    pid = int(server.expect("connected").split()[2])
    assert pid == worker.proc.pid
    port = _echo(addr, [b"by hand\r\n"])
    assert server.expect("passed to worker") == \
        f"SERVER: Got connection from 127.0.0.1:{port}, passed to worker {pid}"
    assert worker.expect("RECV") == f"WORKER {pid}: RECV b'by hand\\r\\n'"
    server.stop()
    worker.proc.communicate(timeout=WAIT)         # the worker ends when the dispatcher goes
    assert worker.proc.returncode == 0


def test_pass_socket_demo():
    lines = run("pass_socket.py", "--demo")
    for i in range(2):
        assert sum(ln.endswith(f"sent b'World {i}\\r\\n', got back b'World {i}\\r\\n'")
                   for ln in lines) == 1, lines
    assert len({ln.split(":")[0] for ln in lines if ln.startswith("WORKER ")}) == 2


# -- recipe 11.12: slow work on the event loop's thread pool --------------------------

def _fib(n):
    a, b = 1, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def test_eventloop_threadpool(start):
    server = start("eventloop_threadpool.py", "--port", "0")
    addr = server.address()
    lines = run("eventloop_threadpool.py", "--client", "--port", _port(addr), "32", "5", "10")
    assert sorted(lines) == sorted(f"client: got fib({n}) = {_fib(n)}" for n in (32, 5, 10))
    # fib(32) runs for a good fraction of a second on the pool; the loop answers the others meanwhile
    assert lines[-1] == f"client: got fib(32) = {_fib(32)}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(WAIT)
        s.sendto(b"spam", addr)
        assert s.recvfrom(8192)[0] == b"error: send an integer from 0 to 35"
    logged = server.stop(signal.SIGTERM)
    work = [re.fullmatch(r"server: fib\((\d+)\) computed on thread (\S+), answered on thread (\S+)", ln)
            for ln in logged if ln.startswith("server: fib(")]
    assert sorted(int(m.group(1)) for m in work) == [5, 10, 32]
    for m in work:
        assert m.group(3) == "MainThread" and m.group(2) != "MainThread"


def test_eventloop_threadpool_demo():
    lines = run("eventloop_threadpool.py", "--demo", "25", "3")
    got = [ln for ln in lines if ln.startswith("client: ")]
    assert sorted(got) == sorted(f"client: got fib({n}) = {_fib(n)}" for n in (25, 3))


# -- recipe 11.13: large arrays -------------------------------------------------------

def test_large_arrays(start):
    np = pytest.importorskip("numpy")
    server = start("large_arrays.py", "--port", "0")
    addr = server.address()
    lines = run("large_arrays.py", "--client", "--port", _port(addr), "--size", "1000000")
    assert [ln.split(": ", 1)[0] for ln in lines] == ["recv_into", "recv_into", "recv_array", "recv_array"]
    assert lines[0] == "recv_into:  a[0:5] = [0. 1. 2. 3. 4.], a[-1] = 999999.0"
    assert lines[2] == "recv_array: b[0:5] = [0. 1. 2. 3. 4.], b[-1] = 999999.0"
    assert lines[1].endswith("contents equal: True") and lines[3].endswith("contents equal: True")
    # a request for more than the server will allocate is refused; the server goes on
    with socket.create_connection(addr, timeout=WAIT) as s:
        s.sendall(struct.pack("!Q", 1 << 40))
        assert s.recv(100) == b""
    server.expect(f"refused a request for {1 << 40} values")
    # the test as the client: the same bytes both ways, checked here
    n = 300_001
    expected = np.arange(0.0, n)
    with socket.create_connection(addr, timeout=WAIT) as s:
        s.sendall(struct.pack("!Q", n))
        raw = np.empty(n)
        fastnet.recv_into(raw, s)
        assert np.array_equal(raw, expected)
        with fastnet.Connection(s) as conn:
            arr = conn.recv_array()
    assert arr.dtype == np.float64 and arr.shape == (n,) and np.array_equal(arr, expected)
    server.expect(f"sent {n} float64 values twice")
    assert "sent 1000000 float64 values twice" in server.stop()


def test_large_arrays_demo():
    pytest.importorskip("numpy")
    lines = run("large_arrays.py", "--demo", "--size", "100000")
    assert sum(ln.endswith("contents equal: True") for ln in lines) == 2, lines


# -- the course's first TCP server and client -----------------------------------------

def test_tcp_hello(start):
    server = start("tcp_hello.py", "--port", "0")
    addr = server.address()
    assert run("tcp_hello.py", "--client", "--port", _port(addr)) == ["client: b'Hello 127.0.0.1\\n'"]
    with socket.create_connection(addr, timeout=WAIT) as s:
        data = b""
        while True:
            chunk = s.recv(100)
            if not chunk:
                break
            data += chunk
        assert data == b"Hello 127.0.0.1\n"
    server.expect("Received connection from ('127.0.0.1',")
    server.stop()


def test_tcp_hello_demo():
    assert "client: b'Hello 127.0.0.1\\n'" in run("tcp_hello.py", "--demo")
