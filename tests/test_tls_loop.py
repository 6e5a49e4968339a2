"""TLS on the event loop: TLSTransport under add_stream, create_server and connect.

Real sockets, a generated PKI (tests/tlsutil.py), both kernel sets (the suite
runs again with FASTNET_PURE=1). Every wait is bounded by a deadline and
nothing asserts on timing.
"""
import hashlib
import os
import socket
import ssl
import threading

import pytest

pytest.importorskip("cryptography.x509")

import fastnet  # noqa: E402
from fastnet import _kernels  # noqa: E402
from fastnet.errors import AuthenticationError, MessageTooLarge  # noqa: E402
from fastnet.loop import BACKENDS, EventLoop, FramedTransport, Protocol  # noqa: E402
from fastnet.tls import TLSTransport  # noqa: E402
from tlsutil import client_ctx, make_pki, server_ctx  # noqa: E402

WAIT = 20.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def loop():
    lp = EventLoop()
    yield lp
    if lp.is_running():
        lp.stop()
    lp.close()


class Echo(Protocol):
    def message_received(self, data):
        self.transport.send_bytes(data)


class Recorder(Protocol):
    """Keeps what arrived and how the connection ended."""

    def __init__(self):
        self.messages = []
        self.lost = []
        self.made = 0
        self.paused = 0
        self.resumed = 0

    def connection_made(self, transport):
        self.transport = transport
        self.made += 1

    def message_received(self, data):
        self.messages.append(data)

    def connection_lost(self, exc):
        self.lost.append(exc)

    def pause_writing(self):
        self.paused += 1

    def resume_writing(self):
        self.resumed += 1


class Servers:
    """Protocols a loop server made, so tests can look at the server side."""

    def __init__(self, cls=Recorder):
        self.cls = cls
        self.made = []

    def __call__(self):
        p = self.cls()
        self.made.append(p)
        return p


def connect(loop, address, pki, protocol=None, **kw):
    """A loop TLS client; returns (transport, protocol), or raises what the future holds."""
    kw.setdefault("ssl_context", client_ctx(pki))
    proto = protocol or Recorder()
    fut = loop.connect(address, lambda: proto, timeout=WAIT, **kw)
    assert loop.run_until(fut.done, WAIT), "connect did not finish"
    return fut.result(), proto


def in_thread(loop, fn):
    """Run fn() on a thread while the loop runs; returns its result or raises its error."""
    box = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:     # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert loop.run_until(lambda: not t.is_alive(), WAIT), "client thread hung"
    if "error" in box:
        raise box["error"]
    return box["result"]


def open_fds():
    return len(os.listdir("/proc/self/fd"))


# -- echo over TLS ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_loop_client_and_server_echo_over_tcp(pki, backend):
    with EventLoop(backend) as lp:
        server = lp.create_server(("127.0.0.1", 0), Echo, ssl_context=server_ctx(pki))
        t, rec = connect(lp, server.address, pki)
        assert isinstance(t, TLSTransport) and rec.made == 1
        msgs = [b"", b"x", os.urandom(1000), os.urandom(70000), os.urandom(300000)]
        for m in msgs:
            t.send_bytes(m)
        t.send_many(msgs)
        t.send_bytes(bytearray(b"from a bytearray"))
        t.send_bytes(memoryview(b"--sliced--")[2:-2])
        want = msgs + msgs + [b"from a bytearray", b"sliced"]
        assert lp.run_until(lambda: len(rec.messages) == len(want), WAIT)
        assert rec.messages == want
        assert t.messages_sent == t.messages_received == len(want)
        t.close()
        assert lp.run_until(lambda: rec.lost and server.transports == set(), WAIT)
        assert rec.lost == [None]
        server.close()


def test_unix_socket_echo(loop, pki, tmp_path):
    path = str(tmp_path / "tls.sock")
    server = loop.create_server(path, Echo, family="AF_UNIX", ssl_context=server_ctx(pki))
    with pytest.raises(ValueError, match="check_hostname"):
        loop.connect(path, Recorder, family="AF_UNIX", ssl_context=client_ctx(pki))
    t, rec = connect(loop, path, pki, family="AF_UNIX",
                     ssl_context=client_ctx(pki, check_hostname=False))
    data = os.urandom(3 << 20)
    t.send_bytes(data)
    t.send_bytes(b"after")
    assert loop.run_until(lambda: len(rec.messages) == 2, WAIT)
    assert rec.messages == [data, b"after"]
    t.close()
    assert loop.run_until(lambda: rec.lost, WAIT)
    server.close()
    assert not os.path.exists(path)


def test_counters_count_plaintext_frames_and_extra_info(loop, pki):
    servers = Servers()
    server = loop.create_server(("127.0.0.1", 0), servers, ssl_context=server_ctx(pki))
    t, rec = connect(loop, server.address, pki)
    t.send_bytes(b"hello")
    assert loop.run_until(lambda: servers.made and servers.made[0].messages, WAIT)
    st = servers.made[0].transport
    # as FramedTransport: frames on the (plaintext) wire, 4-byte headers included
    assert (t.messages_sent, t.bytes_sent) == (1, 9)
    assert (st.messages_received, st.bytes_received) == (1, 9)
    assert st.get_extra_info("peername") == t.get_extra_info("sockname")
    assert t.get_extra_info("socket") is t.socket and t.fileno() == t.socket.fileno()
    assert t.get_extra_info("peercert")["subject"] == ((("commonName", "localhost"),),)
    assert st.get_extra_info("peercert") is None   # no client certificate asked for
    name, version, bits = t.get_extra_info("cipher")
    assert version in ("TLSv1.2", "TLSv1.3") and bits >= 128
    assert isinstance(t.get_extra_info("ssl_object"), ssl.SSLObject)
    assert t.get_extra_info("sslcontext") is t.get_extra_info("ssl_object").context
    assert t.get_extra_info("nonsense", 42) == 42
    assert t in loop.transports and st in loop.transports
    t.close()
    assert loop.run_until(lambda: rec.lost, WAIT)
    assert t.closed and t.fileno() == -1
    with pytest.raises(ConnectionError):
        t.send_bytes(b"late")
    server.close()


def test_tls12_also_works(loop, pki):
    server = loop.create_server(("127.0.0.1", 0), Echo, ssl_context=server_ctx(pki))
    t, rec = connect(loop, server.address, pki,
                     ssl_context=client_ctx(pki, version=ssl.TLSVersion.TLSv1_2))
    assert t.get_extra_info("ssl_object").version() == "TLSv1.2"
    t.send_bytes(b"old")
    assert loop.run_until(lambda: rec.messages, WAIT) and rec.messages == [b"old"]
    t.close()
    server.close()


# -- blocking peers: fastnet.Client and fastnet.Listener ------------------------------------

def test_blocking_client_to_loop_server(loop, pki):
    server = loop.create_server(("127.0.0.1", 0), Echo, ssl_context=server_ctx(pki))

    def client():
        with fastnet.Client(server.address, timeout=WAIT, ssl_context=client_ctx(pki)) as c:
            c.send({"a": [1, 2, 3]})
            obj = c.recv()
            big = os.urandom(5 << 20)
            c.send_bytes(big)
            return obj, c.recv_bytes() == big

    assert in_thread(loop, client) == ({"a": [1, 2, 3]}, True)
    server.close()


def test_authkey_inside_tls_with_blocking_client(loop, pki):
    server = loop.create_server(("127.0.0.1", 0), Echo, ssl_context=server_ctx(pki),
                                authkey=b"secret", handshake_timeout=WAIT)

    def client(key):
        with fastnet.Client(server.address, authkey=key, timeout=WAIT,
                            ssl_context=client_ctx(pki)) as c:
            c.send_bytes(b"in")
            return c.recv_bytes()

    assert in_thread(loop, lambda: client(b"secret")) == b"in"
    with pytest.raises(AuthenticationError):
        in_thread(loop, lambda: client(b"wrong"))
    assert loop.run_until(lambda: server.handshake_failures == 1, WAIT)
    # the same server goes on serving
    assert in_thread(loop, lambda: client(b"secret")) == b"in"
    assert server.handshake_failures == 1
    server.close()


def test_loop_client_with_authkey_to_blocking_listener(loop, pki):
    # the client side of the authkey handshake, against fastnet.auth's server side
    with fastnet.Listener(("127.0.0.1", 0), authkey=b"k", ssl_context=server_ctx(pki),
                          handshake_timeout=WAIT) as lst:
        box = {}

        def serve():
            try:
                with lst.accept() as c:
                    c.send_bytes(c.recv_bytes() * 2)
                    box["eof"] = c.recv_bytes() if c.poll(WAIT) else None
            except EOFError:
                box["eof"] = "eof"
            except BaseException as e:   # noqa: BLE001
                box["error"] = e

        th = threading.Thread(target=serve, daemon=True)
        th.start()
        t, rec = connect(loop, lst.address, pki, authkey=b"k")
        t.send_bytes(b"ab")
        assert loop.run_until(lambda: rec.messages, WAIT)
        assert rec.messages == [b"abab"]
        t.close()
        assert loop.run_until(lambda: not th.is_alive(), WAIT)
        assert box.get("eof") == "eof", box

        th = threading.Thread(target=serve, daemon=True)
        th.start()
        with pytest.raises(AuthenticationError):
            connect(loop, lst.address, pki, authkey=b"wrong key")
        assert loop.run_until(lambda: not th.is_alive(), WAIT)
        assert isinstance(box.get("error"), AuthenticationError)


def test_loop_client_and_server_with_authkey(loop, pki):
    servers = Servers(Echo)
    server = loop.create_server(("127.0.0.1", 0), servers, ssl_context=server_ctx(pki),
                                authkey=b"shared", handshake_timeout=WAIT)
    t, rec = connect(loop, server.address, pki, authkey=b"shared")
    t.send_bytes(b"ok")
    assert loop.run_until(lambda: rec.messages, WAIT) and rec.messages == [b"ok"]
    with pytest.raises(AuthenticationError):
        connect(loop, server.address, pki, authkey=b"not shared")
    assert loop.run_until(lambda: server.handshake_failures == 1, WAIT)
    assert len(servers.made) == 2 and servers.made[1].transport is None   # never made
    t.close()
    server.close()


# -- certificates --------------------------------------------------------------------------

def test_mutual_tls(loop, pki):
    servers = Servers()
    ctx = server_ctx(pki, cafile=pki["ca"], require_client_cert=True)
    server = loop.create_server(("127.0.0.1", 0), servers, ssl_context=ctx, handshake_timeout=WAIT)
    t, rec = connect(loop, server.address, pki, ssl_context=client_ctx(pki, mutual=True))
    t.send_bytes(b"who")
    assert loop.run_until(lambda: servers.made and servers.made[0].messages, WAIT)
    peer = servers.made[0].transport.get_extra_info("peercert")
    assert peer["subject"] == ((("commonName", "client"),),)

    # no client certificate: refused and counted; under TLS 1.3 the client only
    # learns it from the server's alert, after its own side of the handshake
    for version in (None, ssl.TLSVersion.TLSv1_2):
        made = len(servers.made)
        failures = server.handshake_failures
        try:
            t2, rec2 = connect(loop, server.address, pki, ssl_context=client_ctx(pki, version=version))
        except AuthenticationError:
            pass
        else:
            assert loop.run_until(lambda: rec2.lost, WAIT)
            assert isinstance(rec2.lost[0], AuthenticationError)
        assert loop.run_until(lambda: server.handshake_failures == failures + 1, WAIT)
        assert servers.made[made].made == 0

    # and the server keeps serving the verified client
    t.send_bytes(b"still")
    assert loop.run_until(lambda: len(servers.made[0].messages) == 2, WAIT)
    t.close()
    server.close()


def test_wrong_ca_refused(loop, pki):
    server = loop.create_server(("127.0.0.1", 0), Echo, ssl_context=server_ctx(pki),
                                handshake_timeout=WAIT)
    with pytest.raises(AuthenticationError) as ei:
        connect(loop, server.address, pki, ssl_context=client_ctx(pki, cafile="ca2"))
    assert isinstance(ei.value.__cause__, ssl.SSLCertVerificationError)
    assert loop.run_until(lambda: server.handshake_failures == 1, WAIT)
    t, rec = connect(loop, server.address, pki)
    t.send_bytes(b"fine")
    assert loop.run_until(lambda: rec.messages, WAIT)
    server.close()


def test_expired_server_certificate_refused(loop, pki):
    server = loop.create_server(("127.0.0.1", 0), Echo, ssl_context=server_ctx(pki, "expired"),
                                handshake_timeout=WAIT)
    with pytest.raises(AuthenticationError, match="expired"):
        connect(loop, server.address, pki)
    assert loop.run_until(lambda: server.handshake_failures == 1, WAIT)
    server.close()


def test_hostname_checked(loop, pki):
    server = loop.create_server(("127.0.0.1", 0), Echo, ssl_context=server_ctx(pki, "other_host"),
                                handshake_timeout=WAIT)
    with pytest.raises(AuthenticationError, match="mismatch|match"):
        connect(loop, server.address, pki)
    # the name the certificate does carry, asked for explicitly
    t, rec = connect(loop, server.address, pki, server_hostname="example.com")
    t.send_bytes(b"named")
    assert loop.run_until(lambda: rec.messages, WAIT)
    # or no name checked at all
    t2, rec2 = connect(loop, server.address, pki, ssl_context=client_ctx(pki, check_hostname=False))
    t2.send_bytes(b"unnamed")
    assert loop.run_until(lambda: rec2.messages, WAIT)
    t.close()
    t2.close()
    server.close()


def test_plain_client_to_tls_server_is_refused(loop, pki):
    server = loop.create_server(("127.0.0.1", 0), Echo, ssl_context=server_ctx(pki),
                                handshake_timeout=WAIT)

    def plain():
        with fastnet.Client(server.address, timeout=WAIT) as c:
            c.send_bytes(b"not TLS")
            return c.recv_bytes()

    with pytest.raises((EOFError, ConnectionError, fastnet.ProtocolError, MessageTooLarge)):
        in_thread(loop, plain)
    assert loop.run_until(lambda: server.handshake_failures == 1, WAIT)
    server.close()


# -- big frames, backpressure, limits ----------------------------------------------------

@pytest.mark.parametrize("size", [8 << 20, 64 << 20])
def test_large_frames_with_send_many(loop, pki, size):
    class Digest(Protocol):
        def message_received(self, data):
            self.transport.send_bytes(b"%d %s" % (len(data), hashlib.sha256(data).hexdigest().encode()))

    server = loop.create_server(("127.0.0.1", 0), Digest, ssl_context=server_ctx(pki),
                                max_message_size=size)
    t, rec = connect(loop, server.address, pki)
    big = os.urandom(size)
    view = memoryview(bytearray(big))
    t.send_many([b"head", big, b"tail"])
    t.send_bytes(view)                  # a buffer the caller may reuse once we return
    view[:8] = b"\0" * 8
    want = [b"%d %s" % (len(d), hashlib.sha256(d).hexdigest().encode())
            for d in (b"head", big, b"tail", big)]
    assert loop.run_until(lambda: len(rec.messages) == 4, WAIT * 3)
    assert rec.messages == want
    t.close()
    server.close()


def test_large_frames_both_ways(loop, pki):
    server = loop.create_server(("127.0.0.1", 0), Echo, ssl_context=server_ctx(pki))
    t, rec = connect(loop, server.address, pki)
    # the echo comes back while we still send: our reading must not stop on our own queue
    t.set_write_buffer_limits(high=64 << 20)
    frames = [os.urandom(8 << 20), os.urandom(12345), os.urandom(3 << 20)]
    t.send_many(frames)
    assert loop.run_until(lambda: len(rec.messages) == 3, WAIT * 3)
    assert rec.messages == frames
    server.close()


def test_backpressure_pause_and_resume_writing(loop, pki):
    class Flood(Recorder):
        def message_received(self, data):
            self.messages.append(data)
            # more than the kernel's socket buffers hold between the two ends
            for _ in range(512):
                self.transport.send_bytes(b"z" * 65536)

    servers = Servers(Flood)
    server = loop.create_server(("127.0.0.1", 0), servers, ssl_context=server_ctx(pki),
                                high_water=256 << 10, low_water=64 << 10)
    t, rec = connect(loop, server.address, pki)
    t.pause_reading()        # a slow client: nothing of the flood is read for now
    assert t.reading_paused
    t.send_bytes(b"go")
    assert loop.run_until(lambda: servers.made and servers.made[0].paused, WAIT)
    st = servers.made[0].transport
    assert st.get_write_buffer_limits() == (64 << 10, 256 << 10)
    assert st.get_write_buffer_size() > 256 << 10 and st.reading_paused and st.pauses == 1
    assert rec.messages == []
    t.resume_reading()
    assert loop.run_until(lambda: len(rec.messages) == 512, WAIT)
    assert servers.made[0].resumed == 1 and not st.reading_paused
    assert loop.run_until(lambda: st.get_write_buffer_size() == 0, WAIT)
    assert all(m == b"z" * 65536 for m in rec.messages)
    t.close()
    server.close()


def test_tls_and_plain_transports_share_one_flow_control_base():
    base = _kernels.reactor.TransportBase
    assert issubclass(TLSTransport, base) and issubclass(FramedTransport, base)
    # neither keeps a copy of its own: flow control, state and closing are the base's
    for name in ("pause_reading", "resume_reading", "reading_paused", "set_write_buffer_limits",
                 "get_write_buffer_limits", "get_write_buffer_size", "pauses", "closed", "is_closing", "close", "abort", "fileno", "socket",
                 "loop", "max_message_size", "protocol"):
        assert hasattr(base, name)
        assert name not in vars(TLSTransport) and name not in vars(FramedTransport), name


HIGH, LOW = 256 << 10, 64 << 10


class FloodOnGo(Recorder):
    """Floods its peer on b"go"; logs what the transport says at each flow-control callback."""

    def __init__(self):
        super().__init__()
        self.log = []

    def message_received(self, data):
        self.messages.append(data)
        if data == b"go":
            # more than the kernel's socket buffers hold between the two ends
            for _ in range(512):
                self.transport.send_bytes(b"z" * 65536)

    def _note(self, what):
        t = self.transport
        self.log.append((what, t.get_write_buffer_size(), t.reading_paused, t.pauses))

    def pause_writing(self):
        self._note("pause")

    def resume_writing(self):
        self._note("resume")


def _flood_against_a_slow_reader(loop, pki, tls):
    """A server floods a client that does not read, then does: what the server's side went through."""
    servers = Servers(FloodOnGo)
    server = loop.create_server(("127.0.0.1", 0), servers, ssl_context=server_ctx(pki) if tls else None,
                                high_water=HIGH, low_water=LOW)
    t, rec = connect(loop, server.address, pki, ssl_context=client_ctx(pki) if tls else None)
    t.pause_reading()
    t.send_bytes(b"go")
    assert loop.run_until(lambda: servers.made and servers.made[0].log, WAIT)
    srv = servers.made[0]
    st = srv.transport
    assert isinstance(st, TLSTransport) == tls
    # over the high-water mark the server stops reading: a frame sent now waits
    t.send_bytes(b"meanwhile")
    assert loop.run_until(lambda: t.get_write_buffer_size() == 0, WAIT)
    loop.run_until(0.2)
    assert srv.messages == [b"go"]
    t.resume_reading()
    assert loop.run_until(lambda: len(rec.messages) == 512 and len(srv.messages) == 2, WAIT)
    assert loop.run_until(lambda: st.get_write_buffer_size() == 0, WAIT)
    assert all(m == b"z" * 65536 for m in rec.messages)
    seen = [(what, size > HIGH if what == "pause" else size <= LOW, paused, pauses)
            for what, size, paused, pauses in srv.log]
    end = (st.pauses, st.reading_paused, srv.messages)
    t.close()
    server.close()
    return seen, end


def test_tls_write_buffer_limits_pause_and_resume_as_plain(loop, pki):
    plain = _flood_against_a_slow_reader(loop, pki, tls=False)
    # one pause over the high mark with reading stopped, one resume at the low mark with reading on
    assert plain == ([("pause", True, True, 1), ("resume", True, False, 1)],
                     (1, False, [b"go", b"meanwhile"]))
    assert _flood_against_a_slow_reader(loop, pki, tls=True) == plain


def test_pause_reading_keeps_decrypted_frames_for_later(loop, pki):
    servers = Servers(Echo)
    server = loop.create_server(("127.0.0.1", 0), servers, ssl_context=server_ctx(pki))

    class PauseAfterFirst(Recorder):
        def message_received(self, data):
            self.messages.append(data)
            if len(self.messages) == 1:
                self.transport.pause_reading()

    t, rec = connect(loop, server.address, pki, protocol=PauseAfterFirst())
    t.send_many([b"1", b"2", b"3"])     # one TLS record: all three decrypted together
    assert loop.run_until(lambda: rec.messages, WAIT)
    loop.run_until(0.1)
    assert rec.messages == [b"1"]
    t.resume_reading()
    assert loop.run_until(lambda: len(rec.messages) == 3, WAIT)
    assert rec.messages == [b"1", b"2", b"3"]
    t.close()
    server.close()


def test_oversize_frame_closes_only_that_connection(loop, pki):
    class EchoRecorder(Recorder):
        def message_received(self, data):
            self.messages.append(data)
            self.transport.send_bytes(data)

    servers = Servers(EchoRecorder)
    server = loop.create_server(("127.0.0.1", 0), servers, ssl_context=server_ctx(pki),
                                max_message_size=1 << 20)
    good, grec = connect(loop, server.address, pki)
    bad, brec = connect(loop, server.address, pki)
    assert loop.run_until(lambda: len(servers.made) == 2 and all(p.made for p in servers.made), WAIT)
    sgood, sbad = servers.made
    bad.set_write_buffer_limits(high=64 << 20)
    bad.send_bytes(os.urandom((1 << 20) + 1))
    assert loop.run_until(lambda: sbad.lost and brec.lost, WAIT)
    assert isinstance(sbad.lost[0], MessageTooLarge) and sbad.messages == []

    good.send_bytes(b"alive")
    assert loop.run_until(lambda: grec.messages, WAIT) and grec.messages == [b"alive"]
    assert not grec.lost and not sgood.lost and not sgood.transport.closed
    good.close()
    server.close()


def test_oversize_frame_reaches_connection_lost(loop, pki):
    servers = Servers()
    server = loop.create_server(("127.0.0.1", 0), servers, ssl_context=server_ctx(pki),
                                max_message_size=1000)
    t, rec = connect(loop, server.address, pki)
    t.send_bytes(b"a" * 1000)
    t.send_bytes(b"b" * 1001)
    assert loop.run_until(lambda: servers.made and servers.made[0].lost, WAIT)
    assert servers.made[0].messages == [b"a" * 1000]
    assert isinstance(servers.made[0].lost[0], MessageTooLarge)
    assert loop.run_until(lambda: rec.lost, WAIT)
    server.close()


def test_handler_error_closes_that_connection(loop, pki, caplog):
    class Boom(Recorder):
        def message_received(self, data):
            raise RuntimeError("boom")

    servers = Servers(Boom)
    server = loop.create_server(("127.0.0.1", 0), servers, ssl_context=server_ctx(pki))
    t, rec = connect(loop, server.address, pki)
    t.send_bytes(b"x")
    assert loop.run_until(lambda: servers.made and servers.made[0].lost, WAIT)
    assert isinstance(servers.made[0].lost[0], RuntimeError)
    assert loop.run_until(lambda: rec.lost, WAIT)
    server.close()


# -- slow and silent peers ------------------------------------------------------------------

@pytest.mark.parametrize("send", [b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"],
                         ids=["silent", "half-hello"])
def test_silent_peer_mid_handshake_blocks_no_one(loop, pki, send):
    server = loop.create_server(("127.0.0.1", 0), Echo, ssl_context=server_ctx(pki),
                                handshake_timeout=1.0)
    lurker = socket.create_connection(server.address, WAIT)
    try:
        if send:
            lurker.sendall(send)
        assert loop.run_until(lambda: len(server.transports) == 1, WAIT)
        (pending,) = server.transports
        assert not pending.handshake_done
        # another client is served while the lurker holds its handshake open
        t, rec = connect(loop, server.address, pki)
        t.send_bytes(b"served")
        assert loop.run_until(lambda: rec.messages, WAIT) and rec.messages == [b"served"]
        assert not pending.closed and server.handshake_failures == 0
        # and the lurker is cut off once its time is up
        assert loop.run_until(lambda: server.handshake_failures == 1, WAIT)
        assert pending.closed
        lurker.settimeout(WAIT)
        try:
            assert lurker.recv(100) == b""
        except ConnectionResetError:
            pass
        t.close()
    finally:
        lurker.close()
    server.close()


def test_client_handshake_timeout_against_a_silent_server(loop, pki):
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        fut = loop.connect(silent.getsockname(), Recorder, ssl_context=client_ctx(pki),
                           handshake_timeout=0.5)
        assert loop.run_until(fut.done, WAIT)
        assert isinstance(fut.exception(), fastnet.TimeoutError)
    finally:
        silent.close()


def test_on_fail_hook_of_add_stream(loop, pki):
    a, b = socket.socketpair()
    fails = []
    rec = Recorder()
    t = loop.add_stream(a, rec, ssl_context=client_ctx(pki, check_hostname=False),
                        handshake_timeout=WAIT, on_fail=fails.append)
    b.sendall(b"this is no TLS server hello, just text\n" * 4)
    assert loop.run_until(lambda: fails, WAIT)
    assert isinstance(fails[0], AuthenticationError) and t.closed
    loop.run_until(0.05)
    assert rec.made == 0 and rec.lost == []        # never made: no connection_lost
    b.close()

    # closing it ourselves during the handshake reports None
    a, b = socket.socketpair()
    fails = []
    t = loop.add_stream(a, Recorder(), ssl_context=client_ctx(pki, check_hostname=False),
                        on_fail=fails.append)
    t.close()
    assert loop.run_until(lambda: fails, WAIT) and fails == [None]
    b.close()


# -- closing -----------------------------------------------------------------------------

def test_close_flushes_queued_data_then_close_notify(loop, pki):
    servers = Servers()
    server = loop.create_server(("127.0.0.1", 0), servers, ssl_context=server_ctx(pki))
    t, rec = connect(loop, server.address, pki)
    t.set_write_buffer_limits(high=64 << 20)
    big = os.urandom(6 << 20)
    t.send_bytes(big)
    t.send_many([b"tail1", b"tail2"])
    assert t.get_write_buffer_size() > 0
    t.close()
    assert t.is_closing() and not t.closed
    assert loop.run_until(lambda: servers.made and servers.made[0].lost, WAIT)
    # a clean end: everything arrived, then the close_notify (no truncation error)
    assert servers.made[0].messages == [big, b"tail1", b"tail2"]
    assert servers.made[0].lost == [None]
    assert loop.run_until(lambda: rec.lost, WAIT) and rec.lost == [None]
    server.close()


@pytest.mark.parametrize("how", ["close", "unwrap"])
def test_peer_ends_with_or_without_close_notify(loop, pki, how):
    servers = Servers()
    server = loop.create_server(("127.0.0.1", 0), servers, ssl_context=server_ctx(pki))

    def client():
        raw = socket.create_connection(server.address, WAIT)
        s = client_ctx(pki).wrap_socket(raw, server_hostname="127.0.0.1")
        s.sendall(len(b"bye").to_bytes(4, "big") + b"bye")
        if how == "close":
            s.close()           # no close_notify: a bare end of the stream
            return None
        # close_notify, then wait for the server's
        plain = s.unwrap()
        try:
            return plain.recv(10)
        finally:
            plain.close()

    assert in_thread(loop, client) in (None, b"")
    assert loop.run_until(lambda: servers.made and servers.made[0].lost, WAIT)
    assert servers.made[0].messages == [b"bye"] and servers.made[0].lost == [None]
    server.close()


def test_server_shutdown_closes_pending_handshakes(loop, pki):
    server = loop.create_server(("127.0.0.1", 0), Echo, ssl_context=server_ctx(pki),
                                handshake_timeout=WAIT)
    lurker = socket.create_connection(server.address, WAIT)
    try:
        assert loop.run_until(lambda: server.transports, WAIT)
        (pending,) = server.transports
        server.shutdown()
        assert pending.closed
        loop.run_until(0.05)
        assert server.handshake_failures == 0     # closed by us, not failed
    finally:
        lurker.close()


def test_loop_close_ends_tls_transports(pki):
    lp = EventLoop()
    server = lp.create_server(("127.0.0.1", 0), Echo, ssl_context=server_ctx(pki))
    t, rec = connect(lp, server.address, pki)
    lurker = socket.create_connection(server.address, WAIT)
    fails = []
    a, b = socket.socketpair()
    pending = lp.add_stream(a, Recorder(), ssl_context=client_ctx(pki, check_hostname=False),
                            on_fail=fails.append)
    lp.close()
    assert t.closed and pending.closed and rec.lost == [None] and fails == [None]
    lurker.close()
    b.close()


def test_no_descriptor_leaks(pki):
    before = open_fds()
    with EventLoop() as lp:
        server = lp.create_server(("127.0.0.1", 0), Echo, ssl_context=server_ctx(pki),
                                  authkey=b"k", handshake_timeout=0.5)
        for _ in range(3):
            t, rec = connect(lp, server.address, pki, authkey=b"k")
            t.send_bytes(b"x" * 100000)
            assert lp.run_until(lambda: rec.messages, WAIT)
            t.close()
            assert lp.run_until(lambda: rec.lost, WAIT)
        for kw in ({"authkey": b"bad"}, {"ssl_context": client_ctx(pki, cafile="ca2")}):
            with pytest.raises(AuthenticationError):
                connect(lp, server.address, pki, **kw)
        lurker = socket.create_connection(server.address, WAIT)
        assert lp.run_until(lambda: server.handshake_failures == 3, WAIT)
        lurker.close()
        t, rec = connect(lp, server.address, pki, authkey=b"k")   # left open for close()
        server.close()
    assert t.closed
    assert open_fds() == before


def test_bad_arguments(loop, pki):
    a, b = socket.socketpair()
    try:
        with pytest.raises(ValueError, match="ssl_context"):
            loop.add_stream(a, Recorder(), authkey=b"k")
        with pytest.raises(TypeError):
            loop.add_stream(a, Recorder(), ssl_context=client_ctx(pki), authkey="text",
                            server_hostname="localhost")
        with pytest.raises(TypeError):
            loop.add_stream(a, Recorder(), ssl_context="not a context")
    finally:
        a.close()
        b.close()
    with pytest.raises(ValueError, match="ssl_context"):
        loop.create_server(("127.0.0.1", 0), Echo, authkey=b"k")
    with pytest.raises(ValueError, match="ssl_context"):
        loop.connect(("127.0.0.1", 1), Recorder, authkey=b"k")
