"""Attacks on the authkey handshake and the RPC layer, played against real listeners and servers.

Each test is an attacker without the key doing what SECURITY.md says fails:
replaying a recorded handshake, reflecting the server's challenge, relaying a
challenge between two of our own clients, oversized handshake messages, and
asking an RPC server for pickle without authenticating.
"""
import inspect
import json
import os
import socket
import threading

import pytest

import fastnet
from fastnet._pure import auth as pure_auth
from fastnet._kernels import auth as kauth

KEY = b"the real key"
WAIT = 10


def _frame(payload):
    return len(payload).to_bytes(4, "big") + payload


def _read_frame(sock):
    head = _recv_exact(sock, 4)
    if head is None:
        return None
    n = int.from_bytes(head, "big", signed=True)
    assert 0 <= n <= 1 << 20
    return _recv_exact(sock, n)


def _recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except ConnectionResetError:    # closed with our unread bytes still queued
            return None
        if not chunk:
            return None
        buf += chunk
    return buf


def _frames_until_close(sock):
    out = []
    while True:
        f = _read_frame(sock)
        if f is None:
            return out
        out.append(f)


class _Acceptor:
    """A Listener accepting in a thread; records what each accept() did."""

    def __init__(self, **kw):
        self.listener = fastnet.Listener(("127.0.0.1", 0), authkey=KEY, **kw)
        self.results = []
        self.thread = None

    def accept(self, n=1):
        def run():
            for _ in range(n):
                try:
                    c = self.listener.accept()
                except Exception as e:
                    self.results.append(e)
                else:
                    self.results.append(c)
                    try:
                        c.send_bytes(b"secret data")
                    except OSError:
                        pass
        self.thread = threading.Thread(target=run)
        self.thread.start()

    def join(self):
        self.thread.join(WAIT)
        assert not self.thread.is_alive()

    def close(self):
        for r in self.results:
            if isinstance(r, fastnet.Connection):
                r.close()
        self.listener.close()


class _Recorder:
    """A TCP relay between a client and a server that keeps what the client sent."""

    def __init__(self, target):
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        self.client_bytes = bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        c, _ = self.sock.accept()
        s = socket.create_connection(self.target)

        def pump(src, dst, keep):
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                if keep is not None:
                    keep += data
                dst.sendall(data)

        t = threading.Thread(target=pump, args=(s, c, None), daemon=True)
        t.start()
        pump(c, s, self.client_bytes)
        t.join(WAIT)
        c.close()
        s.close()
        self.sock.close()


def test_a_recorded_handshake_cannot_be_replayed():
    acc = _Acceptor()
    try:
        acc.accept(2)
        rec = _Recorder(acc.listener.address)
        with fastnet.Client(rec.address, authkey=KEY) as c:
            assert c.recv_bytes() == b"secret data"
        rec.thread.join(WAIT)
        recorded = bytes(rec.client_bytes)
        assert len(recorded) > 40

        # the attacker replays every byte the honest client sent, on a new connection
        with socket.create_connection(acc.listener.address, timeout=WAIT) as s:
            challenge = _read_frame(s)
            assert challenge.startswith(b"#CHALLENGE#")
            s.sendall(recorded)
            got = _frames_until_close(s)
        acc.join()
        assert isinstance(acc.results[0], fastnet.Connection)
        assert isinstance(acc.results[1], fastnet.AuthenticationError)
        assert got == [b"#FAILURE#"]          # no WELCOME, no data, no answer to a challenge
    finally:
        acc.close()


def test_a_reflected_challenge_is_refused_and_the_server_answers_nothing():
    acc = _Acceptor()
    try:
        acc.accept(1)
        with socket.create_connection(acc.listener.address, timeout=WAIT) as s:
            challenge = _read_frame(s)
            # hand the server its own challenge back, as response and as our challenge
            s.sendall(_frame(challenge) + _frame(challenge))
            got = _frames_until_close(s)
        acc.join()
        assert isinstance(acc.results[0], fastnet.AuthenticationError)
        assert got == [b"#FAILURE#"]
    finally:
        acc.close()


def test_a_challenge_relayed_between_two_of_our_clients_is_refused():
    """A server without the key sends our first client's challenge to our second
    client, hoping it answers: the second client refuses, the first fails."""
    evil = socket.create_server(("127.0.0.1", 0))
    addr = evil.getsockname()
    outcomes = {}

    def client(name):
        try:
            fastnet.Client(addr, authkey=KEY, timeout=WAIT).close()
            outcomes[name] = "connected"
        except Exception as e:
            outcomes[name] = e

    a = threading.Thread(target=client, args=("a",))
    a.start()
    ca, _ = evil.accept()
    ca.settimeout(WAIT)
    nonce = os.urandom(40)
    ca.sendall(_frame(b"#CHALLENGE#{sha256}" + nonce))
    _read_frame(ca)                        # a's answer (useless to us)
    a_challenge = _read_frame(ca)          # a's own challenge, pipelined
    assert a_challenge.startswith(b"#CHALLENGE#")
    ca.sendall(_frame(b"#WELCOME#"))

    b = threading.Thread(target=client, args=("b",))
    b.start()
    cb, _ = evil.accept()
    cb.settimeout(WAIT)
    cb.sendall(_frame(a_challenge))        # relay a's challenge to b
    relayed_answer = _read_frame(cb)       # b must not answer it
    b.join(WAIT)
    assert relayed_answer is None
    assert isinstance(outcomes["b"], fastnet.AuthenticationError)
    assert "relayed" in str(outcomes["b"])
    ca.sendall(_frame(b"{sha256}" + b"\0" * 32))   # the best a keyless server can do
    a.join(WAIT)
    assert isinstance(outcomes["a"], fastnet.AuthenticationError)
    for s in (ca, cb, evil):
        s.close()


@pytest.mark.parametrize("size", [257, 4096, 10 << 20])
def test_oversized_handshake_messages_are_refused_without_reading_them(size):
    acc = _Acceptor()
    try:
        acc.accept(1)
        with socket.create_connection(acc.listener.address, timeout=WAIT) as s:
            assert _read_frame(s).startswith(b"#CHALLENGE#")
            # only the header: the server must refuse on it, not wait for 10 MiB
            s.sendall(size.to_bytes(4, "big") + b"{sha256}")
            acc.join()
        assert isinstance(acc.results[0], fastnet.AuthenticationError)
        assert "too large" in str(acc.results[0])
    finally:
        acc.close()


def test_oversized_handshake_message_refused_by_a_loop_server():
    class Echo(fastnet.MessageHandler):
        def message_received(self, data):
            self.reply(data)

    with fastnet.TCPServer(("127.0.0.1", 0), Echo, authkey=KEY) as srv:
        srv.start()
        with socket.create_connection(srv.address, timeout=WAIT) as s:
            assert _read_frame(s).startswith(b"#CHALLENGE#")
            s.sendall((1 << 20).to_bytes(4, "big") + b"x" * 100)
            assert _frames_until_close(s) in ([], [b"#FAILURE#"])
        with fastnet.Client(srv.address, authkey=KEY) as c:     # still serving
            c.send_bytes(b"ok")
            assert c.recv_bytes() == b"ok"
        assert srv.stats()["handshake_failures"] == 1
        srv.shutdown()


def test_strict_refuses_md5_in_both_kernels(kernels):
    mod = kernels.auth
    msg, nonce = mod.make_challenge(None)           # the legacy MD5 challenge
    answer = mod.create_response(KEY, mod.parse_challenge(msg), False)
    mod.verify_response(KEY, nonce, answer, False)
    with pytest.raises(fastnet.AuthenticationError):
        mod.verify_response(KEY, nonce, answer, True)
    with pytest.raises(fastnet.AuthenticationError):
        mod.create_response(KEY, mod.parse_challenge(msg), True)


def test_digests_are_compared_in_constant_time():
    """The auth kernel (one source for both sets) compares with hmac.compare_digest, never ==."""
    src = inspect.getsource(pure_auth.verify_response)
    assert "hmac.compare_digest(" in src
    assert "== expected" not in src and "expected ==" not in src


def test_fresh_nonces():
    seen = {kauth.make_challenge("sha256")[1] for _ in range(1000)}
    assert len(seen) == 1000


def test_rpc_pickle_refused_on_an_unauthenticated_connection():
    with pytest.raises(ValueError, match="authenticated"):
        fastnet.RPCServer(("127.0.0.1", 0), codec="pickle")
    with pytest.raises(ValueError, match="authenticated"):
        fastnet.RPCServer(("127.0.0.1", 0), codec=("msgpack", "pickle"))
    # a keyless server that was told to accept pickle anyway still refuses it per
    # connection only when allowed; one that only speaks msgpack refuses a pickle hello
    with fastnet.RPCServer(("127.0.0.1", 0)) as srv:
        srv.register(lambda: "ok", "ping")
        srv.start()
        with pytest.raises(fastnet.ProtocolError, match="pickle"):
            fastnet.RPCProxy(srv.address, codec="pickle")
        with fastnet.Client(srv.address) as c:
            c.send_bytes(json.dumps({"fastnet-rpc": 1, "codec": "pickle"}).encode())
            reply = json.loads(c.recv_bytes())
            assert "error" in reply
            with pytest.raises(EOFError):
                c.recv_bytes()
        with fastnet.RPCProxy(srv.address) as p:
            assert p.ping() == "ok"
        assert srv.stats()["errors"]["codec"] == 2
