"""fastnet.server as a drop-in for socketserver: the hooks, attributes and names
socketserver documents, with real sockets, real client threads and real forks.

Each test is written as a socketserver user's code meets the classes; every wait
has a deadline and nothing asserts on timing.
"""
import multiprocessing
import os
import socket
import socketserver
import ssl
import threading

import pytest

import fastnet
import fastnet.server as fs
from rpcutil import wait_for

WAIT = 30.0
HOST = "127.0.0.1"


class LineEcho(socketserver.StreamRequestHandler):
    def handle(self):
        line = self.rfile.readline()
        self.wfile.write(line)


class DatagramEcho(socketserver.DatagramRequestHandler):
    def handle(self):
        self.wfile.write(self.rfile.read())


def pickaddr(family, tmp_path):
    """What CPython's own socketserver tests do: the address follows the class's family."""
    if family == socket.AF_INET:
        return (HOST, 0)
    return str(tmp_path / "s.sock")


def talk(addr, payload=b"hello\n", family=None):
    family = family or (socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET)
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(WAIT)
        s.connect(addr)
        s.sendall(payload)
        return s.makefile("rb").readline()


def talk_dgram(addr, tmp_path, payload=b"hello\n"):
    family = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(WAIT)
        if family == socket.AF_UNIX:
            s.bind(str(tmp_path / "client.sock"))
        s.sendto(payload, addr)
        return s.recv(100)


def in_thread(fn, *args):
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


# -- names and address_family -------------------------------------------------------

def test_every_socketserver_class_has_a_fastnet_counterpart():
    names = [n for n in dir(socketserver)
             if not n.startswith("_") and isinstance(getattr(socketserver, n), type)
             and getattr(socketserver, n).__module__ == "socketserver"]
    missing = [n for n in names if not hasattr(fs, n)]
    assert not missing
    for n in names:
        assert n in fs.__all__
    # a fastnet server is what an isinstance check against socketserver's mixins expects
    assert issubclass(fs.ThreadingTCPServer, socketserver.ThreadingMixIn)
    assert issubclass(fs.ForkingUnixStreamServer, socketserver.ForkingMixIn)


STREAM_CLASSES = ["TCPServer", "ThreadingTCPServer", "ForkingTCPServer",
                  "UnixStreamServer", "ThreadingUnixStreamServer", "ForkingUnixStreamServer"]
DGRAM_CLASSES = ["UDPServer", "ThreadingUDPServer", "ForkingUDPServer",
                 "UnixDatagramServer", "ThreadingUnixDatagramServer", "ForkingUnixDatagramServer"]


@pytest.mark.parametrize("name", STREAM_CLASSES + DGRAM_CLASSES)
def test_address_family_is_socketservers_and_picks_the_address(name, tmp_path):
    cls = getattr(fs, name)
    # socketserver's (ForkingUnix* from Python 3.12)
    assert cls.address_family == (socket.AF_UNIX if "Unix" in name else socket.AF_INET)
    with cls(pickaddr(cls.address_family, tmp_path), DatagramEcho if "Datagram" in name or "UDP" in name
             else LineEcho) as srv:
        assert srv.address_family == cls.address_family
        assert srv.server_address == srv.socket.getsockname()
        srv.start()
        if name in DGRAM_CLASSES:
            assert talk_dgram(srv.server_address, tmp_path) == b"hello\n"
        else:
            assert talk(srv.server_address) == b"hello\n"
        if name.startswith("Forking"):
            assert srv.concurrency == "fork"


def test_ipv6_by_subclass_and_by_address():
    class V6Server(fs.TCPServer):
        address_family = socket.AF_INET6

    with V6Server(("::1", 0), LineEcho) as srv:
        assert srv.socket.family == socket.AF_INET6
        srv.start()
        assert talk(srv.server_address[:2], family=socket.AF_INET6) == b"hello\n"
    # no family set by a subclass: fastnet's own classes follow the address
    with fs.ThreadingTCPServer(("::1", 0), LineEcho) as srv:
        assert srv.address_family == socket.AF_INET6
        assert fs.ThreadingTCPServer.address_family == socket.AF_INET
    # a subclass that says AF_INET means it (socket.gaierror, as with socketserver)
    class V4Server(fs.TCPServer):
        address_family = socket.AF_INET

    with pytest.raises(OSError):
        V4Server(("::1", 0), LineEcho)


def test_unix_family_by_subclass_of_tcpserver(tmp_path):
    # socketserver's own UnixStreamServer is TCPServer with address_family = AF_UNIX
    class MyUnixServer(fs.TCPServer):
        address_family = socket.AF_UNIX

    with MyUnixServer(str(tmp_path / "u.sock"), LineEcho) as srv:
        srv.start()
        assert talk(srv.server_address) == b"hello\n"


# -- handle_request, handle_timeout ---------------------------------------------------

@pytest.mark.parametrize("mode", ["loop", "thread", "fork", "prefork"])
def test_handle_request_serves_exactly_one(mode):
    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"%d " % os.getpid() + self.rfile.readline().upper())

    srv = fs.TCPServer((HOST, 0), Handler, concurrency=mode)
    try:
        replies = []
        client = in_thread(lambda: replies.append(talk(srv.server_address, b"one\n")))
        srv.handle_request()
        client.join(WAIT)
        pid, reply = replies[0].split()
        assert reply == b"ONE"
        assert (int(pid) == os.getpid()) == (mode in ("loop", "thread"))
        # a second client waits in the backlog until the next handle_request()
        with socket.create_connection(srv.server_address, timeout=WAIT) as s:
            s.sendall(b"two\n")
            srv.handle_request()
            assert s.makefile("rb").readline().split()[1] == b"TWO"
    finally:
        srv.server_close()


def test_handle_request_times_out_into_handle_timeout():
    calls = []

    class Server(fs.TCPServer):
        timeout = 0.05

        def handle_timeout(self):
            calls.append("timeout")

    with Server((HOST, 0), LineEcho) as srv:
        assert srv.handle_request() is None
        assert calls == ["timeout"]
        # the listening socket's own timeout counts too, as in socketserver
        srv.timeout = None
        srv.socket.settimeout(0.05)
        srv.handle_request()
        assert calls == ["timeout", "timeout"]


def test_handle_request_runs_the_authkey_handshake():
    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            conn = fastnet.Connection(self.request)
            conn.send_bytes(conn.recv_bytes() + b"!")

    with fs.TCPServer((HOST, 0), Echo, authkey=b"key") as srv:
        out = []

        def client():
            with fastnet.Client(srv.server_address, authkey=b"key", timeout=WAIT) as c:
                c.send_bytes(b"hi")
                out.append(c.recv_bytes())

        t = in_thread(client)
        srv.handle_request()
        t.join(WAIT)
        assert out == [b"hi!"]


def test_handle_request_is_refused_for_a_message_handler():
    class Framed(fastnet.MessageHandler):
        def message_received(self, data):
            self.reply(data)

    with fs.TCPServer((HOST, 0), Framed) as srv:
        with pytest.raises(TypeError, match="handle_request"):
            srv.handle_request()


# -- get_request and process_request overrides ------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pytest.importorskip("cryptography.x509")
    from tlsutil import make_pki
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("mode", ["loop", "thread", "fork"])
@pytest.mark.parametrize("serving", ["serve_forever", "handle_request"])
def test_get_request_override_wraps_in_tls(pki, mode, serving):
    from tlsutil import client_ctx, server_ctx
    sctx = server_ctx(pki)

    class TLSServer(fs.TCPServer):
        wrapped = 0

        def get_request(self):
            sock, addr = self.socket.accept()
            self.wrapped += 1
            return sctx.wrap_socket(sock, server_side=True), addr

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            assert isinstance(self.request, ssl.SSLSocket)
            self.wfile.write(self.rfile.readline().upper())

    cctx = client_ctx(pki)

    def tls_talk(addr):
        with socket.create_connection(addr, timeout=WAIT) as raw:
            with cctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(b"secret\n")
                return s.makefile("rb").readline()

    with TLSServer((HOST, 0), Handler, concurrency=mode) as srv:
        if serving == "serve_forever" and mode == "fork":
            # the fork server forks the children and cannot take over TLS state:
            # the connection is refused, the server goes on
            srv.start()
            try:
                reply = tls_talk(srv.server_address)
            except (OSError, ssl.SSLError):
                reply = b""
            assert reply == b"" and srv.wrapped == 1
            assert wait_for(lambda: srv.stats()["connections_open"] == 0)
        elif serving == "serve_forever":
            srv.start()
            assert [tls_talk(srv.server_address) for _ in range(3)] == [b"SECRET\n"] * 3
            assert srv.wrapped == 3
        else:
            out = []
            t = in_thread(lambda: out.append(tls_talk(srv.server_address)))
            srv.handle_request()
            t.join(WAIT)
            assert out == [b"SECRET\n"] and srv.wrapped == 1


@pytest.mark.parametrize("mode", ["loop", "thread", "fork"])
def test_get_request_override_on_a_datagram_server(mode, tmp_path):
    class Server(fs.UDPServer):
        def get_request(self):
            (data, sock), addr = super().get_request()
            return (data.upper(), sock), addr

    with Server((HOST, 0), DatagramEcho, concurrency=mode) as srv:
        srv.start()
        assert talk_dgram(srv.server_address, tmp_path, b"quiet\n") == b"QUIET\n"


def test_get_request_override_is_refused_where_it_cannot_be_honoured():
    with pytest.raises(TypeError, match="prefork"):
        class Prefork(fs.PreforkMixIn, fs.TCPServer):
            def get_request(self):
                return self.socket.accept()

    class Wrapping(fs.TCPServer):
        def get_request(self):
            return self.socket.accept()

    with pytest.raises(TypeError, match="prefork"):
        Wrapping((HOST, 0), LineEcho, concurrency="prefork")

    class Framed(fastnet.MessageHandler):
        def message_received(self, data):
            self.reply(data)

    with pytest.raises(TypeError, match="MessageHandler"):
        Wrapping((HOST, 0), Framed)


@pytest.mark.parametrize("mode", ["loop", "thread", "fork", "prefork"])
def test_process_request_override_is_called_then_the_mode_serves(mode):
    class Server(fs.TCPServer):
        def process_request(self, request, client_address):
            self.calls.append(client_address)
            super().process_request(request, client_address)

    srv = Server((HOST, 0), LineEcho, concurrency=mode, workers=2)
    srv.calls = []
    with srv:
        srv.start()
        for _ in range(3):
            assert talk(srv.server_address) == b"hello\n"
        assert len(srv.calls) == 3
        assert wait_for(lambda: srv.stats()["connections_open"] == 0)


def test_process_request_override_that_serves_the_request_itself():
    # socketserver's BaseServer.process_request, written out by a subclass
    class Server(fs.TCPServer):
        def process_request(self, request, client_address):
            self.calls += 1
            self.finish_request(request, client_address)
            self.shutdown_request(request)

    with Server((HOST, 0), LineEcho) as srv:
        srv.calls = 0
        srv.start()
        for _ in range(3):
            assert talk(srv.server_address) == b"hello\n"
        assert srv.calls == 3
        assert wait_for(lambda: srv.stats()["connections_open"] == 0)
        assert srv.stats()["connections_total"] == 3


def test_stdlib_threading_mixin_on_a_fastnet_server_is_its_own_process_request():
    inside = threading.Barrier(3, timeout=WAIT)

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            inside.wait()
            self.wfile.write(self.rfile.readline())

    class Server(socketserver.ThreadingMixIn, fs.TCPServer):
        pass

    with Server((HOST, 0), Handler) as srv:
        srv.start()
        out = []
        ts = [in_thread(lambda: out.append(talk(srv.server_address))) for _ in range(3)]
        for t in ts:
            t.join(WAIT)
        assert out == [b"hello\n"] * 3


# -- threads and children: daemon_threads, block_on_close -----------------------------------

@pytest.mark.parametrize("daemon", [False, True])
def test_daemon_threads(daemon):
    flags = []

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            flags.append(threading.current_thread().daemon)

    class Server(fs.ThreadingTCPServer):
        daemon_threads = daemon

    with Server((HOST, 0), Handler) as srv:
        with socket.create_connection(srv.server_address, timeout=WAIT):
            srv.handle_request()
        srv.server_close()
        if daemon:
            assert wait_for(lambda: flags)
    assert flags == [daemon]


@pytest.mark.parametrize("block", [True, False])
def test_block_on_close(block):
    go = threading.Event()
    order = []

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            go.wait(WAIT)
            order.append("handled")

    class Server(fs.ThreadingTCPServer):
        block_on_close = block

    srv = Server((HOST, 0), Handler)
    with socket.create_connection(srv.server_address, timeout=WAIT):
        srv.handle_request()
        closer = in_thread(lambda: (srv.server_close(), order.append("closed")))
        if block:
            closer.join(0.2)
            assert closer.is_alive()       # waiting for the handler, which waits for go
            go.set()
            closer.join(WAIT)
            assert order == ["handled", "closed"]
        else:
            closer.join(WAIT)
            assert order == ["closed"]
            go.set()
            assert wait_for(lambda: order == ["closed", "handled"])


def test_server_close_reaps_handle_request_children():
    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"%d\n" % os.getpid())

    srv = fs.ForkingTCPServer((HOST, 0), Handler)
    pids = []
    for _ in range(3):
        with socket.create_connection(srv.server_address, timeout=WAIT) as s:
            srv.handle_request()
            pids.append(int(s.makefile("rb").readline()))
    srv.server_close()
    assert os.getpid() not in pids and len(set(pids)) == 3
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)      # already reaped


# -- refused requests go through shutdown_request ---------------------------------------------

def _counting(cls, refuse):
    class Server(cls):
        def verify_request(self, request, client_address):
            return not refuse

        def shutdown_request(self, request):
            self.shut.append(request)
            super().shutdown_request(request)
    return Server


@pytest.mark.parametrize("mode", ["loop", "thread", "handle_request"])
def test_refused_by_verify_request_goes_through_shutdown_request(mode):
    Server = _counting(fs.TCPServer, refuse=True)
    srv = Server((HOST, 0), LineEcho, concurrency="loop" if mode == "handle_request" else mode)
    srv.shut = []
    with srv:
        with socket.create_connection(srv.server_address, timeout=WAIT) as s:
            if mode == "handle_request":
                srv.handle_request()
            else:
                srv.start()
            assert s.recv(10) == b""               # refused: closed, nothing served
        assert wait_for(lambda: len(srv.shut) == 1 and srv.shut[0].fileno() == -1)
        assert srv.stats()["connections_refused"] == 1


def test_refused_by_the_allow_list_goes_through_shutdown_request():
    Server = _counting(fs.TCPServer, refuse=False)
    srv = Server((HOST, 0), LineEcho, allow=["10.0.0.0/8"])
    srv.shut = []
    with srv:
        srv.start()
        with socket.create_connection(srv.server_address, timeout=WAIT) as s:
            assert s.recv(10) == b""
        assert wait_for(lambda: len(srv.shut) == 1)


def test_refused_datagram_goes_through_shutdown_request(tmp_path):
    Server = _counting(fs.UDPServer, refuse=True)
    srv = Server((HOST, 0), DatagramEcho)
    srv.shut = []
    with srv:
        srv.start()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.sendto(b"x", srv.server_address)
            assert wait_for(lambda: len(srv.shut) == 1)
        data, sock = srv.shut[0]
        assert data == b"x" and sock is srv.socket
        # the server's own socket is not closed by a refusal: it still serves
        srv.verify_request = lambda request, addr: True
        assert talk_dgram(srv.server_address, tmp_path) == b"hello\n"


# -- handler errors reach handle_error ------------------------------------------------------

@pytest.mark.parametrize("mode", ["loop", "thread", "handle_request"])
def test_connection_error_reaches_handle_error(mode):
    errors = []

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            while self.request.recv(100):
                pass

    class Server(fs.TCPServer):
        def handle_error(self, request, client_address):
            import sys
            errors.append(sys.exc_info()[0])

    srv = Server((HOST, 0), Handler, concurrency="loop" if mode == "handle_request" else mode)
    with srv:
        if mode != "handle_request":
            srv.start()
        s = socket.create_connection(srv.server_address, timeout=WAIT)
        s.sendall(b"data")
        # close with a reset: the handler's recv() raises ConnectionResetError
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        s.close()
        if mode == "handle_request":
            srv.handle_request()
        assert wait_for(lambda: errors)
    assert errors == [ConnectionResetError]


# -- fastnet's mixins on stdlib servers ----------------------------------------------------

def _four_at_once(server_cls, barrier):
    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            self.rfile.readline()
            try:
                barrier.wait(WAIT)
                self.wfile.write(b"together\n")
            except threading.BrokenBarrierError:
                self.wfile.write(b"alone\n")

    srv = server_cls((HOST, 0), Handler)
    t = in_thread(srv.serve_forever, 0.05)
    try:
        out = []
        clients = [in_thread(lambda: out.append(talk(srv.server_address))) for _ in range(4)]
        for c in clients:
            c.join(WAIT * 2)
        return out
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(WAIT)


def test_fastnet_threading_mixin_on_a_stdlib_server_serves_concurrently():
    class Server(fs.ThreadingMixIn, socketserver.TCPServer):
        pass

    assert _four_at_once(Server, threading.Barrier(4)) == [b"together\n"] * 4


def test_fastnet_forking_mixin_on_a_stdlib_server_serves_concurrently():
    class Server(fs.ForkingMixIn, socketserver.TCPServer):
        pass

    barrier = multiprocessing.get_context("fork").Barrier(4)
    assert _four_at_once(Server, barrier) == [b"together\n"] * 4


def test_prefork_mixin_refuses_a_stdlib_server():
    with pytest.raises(TypeError, match="PreforkMixIn"):
        class Server(fs.PreforkMixIn, socketserver.TCPServer):
            pass


def test_forking_mixin_max_children_bounds_the_children():
    class Server(fs.ForkingTCPServer):
        max_children = 2

    with Server((HOST, 0), LineEcho) as srv:
        srv.start()
        socks = [socket.create_connection(srv.server_address, timeout=WAIT) for _ in range(3)]
        try:
            assert wait_for(lambda: len(srv.worker_pids) == 2)
            assert srv.stats()["children"] == 2          # the third waits for a free child
            for i, s in enumerate(socks):
                s.sendall(b"%d\n" % i)
                assert s.makefile("rb").readline() == b"%d\n" % i
        finally:
            for s in socks:
                s.close()


def test_a_finished_serving_thread_is_not_kept_alive_by_its_server():
    # CPython's socketserver tests wait for every thread object they started to go away
    import weakref
    srv = fs.TCPServer((HOST, 0), LineEcho)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.01})
    t.start()
    assert talk(srv.server_address) == b"hello\n"
    srv.shutdown()
    t.join(WAIT)
    ref = weakref.ref(t)
    del t
    assert ref() is None
    srv.server_close()
