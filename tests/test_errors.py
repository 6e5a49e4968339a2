"""The error hierarchy and bad input from raw-socket peers.

A "raw" peer is a plain socket (or a fastnet Connection used below the
handshake) that writes exactly the bytes a test wants. Every blocking call is
bounded by a timeout, poll or wait; a watchdog catches anything else.
"""
import builtins
import gc
import hmac
import multiprocessing
import os
import socket
import struct
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import pytest

import fastnet
from fastnet import Client, Connection, Listener, wait
from fastnet.errors import (AuthenticationError, BufferTooShort, FastnetError, HandshakeMessageTooLarge,
                            MessageTooLarge, ProtocolError, TimeoutError as FTimeoutError, TruncatedFrameError)

T = 10.0
KEY = b"the right key"


WATCHDOG_SECONDS = 120


@pytest.fixture
def pool():
    with ThreadPoolExecutor(2) as ex:
        yield ex


def frame(payload):
    return struct.pack("!i", len(payload)) + payload


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def recv_frame(sock):
    (n,) = struct.unpack("!i", recv_exact(sock, 4))
    return recv_exact(sock, n)


def read_to_eof(sock):
    """Everything the peer sends until it closes (the test fails on a timeout instead)."""
    sock.settimeout(T)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def raw_pair(**kw):
    """(raw socket, fastnet Connection) joined by a socketpair."""
    a, b = socket.socketpair()
    return a, Connection(b, **kw)


def poll_recv(conn, method="recv_bytes", *args):
    assert conn.poll(T)
    return getattr(conn, method)(*args)


# -- the hierarchy --------------------------------------------------------------------------


@pytest.mark.parametrize("cls,stdlib", [
    (AuthenticationError, multiprocessing.AuthenticationError),
    (FTimeoutError, builtins.TimeoutError),
    (MessageTooLarge, OSError),
    (ProtocolError, OSError),
    (TruncatedFrameError, EOFError),
    (TruncatedFrameError, ProtocolError),
    (HandshakeMessageTooLarge, AuthenticationError),
    (HandshakeMessageTooLarge, OSError),
    (BufferTooShort, multiprocessing.BufferTooShort),
])
def test_each_error_is_a_fastnet_error_and_the_stdlib_error(cls, stdlib):
    assert issubclass(cls, FastnetError)
    assert issubclass(cls, stdlib)
    exc = cls(5) if cls is TruncatedFrameError else cls("message")
    assert isinstance(exc, FastnetError) and isinstance(exc, stdlib)
    with pytest.raises(stdlib):
        raise exc


def test_public_names():
    assert fastnet.TimeoutError is FTimeoutError
    assert fastnet.AuthenticationError is AuthenticationError
    assert fastnet.TruncatedFrameError is TruncatedFrameError
    assert fastnet.MessageTooLarge is MessageTooLarge
    assert fastnet.ProtocolError is ProtocolError
    assert fastnet.BufferTooShort is BufferTooShort
    assert issubclass(fastnet.RemoteError, FastnetError)
    assert TruncatedFrameError(42).missing == 42
    assert "42" in str(TruncatedFrameError(42))


def test_timeout_error_is_caught_by_socket_timeout_handlers():
    with pytest.raises(socket.timeout):
        raise FTimeoutError("x")


# -- bad frames from a raw peer ---------------------------------------------------------------


@pytest.mark.parametrize("length", [-2, -3, -1000, -(2**31)])
@pytest.mark.parametrize("method", ["recv_bytes", "recv", "recv_bytes_into", "recv_many", "recv_array"])
def test_negative_length_other_than_minus_one_is_a_protocol_error_and_closes(length, method):
    raw, conn = raw_pair()
    with raw, conn:
        raw.sendall(struct.pack("!i", length) + b"payload")
        args = (bytearray(100),) if method == "recv_bytes_into" else ()
        with pytest.raises(ProtocolError):
            poll_recv(conn, method, *args)
        assert conn.closed
        with pytest.raises(OSError):
            conn.recv_bytes()
        assert read_to_eof(raw) == b""  # our end of the socket is closed


def test_negative_length_after_good_frames():
    raw, conn = raw_pair()
    with raw, conn:
        raw.sendall(frame(b"one") + frame(b"two") + struct.pack("!i", -7))
        assert poll_recv(conn) == b"one"
        assert conn.recv_bytes() == b"two"
        with pytest.raises(ProtocolError):
            conn.recv_bytes()
        assert conn.closed


@pytest.mark.parametrize("claimed", [2**40, 2**62, 2**64 - 1])
def test_huge_header_is_refused_without_allocating(claimed):
    raw, conn = raw_pair()
    assert conn.max_message_size == fastnet.DEFAULT_MAX_MESSAGE_SIZE
    with raw, conn:
        raw.sendall(struct.pack("!iQ", -1, claimed) + b"x" * 1000)
        assert conn.poll(T)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            with pytest.raises(MessageTooLarge) as info:
                conn.recv_bytes()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert isinstance(info.value, OSError)
        assert peak < 1 << 20, f"refusing a {claimed}-byte header allocated {peak} bytes"
        assert conn.closed


def test_huge_header_is_refused_by_recv_bytes_into_and_recv_array():
    for method, args in [("recv_bytes_into", (bytearray(64),)), ("recv", ()), ("recv_many", ())]:
        raw, conn = raw_pair()
        with raw, conn:
            raw.sendall(struct.pack("!iQ", -1, 2**40))
            with pytest.raises(MessageTooLarge):
                poll_recv(conn, method, *args)
            assert conn.closed


def test_header_over_a_small_max_message_size():
    raw, conn = raw_pair(max_message_size=1000)
    with raw, conn:
        assert conn.max_message_size == 1000
        raw.sendall(frame(b"a" * 1000))
        assert poll_recv(conn) == b"a" * 1000  # at the limit is fine
        raw.sendall(struct.pack("!i", 1001))  # just the header: refused before the payload arrives
        tracemalloc.start()
        try:
            with pytest.raises(MessageTooLarge) as info:
                poll_recv(conn)
        finally:
            tracemalloc.stop()
        assert "1001" in str(info.value)
        assert conn.closed


def test_max_message_size_applies_to_listener_and_client_connections(pool):
    with Listener(("127.0.0.1", 0), max_message_size=500) as l:
        fut = pool.submit(Client, l.address, timeout=T, max_message_size=300)
        assert wait([l], T)
        with l.accept() as s, fut.result(T) as c:
            assert (s.max_message_size, c.max_message_size) == (500, 300)
            c.send_bytes(b"x" * 500)
            assert poll_recv(s) == b"x" * 500
            s.send_bytes(b"y" * 300)
            assert poll_recv(c) == b"y" * 300
            s.send_bytes(b"y" * 301)
            with pytest.raises(MessageTooLarge):
                poll_recv(c)
            c2 = Client(l.address, timeout=T, max_message_size=None)
            with c2, l.accept() as s2:
                assert c2.max_message_size is None
                c2.send_bytes(b"z" * 501)
                with pytest.raises(MessageTooLarge):
                    poll_recv(s2)


def test_array_header_claiming_too_much_is_refused_without_allocating():
    from fastnet.zerocopy import encode_array
    np = pytest.importorskip("numpy")
    header, _ = encode_array(np.empty(0, dtype="f8"))
    # patch the shape: one dimension of 2**37 float64 = 1 TiB
    fixed = struct.calcsize("<4sBBcB")
    huge = header[:fixed] + struct.pack("<Q", 2**37) + header[fixed + 8:]
    raw, conn = raw_pair(max_message_size=1 << 20)
    with raw, conn:
        raw.sendall(frame(huge) + frame(b""))
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            with pytest.raises(MessageTooLarge):
                poll_recv(conn, "recv_array")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20
        assert conn.closed


def test_array_header_with_overflowing_shape_is_a_protocol_error():
    raw, conn = raw_pair()
    header = struct.pack("<4sBBcB", b"\x93FNA", 1, 1, b"C", 3) + struct.pack("<3Q", 2**40, 2**40, 2**40) + b"d"
    with raw, conn:
        raw.sendall(frame(header) + frame(b""))
        with pytest.raises(ProtocolError):
            poll_recv(conn, "recv_array")
        assert conn.closed


def test_garbage_array_header_is_a_protocol_error():
    raw, conn = raw_pair()
    with raw, conn:
        raw.sendall(frame(b"not an array header") + frame(b"xxxx"))
        with pytest.raises(ProtocolError):
            poll_recv(conn, "recv_array")
        assert conn.closed


@pytest.mark.parametrize("claimed,sent", [(100, 40), (1, 0), (1_000_000, 300_000), (70_000, 65_536)])
@pytest.mark.parametrize("method", ["recv_bytes", "recv_bytes_into", "recv_many"])
def test_peer_closes_mid_frame(claimed, sent, method):
    raw, conn = raw_pair()
    with conn:
        fut_bytes = struct.pack("!i", claimed) + bytes(sent)
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(lambda: (raw.sendall(fut_bytes), raw.close()))
            args = (bytearray(claimed),) if method == "recv_bytes_into" else ()
            with pytest.raises(TruncatedFrameError) as info:
                poll_recv(conn, method, *args)
            fut.result(T)
        assert info.value.missing == claimed - sent
        assert str(claimed - sent) in str(info.value)
        assert isinstance(info.value, EOFError)


@pytest.mark.parametrize("partial,missing", [(b"\x00\x00", 2), (b"\x00", 3), (b"\xff\xff\xff\xff\x00\x00", 6),
                                             (b"\xff\xff\xff\xff", 8)])
def test_peer_closes_mid_header(partial, missing):
    raw, conn = raw_pair()
    with conn:
        raw.sendall(partial)
        raw.close()
        with pytest.raises(TruncatedFrameError) as info:
            poll_recv(conn)
        assert info.value.missing == missing


def test_peer_closes_mid_array_payload():
    np = pytest.importorskip("numpy")
    from fastnet.zerocopy import encode_array
    arr = np.arange(50_000, dtype="i8")
    header, _ = encode_array(arr)
    raw, conn = raw_pair()
    with conn:
        with ThreadPoolExecutor(1) as ex:
            fut = ex.submit(lambda: (raw.sendall(frame(header) + struct.pack("!i", arr.nbytes)
                                                 + arr.tobytes()[:123_456]), raw.close()))
            out = np.empty_like(arr)
            with pytest.raises(TruncatedFrameError) as info:
                poll_recv(conn, "recv_array", out)
            fut.result(T)
    assert info.value.missing == arr.nbytes - 123_456


def test_clean_close_is_eoferror_not_truncation():
    raw, conn = raw_pair()
    with conn:
        raw.sendall(frame(b"last"))
        raw.close()
        assert poll_recv(conn) == b"last"
        for method, args in [("recv_bytes", ()), ("recv", ()), ("recv_bytes_into", (bytearray(8),)),
                             ("recv_many", ())]:
            with pytest.raises(EOFError) as info:
                getattr(conn, method)(*args)
            assert not isinstance(info.value, TruncatedFrameError)


# -- the handshake: bad peers against a Listener ---------------------------------------------------


def _bad_garbage_response(sock):
    assert recv_frame(sock).startswith(b"#CHALLENGE#")
    sock.sendall(frame(b"{sha256}" + b"\x00" * 5))


def _bad_unknown_digest(sock):
    recv_frame(sock)
    sock.sendall(frame(b"{whirlpool}" + b"\x00" * 64))


def _bad_wrong_key(sock):
    nonce = recv_frame(sock)[len(b"#CHALLENGE#"):]
    sock.sendall(frame(b"{sha256}" + hmac.digest(b"wrong key", nonce, "sha256")))


def _bad_oversized_response(sock):
    recv_frame(sock)
    sock.sendall(frame(b"{sha256}" + b"\x01" * 300))


def _bad_huge_header(sock):
    recv_frame(sock)
    sock.sendall(struct.pack("!iQ", -1, 2**40))


def _bad_negative_length(sock):
    recv_frame(sock)
    sock.sendall(struct.pack("!i", -5))


def _bad_http(sock):
    recv_frame(sock)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


def _bad_close_mid_handshake(sock):
    recv_frame(sock)
    sock.sendall(struct.pack("!i", 72) + b"{sha256}")
    sock.shutdown(socket.SHUT_WR)


def _bad_close_at_once(sock):
    sock.shutdown(socket.SHUT_WR)


def _bad_silent(sock):
    recv_frame(sock)


BAD_CLIENTS = {
    "garbage-response": (_bad_garbage_response, AuthenticationError),
    "unknown-digest": (_bad_unknown_digest, AuthenticationError),
    "wrong-key": (_bad_wrong_key, AuthenticationError),
    # multiprocessing raises OSError "bad message length" for these; this is both
    "oversized-response": (_bad_oversized_response, HandshakeMessageTooLarge),
    "huge-header": (_bad_huge_header, HandshakeMessageTooLarge),
    "negative-length": (_bad_negative_length, AuthenticationError),
    "http": (_bad_http, HandshakeMessageTooLarge),
    # a close inside a frame: multiprocessing's OSError "got end of file
    # during message"; a clean close between frames: EOFError, as there
    "close-mid-handshake": (_bad_close_mid_handshake, TruncatedFrameError),
    "close-at-once": (_bad_close_at_once, EOFError),
    "silent": (_bad_silent, FTimeoutError),
}


def _run_bad_client(address, behave):
    """Connect, misbehave, then return everything the server sent until it closed."""
    fam = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(T)
        s.connect(address)
        behave(s)
        return read_to_eof(s)


def _good_client_roundtrip(l, pool):
    fut = pool.submit(Client, l.address, authkey=KEY, timeout=T)
    assert wait([l], T)
    with l.accept() as s, fut.result(T) as c:
        c.send({"good": "client"})
        assert poll_recv(s, "recv") == {"good": "client"}
        s.send_bytes(b"served")
        assert poll_recv(c) == b"served"


@pytest.mark.parametrize("name", list(BAD_CLIENTS))
@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_listener_refuses_a_bad_client_closes_it_and_keeps_accepting(name, family, pool, tmp_path):
    behave, expected = BAD_CLIENTS[name]
    address = ("127.0.0.1", 0) if family == "tcp" else str(tmp_path / "hs.sock")
    # only the silent peer needs a short handshake timeout (long enough for the good client after it)
    timeout = 1.0 if expected is FTimeoutError else T
    with Listener(address, authkey=KEY, handshake_timeout=timeout) as l:
        fut = pool.submit(_run_bad_client, l.address, behave)
        assert wait([l], T)
        with pytest.raises(expected):
            l.accept()
        leftover = fut.result(T)  # returns only once the server closed the socket
        if name == "garbage-response" or name == "wrong-key":
            assert leftover == frame(b"#FAILURE#")
        _good_client_roundtrip(l, pool)


def test_wrong_key_client_fails_on_both_sides(pool):
    with Listener(("127.0.0.1", 0), authkey=KEY) as l:
        fut = pool.submit(Client, l.address, authkey=b"not the key", timeout=T)
        assert wait([l], T)
        with pytest.raises(AuthenticationError):
            l.accept()
        with pytest.raises(AuthenticationError):
            fut.result(T)
        _good_client_roundtrip(l, pool)


def test_client_against_a_listener_with_the_wrong_key(pool):
    with Listener(("127.0.0.1", 0), authkey=b"server key") as l:
        fut = pool.submit(l.accept)
        with pytest.raises(AuthenticationError):
            Client(l.address, authkey=KEY, timeout=T)
        with pytest.raises(AuthenticationError):
            fut.result(T)


def test_client_without_authkey_against_an_authenticating_listener(pool):
    with Listener(("127.0.0.1", 0), authkey=KEY, handshake_timeout=1.0) as l:
        with Client(l.address, timeout=T) as c:  # connects; never answers the challenge
            assert wait([l], T)
            with pytest.raises(FTimeoutError):
                l.accept()
            assert poll_recv(c).startswith(b"#CHALLENGE#")
            with pytest.raises(EOFError):
                poll_recv(c)
        _good_client_roundtrip(l, pool)


# -- the handshake: bad servers against a Client ----------------------------------------------------


def _serve_badly(srv, behave):
    srv.settimeout(T)
    s, _ = srv.accept()
    with s:
        s.settimeout(T)
        behave(s)
        return read_to_eof(s)


def _srv_garbage_challenge(s):
    s.sendall(frame(b"hello, I am not a challenge"))


def _srv_short_challenge(s):
    s.sendall(frame(b"#CHALLENGE#" + b"x" * 5))


def _srv_oversized_challenge(s):
    s.sendall(frame(b"#CHALLENGE#{sha256}" + b"x" * 300))


def _srv_huge_header(s):
    s.sendall(struct.pack("!iQ", -1, 2**40))


def _srv_rejects(s):
    s.sendall(frame(b"#CHALLENGE#{sha256}" + os.urandom(40)))
    recv_frame(s)
    s.sendall(frame(b"#FAILURE#"))


def _srv_garbage_after_welcome(s):
    nonce = os.urandom(40)
    s.sendall(frame(b"#CHALLENGE#{sha256}" + nonce))
    recv_frame(s)
    s.sendall(frame(b"#WELCOME#"))
    recv_frame(s)  # the client's challenge
    s.sendall(frame(b"{sha256}" + b"\x00" * 32))


def _srv_truncated(s):
    s.sendall(struct.pack("!i", 60) + b"#CHALLENGE#")
    s.shutdown(socket.SHUT_WR)


BAD_SERVERS = {
    "garbage-challenge": (_srv_garbage_challenge, AuthenticationError),
    "short-challenge": (_srv_short_challenge, AuthenticationError),
    "oversized-challenge": (_srv_oversized_challenge, HandshakeMessageTooLarge),
    "huge-header": (_srv_huge_header, HandshakeMessageTooLarge),
    "rejects": (_srv_rejects, AuthenticationError),
    "bad-response-to-our-challenge": (_srv_garbage_after_welcome, AuthenticationError),
    "truncated": (_srv_truncated, TruncatedFrameError),
    "silent": (lambda s: None, FTimeoutError),
}


@pytest.mark.parametrize("name", list(BAD_SERVERS))
def test_client_refuses_a_bad_server_and_closes_its_socket(name, pool):
    behave, expected = BAD_SERVERS[name]
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        fut = pool.submit(_serve_badly, srv, behave)
        with pytest.raises(expected):
            Client(srv.getsockname(), authkey=KEY, timeout=0.5)
        fut.result(T)  # returns only once the client closed its socket


# -- strict mode against legacy (MD5) peers -------------------------------------------------------


def _legacy_client(address, key):
    """A CPython < 3.12 Client: raw HMAC-MD5 answers, a 20-byte MD5 challenge."""
    s = socket.create_connection(address, timeout=T)
    s.settimeout(None)
    conn = Connection(s)
    try:
        assert conn.poll(T)
        challenge = conn.recv_bytes(256)
        assert challenge.startswith(b"#CHALLENGE#")
        conn.send_bytes(hmac.digest(key, challenge[len(b"#CHALLENGE#"):], "md5"))
        assert conn.poll(T)
        reply = conn.recv_bytes(256)
        if reply != b"#WELCOME#":
            return reply, conn
        fastnet.auth.deliver_challenge(conn, key, digest_name=None, timeout=T)
        return reply, conn
    except BaseException:
        conn.close()
        raise


def test_strict_listener_refuses_an_md5_client(pool):
    with Listener(("127.0.0.1", 0), authkey=KEY, strict=True) as l:
        fut = pool.submit(_legacy_client, l.address, KEY)
        assert wait([l], T)
        with pytest.raises(AuthenticationError, match="(?i)md5|strict"):
            l.accept()
        reply, conn = fut.result(T)
        with conn:
            assert reply == b"#FAILURE#"
            with pytest.raises(EOFError):
                poll_recv(conn)
        _good_client_roundtrip(l, pool)


def test_non_strict_listener_accepts_an_md5_client(pool):
    with Listener(("127.0.0.1", 0), authkey=KEY) as l:
        fut = pool.submit(_legacy_client, l.address, KEY)
        assert wait([l], T)
        with l.accept() as s:
            reply, conn = fut.result(T)
            with conn:
                assert reply == b"#WELCOME#"
                conn.send("legacy hello")
                assert poll_recv(s, "recv") == "legacy hello"


def _legacy_server(srv, key, results):
    srv.settimeout(T)
    s, _ = srv.accept()
    s.settimeout(None)
    with Connection(s) as conn:
        try:
            fastnet.auth.deliver_challenge(conn, key, digest_name=None, timeout=T)
        except (AuthenticationError, EOFError, OSError) as exc:
            results.append(exc)
            return
        # answer the client's challenge as CPython < 3.12 does: raw MD5 over the whole nonce
        assert conn.poll(T)
        nonce = conn.recv_bytes(256)[len(b"#CHALLENGE#"):]
        conn.send_bytes(hmac.digest(key, nonce, "md5"))
        assert conn.poll(T)
        results.append(conn.recv_bytes(256))
        conn.send_bytes(b"served by legacy")


@pytest.mark.parametrize("strict", [True, False])
def test_client_strict_against_a_legacy_server(strict, pool):
    results = []
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        fut = pool.submit(_legacy_server, srv, KEY, results)
        if strict:
            with pytest.raises(AuthenticationError, match="(?i)md5|strict"):
                Client(srv.getsockname(), authkey=KEY, timeout=T, strict=True)
            fut.result(T)
            assert len(results) == 1 and isinstance(results[0], (AuthenticationError, EOFError))
        else:
            with Client(srv.getsockname(), authkey=KEY, timeout=T) as c:
                assert poll_recv(c) == b"served by legacy"
            fut.result(T)
            assert results == [b"#WELCOME#"]


def test_strict_listener_refuses_an_md5_challenge_answer_even_with_prefix(pool):
    """A '{md5}' response is MD5 too."""
    def client(address):
        s = socket.create_connection(address, timeout=T)
        s.settimeout(T)
        with s:
            nonce = recv_frame(s)[len(b"#CHALLENGE#"):]
            s.sendall(frame(b"{md5}" + hmac.digest(KEY, nonce, "md5")))
            return read_to_eof(s)
    with Listener(("127.0.0.1", 0), authkey=KEY, strict=True) as l:
        fut = pool.submit(client, l.address)
        assert wait([l], T)
        with pytest.raises(AuthenticationError):
            l.accept()
        assert fut.result(T) == frame(b"#FAILURE#")


# -- no file descriptor leaks ------------------------------------------------------------------------


def count_fds():
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def test_no_fd_leaks_over_failed_handshakes_bad_frames_and_closes(tmp_path):
    with ThreadPoolExecutor(2) as pool, \
            Listener(("127.0.0.1", 0), authkey=KEY, handshake_timeout=T) as l, \
            Listener(str(tmp_path / "leak.sock"), authkey=KEY, handshake_timeout=T) as lu, \
            Listener(("127.0.0.1", 0), authkey=KEY, handshake_timeout=0.05) as ls:
        bad_servers = [v[0] for v in BAD_SERVERS.values() if issubclass(v[1], AuthenticationError)]

        def failed_handshake(i):
            behave, expected = list(BAD_CLIENTS.values())[i % len(BAD_CLIENTS)]
            listener = ls if expected is FTimeoutError else l if i % 2 else lu
            fut = pool.submit(_run_bad_client, listener.address, behave)
            assert wait([listener], T)
            with pytest.raises(expected):
                listener.accept()
            fut.result(T)

        def wrong_key_client(i):
            fut = pool.submit(l.accept)
            with pytest.raises(AuthenticationError):
                Client(l.address, authkey=b"wrong", timeout=T)
            with pytest.raises(AuthenticationError):
                fut.result(T)

        def bad_server(i):
            with socket.socket() as srv:
                srv.bind(("127.0.0.1", 0))
                srv.listen(1)
                fut = pool.submit(_serve_badly, srv, bad_servers[i % len(bad_servers)])
                with pytest.raises(AuthenticationError):
                    Client(srv.getsockname(), authkey=KEY, timeout=T)
                fut.result(T)

        def bad_frame(i):
            raw, conn = raw_pair(max_message_size=100)
            with raw:
                raw.sendall([struct.pack("!i", -9), struct.pack("!i", 101),
                             struct.pack("!iQ", -1, 2**40), struct.pack("!i", 50) + b"x"][i % 4])
                if i % 4 == 3:
                    raw.shutdown(socket.SHUT_WR)
                with pytest.raises((ProtocolError, MessageTooLarge)):
                    poll_recv(conn)
            assert conn.closed

        def closed_connection(i):
            fut = pool.submit(Client, l.address, authkey=KEY, timeout=T)
            assert wait([l], T)
            s = l.accept()
            c = fut.result(T)
            c.send(i)
            assert poll_recv(s, "recv") == i
            if i % 2:
                c.close()
                with pytest.raises(EOFError):
                    poll_recv(s)
                s.close()
            else:
                s.close()
                c.close()

        scenarios = [failed_handshake, wrong_key_client, bad_server, bad_frame, closed_connection]
        for i, fn in enumerate(scenarios):  # warm up: lazy imports, thread start-up
            fn(i)
        before = count_fds()
        for i in range(50):
            for fn in scenarios:
                fn(i)
        after = count_fds()
        assert after == before, f"{after - before} descriptors leaked"
        _good_client_roundtrip(l, pool)
