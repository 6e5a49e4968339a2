"""TLS on Listener and Client: verification, mutual TLS, authkey on top, big payloads."""
import os
import socket
import ssl
import threading

import pytest

pytest.importorskip("cryptography.x509")

import fastnet  # noqa: E402
from fastnet.errors import AuthenticationError  # noqa: E402
from tlsutil import client_ctx as _client_ctx, make_pki, server_ctx as _server_ctx  # noqa: E402

T = 10.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


VERSIONS = [None, ssl.TLSVersion.TLSv1_2]


class _Acceptor:
    """Runs listener.accept() (and an optional handler) in a thread; keeps the result or error."""

    def __init__(self, listener, handler=None):
        self.result = self.error = None
        self._listener = listener
        self._handler = handler
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        try:
            if not fastnet.wait([self._listener], T):
                raise RuntimeError("nobody connected")
            c = self._listener.accept()
            try:
                self.result = self._handler(c) if self._handler else None
            finally:
                c.close()
        except BaseException as e:
            self.error = e

    def join(self):
        self._t.join(T)
        assert not self._t.is_alive(), "server thread hung"
        return self


def _echo(c):
    """Echo every kind of message back until EOF."""
    while True:
        try:
            kind = c.recv()
        except EOFError:
            return "eof"
        if kind == "bytes":
            c.send_bytes(c.recv_bytes())
        elif kind == "obj":
            c.send(c.recv())
        elif kind == "array":
            c.send_array(c.recv_array())
        elif kind == "many":
            n = c.recv()
            got = []
            while len(got) < n:
                got.extend(c.recv_many(timeout=T))
            c.send_many(got)
        elif kind == "poll":
            c.send_bytes(b"a")
            c.send_bytes(b"b")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("size", [0, 100, 70000, 5 << 20])
def test_verified_roundtrips(pki, size, version):
    with fastnet.Listener(("127.0.0.1", 0), ssl_context=_server_ctx(pki)) as lst:
        srv = _Acceptor(lst, _echo)
        with fastnet.Client(lst.address, timeout=T,
                            ssl_context=_client_ctx(pki, version=version)) as c:
            if version is not None:
                assert c._sock.version() == "TLSv1.2"
            data = os.urandom(size)
            c.send("bytes")
            c.send_bytes(data)
            assert c.recv_bytes() == data
            c.send("obj")
            obj = {"x": data, "y": [1, 2.5, "z"]}
            c.send(obj)
            assert c.recv() == obj
            c.send("many")
            msgs = [data, b"", b"small", data[: size // 3]]
            c.send(len(msgs))
            c.send_many(msgs)
            got = []
            while len(got) < len(msgs):
                got.extend(c.recv_many(timeout=T))
            assert got == msgs
            try:
                import numpy as np
            except ImportError:
                arr = memoryview(bytearray(data)).cast("B")
                c.send("array")
                c.send_array(arr)
                assert bytes(c.recv_array()) == data
            else:
                arr = np.frombuffer(data[: size - size % 8], dtype=np.float64).reshape(-1, 1).copy()
                c.send("array")
                c.send_array(arr)
                back = c.recv_array()
                assert back.dtype == arr.dtype and back.shape == arr.shape
                assert back.tobytes() == arr.tobytes()
            buf = bytearray(size + 10)
            c.send("bytes")
            c.send_bytes(data)
            assert c.recv_bytes_into(buf, 10) == size and buf[10:] == data
        assert srv.join().error is None and srv.result == "eof"


def test_poll_sees_bytes_buffered_inside_ssl(pki):
    with fastnet.Listener(("127.0.0.1", 0), ssl_context=_server_ctx(pki)) as lst:
        srv = _Acceptor(lst, _echo)
        with fastnet.Client(lst.address, timeout=T, ssl_context=_client_ctx(pki)) as c:
            assert not c.poll(0.05)
            c.send("poll")
            assert c.poll(T)
            assert c.recv_bytes() == b"a"
            # "b" may already be decrypted and held by the SSL object, the fd empty
            assert c.poll(T)
            assert fastnet.wait([c], T) == [c]
            assert c.recv_bytes() == b"b"
            assert not c.poll(0.05)
            with pytest.raises(fastnet.TimeoutError):
                c.recv_many(timeout=0.05)
            with pytest.raises(ValueError, match="TLS"):
                c.send_fds([0])
        srv.join()


def test_wrong_ca_refused_and_listener_keeps_accepting(pki):
    with fastnet.Listener(("127.0.0.1", 0), ssl_context=_server_ctx(pki),
                          handshake_timeout=T) as lst:
        srv = _Acceptor(lst)
        with pytest.raises(AuthenticationError) as ei:
            fastnet.Client(lst.address, timeout=T, ssl_context=_client_ctx(pki, cafile="ca2"))
        assert isinstance(ei.value.__cause__, ssl.SSLError)
        srv.join()
        assert isinstance(srv.error, (AuthenticationError, fastnet.TimeoutError))
        srv = _Acceptor(lst, lambda c: c.recv_bytes())
        with fastnet.Client(lst.address, timeout=T, ssl_context=_client_ctx(pki)) as c:
            c.send_bytes(b"after")
        assert srv.join().error is None and srv.result == b"after"


@pytest.mark.parametrize("version", VERSIONS)
def test_missing_client_certificate_refused_on_both_sides(pki, version):
    ctx = _server_ctx(pki, cafile=pki["ca"], require_client_cert=True)
    with fastnet.Listener(("127.0.0.1", 0), ssl_context=ctx, handshake_timeout=T) as lst:
        srv = _Acceptor(lst, lambda c: c.send_bytes(b"hello"))
        # under TLS 1.3 the client's handshake ends before the server checks its
        # certificate, so the refusal may arrive with the first read
        with pytest.raises(AuthenticationError, match="certificate|handshake"):
            with fastnet.Client(lst.address, timeout=T,
                                ssl_context=_client_ctx(pki, version=version)) as c:
                c.recv_bytes()
        srv.join()
        assert isinstance(srv.error, AuthenticationError)
        # and with the certificate the same listener lets the client in
        srv = _Acceptor(lst, lambda c: c.send_bytes(b"hello"))
        with fastnet.Client(lst.address, timeout=T, ssl_context=_client_ctx(pki, mutual=True)) as c:
            assert c.recv_bytes() == b"hello"
        assert srv.join().error is None


def test_expired_server_certificate_refused(pki):
    with fastnet.Listener(("127.0.0.1", 0), ssl_context=_server_ctx(pki, "expired"),
                          handshake_timeout=T) as lst:
        srv = _Acceptor(lst)
        with pytest.raises(AuthenticationError, match="expired"):
            fastnet.Client(lst.address, timeout=T, ssl_context=_client_ctx(pki))
        srv.join()
        assert srv.error is not None


def test_hostname_mismatch_refused(pki):
    with fastnet.Listener(("127.0.0.1", 0), ssl_context=_server_ctx(pki, "other_host"),
                          handshake_timeout=T) as lst:
        srv = _Acceptor(lst)
        with pytest.raises(AuthenticationError):
            fastnet.Client(lst.address, timeout=T, ssl_context=_client_ctx(pki))
        srv.join()
        assert srv.error is not None
        # the same certificate is fine when the name is not checked
        srv = _Acceptor(lst, lambda c: c.recv_bytes())
        with fastnet.Client(lst.address, timeout=T,
                            ssl_context=_client_ctx(pki, check_hostname=False)) as c:
            c.send_bytes(b"ok")
        assert srv.join().result == b"ok"


def test_localhost_name_verified(pki):
    with fastnet.Listener(("127.0.0.1", 0), ssl_context=_server_ctx(pki)) as lst:
        srv = _Acceptor(lst, lambda c: c.recv_bytes())
        with fastnet.Client(("localhost", lst.address[1]), timeout=T,
                            ssl_context=_client_ctx(pki)) as c:
            c.send_bytes(b"named")
        assert srv.join().result == b"named"


def test_mutual_tls_with_authkey(pki):
    ctx = _server_ctx(pki, cafile=pki["ca"], require_client_cert=True)
    with fastnet.Listener(("127.0.0.1", 0), authkey=b"secret", ssl_context=ctx,
                          handshake_timeout=T) as lst:
        srv = _Acceptor(lst, lambda c: c.send(c.recv() * 2))
        with fastnet.Client(lst.address, authkey=b"secret", timeout=T,
                            ssl_context=_client_ctx(pki, mutual=True)) as c:
            c.send(21)
            assert c.recv() == 42
        assert srv.join().error is None
        # TLS succeeds, the wrong authkey still fails inside it
        srv = _Acceptor(lst)
        with pytest.raises(AuthenticationError):
            fastnet.Client(lst.address, authkey=b"wrong", timeout=T,
                           ssl_context=_client_ctx(pki, mutual=True))
        srv.join()
        assert isinstance(srv.error, AuthenticationError)


def test_silent_peer_bounded_by_handshake_timeout(pki):
    with fastnet.Listener(("127.0.0.1", 0), ssl_context=_server_ctx(pki),
                          handshake_timeout=0.2) as lst:
        srv = _Acceptor(lst)
        s = socket.create_connection(lst.address, T)
        try:
            srv.join()
            assert isinstance(srv.error, fastnet.TimeoutError)
        finally:
            s.close()


def test_unix_socket(pki, tmp_path):
    path = str(tmp_path / "tls.sock")
    with fastnet.Listener(path, family="AF_UNIX", ssl_context=_server_ctx(pki)) as lst:
        with pytest.raises(ValueError, match="check_hostname"):
            fastnet.Client(path, family="AF_UNIX", timeout=T, ssl_context=_client_ctx(pki))
        srv = _Acceptor(lst, lambda c: c.send_bytes(c.recv_bytes()))
        data = os.urandom(3 << 20)
        with fastnet.Client(path, family="AF_UNIX", timeout=T,
                            ssl_context=_client_ctx(pki, check_hostname=False)) as c:
            c.send_bytes(data)
            assert c.recv_bytes() == data
        assert srv.join().error is None


def test_eof_after_poll(pki):
    with fastnet.Listener(("127.0.0.1", 0), ssl_context=_server_ctx(pki)) as lst:
        srv = _Acceptor(lst, lambda c: c.send_bytes(b"last"))
        with fastnet.Client(lst.address, timeout=T, ssl_context=_client_ctx(pki)) as c:
            assert c.recv_bytes() == b"last"
            srv.join()
            assert c.poll(T)
            with pytest.raises(EOFError):
                c.recv_bytes()
            with pytest.raises(EOFError):
                c.recv_bytes()


def test_tls_beside_the_compiled_kernels_loads_no_pure_twin():
    """TLS frames on the active kernels: importing it pulls in nothing of fastnet._pure."""
    import subprocess
    import sys
    code = "import sys, fastnet, fastnet.tls; print(sorted(m for m in sys.modules if m.startswith('fastnet._pure')))"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, FASTNET_PURE="0"),
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"
