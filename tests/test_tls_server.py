"""fastnet.server over TLS: every stream server and concurrency mode, both handler styles.

Servers run in this process (``start()``); the clients of forking servers run
in a subprocess, since a child forked here would inherit their sockets and
keep those connections open. Certificates come from tests/tlsutil.py. Every
wait has a deadline and nothing asserts on timing.
"""
import json
import os
import socket
import ssl
import subprocess
import sys

import pytest

pytest.importorskip("cryptography.x509")

import fastnet  # noqa: E402
from fastnet.errors import AuthenticationError  # noqa: E402
from fastnet.server import (  # noqa: E402
    BaseRequestHandler,
    MessageHandler,
    PreforkTCPServer,
    StreamRequestHandler,
    TCPServer,
    ThreadingTCPServer,
    UDPServer,
    UnixDatagramServer,
    UnixServer,
)
from tlsutil import client_ctx, make_pki, server_ctx  # noqa: E402
from rpcutil import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 30.0
MODES = ["loop", "thread", "fork", "prefork"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


# -- handlers -------------------------------------------------------------------------

class FramedEcho(MessageHandler):
    def message_received(self, data):
        self.reply(b"%d:" % os.getpid() + data)


class WhoAmI(MessageHandler):
    """Replies with what the server knows of the client's certificate."""

    def message_received(self, data):
        cn = None
        if self.peercert:
            cn = dict(x[0] for x in self.peercert["subject"])["commonName"]
        self.reply(json.dumps({"verified": self.verified_client, "cn": cn}).encode())


class StreamEcho(StreamRequestHandler):
    """The Cookbook's echo (recipe 11.10 puts it behind SSL), the serving pid in front."""

    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"%d " % os.getpid() + line)


class PeerName(StreamRequestHandler):
    """A blocking handler reading the client's certificate off its SSLSocket."""

    def handle(self):
        cert = self.request.getpeercert()
        cn = dict(x[0] for x in cert["subject"])["commonName"] if cert else "-"
        self.wfile.write(cn.encode() + b"\n")


class ConnectionEcho(BaseRequestHandler):
    """Frames on the SSLSocket the handshakes handed over (authkey included)."""

    def handle(self):
        conn = fastnet.Connection(self.request)
        while True:
            try:
                data = conn.recv_bytes()
            except EOFError:
                break
            conn.send_bytes(b"%d:" % os.getpid() + data)


# -- clients --------------------------------------------------------------------------

CLIENT = r'''
import json, os, socket, ssl, sys, threading
sys.path.insert(0, sys.argv[1])
import fastnet
from fastnet import tls

cfg = json.loads(sys.argv[2])
addr = cfg["address"]
addr = tuple(addr) if isinstance(addr, list) else addr
kind, n, m = cfg["kind"], cfg["clients"], cfg["messages"]
key = bytes.fromhex(cfg["authkey"]) if cfg.get("authkey") else None
unix = isinstance(addr, str)
ctx = tls.client_context(cafile=cfg["cafile"], certfile=cfg.get("certfile"),
                         keyfile=cfg.get("keyfile"), check_hostname=not unix)
results = [None] * n


def connect():
    if kind in ("framed", "conn"):
        return fastnet.Client(addr, authkey=key, timeout=60, ssl_context=ctx)
    if unix:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(60)
        s.connect(addr)
    else:
        s = socket.create_connection(addr, timeout=60)
    return ctx.wrap_socket(s, server_hostname=None if unix else addr[0])


def one(i):
    pid = None
    done = 0
    c = None
    try:
        c = connect()
        f = c.makefile("rwb") if kind == "stream" else None
        for j in range(m):
            if kind == "stream":
                payload = b"client %d message %d %s\n" % (i, j, os.urandom(4).hex().encode())
                f.write(payload)
                f.flush()
                line = f.readline()
                p, _, rest = line.partition(b" ")
            else:
                payload = b"client %d message %d " % (i, j) + os.urandom(j % 13)
                c.send_bytes(payload)
                p, _, rest = c.recv_bytes().partition(b":")
            if rest != payload:
                raise AssertionError("reply %r to %r" % (rest, payload))
            if pid is not None and int(p) != pid:
                raise AssertionError("one connection, two pids")
            pid = int(p)
            done += 1
        if kind == "stream":
            f.close()
            # close_notify both ways: the handler sees the end, then the server says goodbye
            c = c.unwrap()
            if c.recv(10) != b"":
                raise AssertionError("data after the end")
        results[i] = {"pid": pid, "ok": True, "done": done}
    except BaseException as e:
        results[i] = {"pid": pid, "ok": False, "done": done, "error": repr(e)}
    finally:
        if c is not None:
            c.close()


threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in threads:
    t.start()
for t in threads:
    t.join(120)
print(json.dumps(results), flush=True)
'''


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_clients(pki, address, kind, clients, messages, mutual=False, authkey=None):
    """Clients in a subprocess; returns their results."""
    cfg = dict(address=address, kind=kind, clients=clients, messages=messages, cafile=pki["ca"])
    if mutual:
        cfg.update(certfile=pki["client"], keyfile=pki["client_key"])
    if authkey is not None:
        cfg["authkey"] = authkey.hex()
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, ROOT, json.dumps(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        out, err = proc.communicate(timeout=WAIT * 2)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"client process hung: {err.decode()[-2000:]}")
    assert proc.returncode == 0, err.decode()[-2000:]
    return json.loads(out.decode().strip().splitlines()[-1])


def check_all_ok(results, messages):
    bad = [r for r in results if not (r and r["ok"] and r["done"] == messages)]
    assert not bad, bad


def tls_client(pki, address, **kw):
    ctx = kw.pop("ctx", None) or client_ctx(pki)
    return fastnet.Client(address, timeout=WAIT, ssl_context=ctx, **kw)


def stream_client(pki, address, ctx=None):
    raw = socket.create_connection(address, WAIT)
    try:
        return (ctx or client_ctx(pki)).wrap_socket(raw, server_hostname=address[0])
    except BaseException:
        raw.close()
        raise


# -- every mode, both handler styles ---------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("authkey", [None, b"tls and key"], ids=["tls", "tls+authkey"])
def test_message_handler_over_tls(serve, pki, mode, authkey):
    srv = serve(TCPServer, ("127.0.0.1", 0), FramedEcho, concurrency=mode, workers=2,
                ssl_context=server_ctx(pki), authkey=authkey)
    results = run_clients(pki, srv.address, "framed", clients=4, messages=20, authkey=authkey)
    check_all_ok(results, 20)
    st = srv.stats()
    assert st["connections_total"] == 4 and st["handshake_failures"] == 0
    assert wait_for(lambda: srv.stats()["messages_in"] == 80)
    if mode in ("fork", "prefork"):
        assert os.getpid() not in {r["pid"] for r in results}


@pytest.mark.parametrize("mode", MODES)
def test_stream_request_handler_tls_echo(serve, pki, mode):
    srv = serve(TCPServer, ("127.0.0.1", 0), StreamEcho, concurrency=mode, workers=2,
                ssl_context=server_ctx(pki))
    results = run_clients(pki, srv.address, "stream", clients=3, messages=10)
    check_all_ok(results, 10)
    assert srv.stats()["handshake_failures"] == 0


def test_threading_and_prefork_server_classes(serve, pki):
    for cls, mode in ((ThreadingTCPServer, "thread"), (PreforkTCPServer, "prefork")):
        srv = serve(cls, ("127.0.0.1", 0), FramedEcho, ssl_context=server_ctx(pki), workers=2)
        assert srv.concurrency == mode
        check_all_ok(run_clients(pki, srv.address, "framed", clients=2, messages=5), 5)


@pytest.mark.parametrize("mode", ["loop", "thread", "prefork"])
def test_blocking_handler_with_authkey_inside_tls(serve, pki, mode):
    srv = serve(TCPServer, ("127.0.0.1", 0), ConnectionEcho, concurrency=mode, workers=2,
                ssl_context=server_ctx(pki), authkey=b"k")
    check_all_ok(run_clients(pki, srv.address, "conn", clients=2, messages=10, authkey=b"k"), 10)
    with pytest.raises(AuthenticationError):
        tls_client(pki, srv.address, authkey=b"wrong")
    assert wait_for(lambda: srv.stats()["handshake_failures"] == 1)


def test_unix_server_over_tls(serve, pki, tmp_path):
    path = str(tmp_path / "srv.sock")
    srv = serve(UnixServer, path, FramedEcho, ssl_context=server_ctx(pki))
    with fastnet.Client(path, timeout=WAIT, ssl_context=client_ctx(pki, check_hostname=False)) as c:
        big = os.urandom(2 << 20)
        c.send_bytes(big)
        assert c.recv_bytes() == b"%d:" % os.getpid() + big
    assert wait_for(lambda: srv.stats()["connections_open"] == 0)
    srv2 = serve(UnixServer, str(tmp_path / "stream.sock"), StreamEcho, concurrency="thread",
                 ssl_context=server_ctx(pki))
    check_all_ok(run_clients(pki, srv2.address, "stream", clients=2, messages=3), 3)


def test_stats_count_plaintext_frames(serve, pki):
    srv = serve(TCPServer, ("127.0.0.1", 0), FramedEcho, ssl_context=server_ctx(pki))
    with tls_client(pki, srv.address) as c:
        for m in (b"a", b"bb", b"ccc"):
            c.send_bytes(m)
            c.recv_bytes()
    assert wait_for(lambda: srv.stats()["connections_open"] == 0)
    st = srv.stats()
    reply = len(b"%d:" % os.getpid())
    assert (st["messages_in"], st["bytes_in"]) == (3, 3 * 4 + 6)
    assert (st["messages_out"], st["bytes_out"]) == (3, 3 * (4 + reply) + 6)


# -- certificates ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["loop", "thread"])
def test_mutual_tls_verified_client(serve, pki, mode):
    ctx = server_ctx(pki, cafile=pki["ca"], require_client_cert=True)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    srv = serve(TCPServer, ("127.0.0.1", 0), WhoAmI, concurrency=mode, ssl_context=ctx,
                handshake_timeout=WAIT)
    with tls_client(pki, srv.address, ctx=client_ctx(pki, mutual=True)) as c:
        c.send_bytes(b"?")
        assert json.loads(c.recv_bytes()) == {"verified": True, "cn": "client"}
    # without a certificate: refused (TLS 1.3 tells the client at its first read)
    with pytest.raises(AuthenticationError):
        with tls_client(pki, srv.address) as c:
            c.send_bytes(b"?")
            c.recv_bytes()
    assert wait_for(lambda: srv.stats()["handshake_failures"] == 1)
    # and the server goes on serving verified clients
    with tls_client(pki, srv.address, ctx=client_ctx(pki, mutual=True)) as c:
        c.send_bytes(b"?")
        assert json.loads(c.recv_bytes())["verified"] is True


def test_unverified_client_without_client_certificates(serve, pki):
    srv = serve(TCPServer, ("127.0.0.1", 0), WhoAmI, ssl_context=server_ctx(pki))
    # a certificate nobody asked for is not verified, so it counts for nothing
    with tls_client(pki, srv.address, ctx=client_ctx(pki, mutual=True)) as c:
        c.send_bytes(b"?")
        assert json.loads(c.recv_bytes()) == {"verified": False, "cn": None}


def test_mutual_tls_blocking_handler(serve, pki):
    ctx = server_ctx(pki, cafile=pki["ca"], require_client_cert=True)
    srv = serve(TCPServer, ("127.0.0.1", 0), PeerName, concurrency="thread", ssl_context=ctx)
    with stream_client(pki, srv.address, client_ctx(pki, mutual=True)) as s, s.makefile("rb") as f:
        assert f.readline() == b"client\n"
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with stream_client(pki, srv.address) as s:
            s.settimeout(WAIT)
            if s.recv(100) == b"":
                raise ConnectionError("closed")
    assert wait_for(lambda: srv.stats()["handshake_failures"] == 1)


@pytest.mark.parametrize("mode", ["loop", "fork", "prefork"])
@pytest.mark.parametrize("handler", [FramedEcho, StreamEcho], ids=["framed", "stream"])
def test_wrong_ca_and_expired_certificate_refused_and_counted(serve, pki, mode, handler):
    srv = serve(TCPServer, ("127.0.0.1", 0), handler, concurrency=mode, workers=1,
                ssl_context=server_ctx(pki), handshake_timeout=WAIT)
    with pytest.raises(AuthenticationError):
        tls_client(pki, srv.address, ctx=client_ctx(pki, cafile="ca2"))
    assert wait_for(lambda: srv.stats()["handshake_failures"] == 1)
    srv2 = serve(TCPServer, ("127.0.0.1", 0), handler, concurrency=mode, workers=1,
                 ssl_context=server_ctx(pki, "expired"), handshake_timeout=WAIT)
    with pytest.raises(AuthenticationError, match="expired"):
        tls_client(pki, srv2.address)
    assert wait_for(lambda: srv2.stats()["handshake_failures"] == 1)
    assert wait_for(lambda: srv.stats()["connections_open"] == 0)


# -- slow peers and limits ------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["loop", "thread", "prefork"])
@pytest.mark.parametrize("handler", [FramedEcho, StreamEcho], ids=["framed", "stream"])
def test_silent_tls_client_does_not_block_a_good_one(serve, pki, mode, handler):
    # one handler thread (thread mode) and one worker (prefork): the lurker must hold neither
    srv = serve(TCPServer, ("127.0.0.1", 0), handler, concurrency=mode, workers=1,
                worker_threads=1, ssl_context=server_ctx(pki), handshake_timeout=2.0)
    lurker = socket.create_connection(srv.address, WAIT)
    try:
        if handler is FramedEcho:
            with tls_client(pki, srv.address) as c:
                c.send_bytes(b"served")
                assert c.recv_bytes().endswith(b":served")
        else:
            with stream_client(pki, srv.address) as s, s.makefile("rwb") as f:
                f.write(b"served\n")
                f.flush()
                assert f.readline().endswith(b" served\n")
        assert srv.stats()["handshake_failures"] == 0
        # the lurker is cut off when its time is up
        lurker.settimeout(WAIT)
        try:
            assert lurker.recv(100) == b""
        except ConnectionResetError:
            pass
        assert wait_for(lambda: srv.stats()["handshake_failures"] == 1)
    finally:
        lurker.close()


def test_tls_handshakes_count_against_max_connections(serve, pki):
    srv = serve(TCPServer, ("127.0.0.1", 0), FramedEcho, ssl_context=server_ctx(pki),
                max_connections=1, overflow="refuse", handshake_timeout=1.0)
    lurker = socket.create_connection(srv.address, WAIT)
    try:
        assert wait_for(lambda: srv.stats()["connections_open"] == 1)
        with pytest.raises((AuthenticationError, ConnectionError, EOFError)):
            with tls_client(pki, srv.address) as c:
                c.send_bytes(b"x")
                c.recv_bytes()
        assert wait_for(lambda: srv.stats()["connections_refused"] == 1)
        assert wait_for(lambda: srv.stats()["handshake_failures"] == 1)
        with tls_client(pki, srv.address) as c:
            c.send_bytes(b"now")
            assert c.recv_bytes().endswith(b":now")
    finally:
        lurker.close()


@pytest.mark.parametrize("mode", ["loop", "thread", "prefork"])
def test_shutdown_with_a_pending_tls_handshake(pki, mode):
    srv = TCPServer(("127.0.0.1", 0), FramedEcho, concurrency=mode, workers=1,
                    ssl_context=server_ctx(pki), handshake_timeout=WAIT).start()
    lurker = socket.create_connection(srv.address, WAIT)
    try:
        assert wait_for(lambda: srv.stats()["connections_open"] == 1)
        srv.shutdown(timeout=WAIT)
        srv.server_close()
        assert srv.stats()["handshake_failures"] == 0
        assert srv.worker_pids == []
    finally:
        lurker.close()


@pytest.mark.parametrize("mode", ["loop", "thread"])
def test_no_descriptor_leaks(pki, mode):
    before = len(os.listdir("/proc/self/fd"))
    for handler in (FramedEcho, StreamEcho):
        srv = TCPServer(("127.0.0.1", 0), handler, concurrency=mode, ssl_context=server_ctx(pki),
                        authkey=b"k" if handler is FramedEcho else None,
                        handshake_timeout=1.0).start()
        try:
            for _ in range(2):
                if handler is FramedEcho:
                    with tls_client(pki, srv.address, authkey=b"k") as c:
                        c.send_bytes(b"x")
                        c.recv_bytes()
                    with pytest.raises(AuthenticationError):
                        tls_client(pki, srv.address, authkey=b"bad")
                else:
                    with stream_client(pki, srv.address) as s, s.makefile("rwb") as f:
                        f.write(b"x\n")
                        f.flush()
                        f.readline()
                with pytest.raises(AuthenticationError):
                    tls_client(pki, srv.address, ctx=client_ctx(pki, cafile="ca2"))
            lurker = socket.create_connection(srv.address, WAIT)
            want = 5 if handler is FramedEcho else 3
            assert wait_for(lambda: srv.stats()["handshake_failures"] == want)
            lurker.close()
            assert wait_for(lambda: srv.stats()["connections_open"] == 0)
        finally:
            srv.shutdown(timeout=5)
            srv.server_close()
    assert len(os.listdir("/proc/self/fd")) == before


# -- refusals -------------------------------------------------------------------------------

def test_datagram_servers_refuse_ssl_context(pki, tmp_path):
    with pytest.raises(ValueError, match="stream server"):
        UDPServer(("127.0.0.1", 0), StreamEcho, ssl_context=server_ctx(pki))
    with pytest.raises(ValueError, match="stream server"):
        UnixDatagramServer(str(tmp_path / "d.sock"), StreamEcho, ssl_context=server_ctx(pki))
    with pytest.raises(TypeError, match="SSLContext"):
        TCPServer(("127.0.0.1", 0), StreamEcho, ssl_context="cert.pem")
