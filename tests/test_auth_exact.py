"""The blocking authkey handshake takes from the socket its own frames and nothing more.

A peer may send its first message right behind its last handshake frame, in
the same write. After Listener.accept or Client returns, that message is
still in the socket, as with multiprocessing.connection: a descriptor handed
to another reader (a dup, another process) sees it. The peer here is a raw
socket, so the bytes arrive exactly as the test writes them.
"""
import os
import socket
import threading
import time

import pytest

from fastnet.connection import Client, Listener
from fastnet._kernels import framing
from fastnet.handshake import Handshake, HandshakeReader

KEY = b"exact key"
FIRST = b"the first message, right behind the handshake"
T = 10.0


def frame(payload):
    return framing.encode_header(len(payload)) + payload


def read_frame(sock):
    """The payload of the next frame on a raw socket, read exactly."""
    reader = HandshakeReader()
    while True:
        chunk = sock.recv(reader.want())
        assert chunk, "peer closed"
        payload = reader.feed(chunk)
        if payload is not None:
            return payload


def still_in_socket(conn, data):
    """True if data is what the socket under conn holds next, untouched."""
    raw = socket.socket(fileno=os.dup(conn.fileno()))
    try:
        raw.settimeout(T)
        got = b""
        deadline = time.monotonic() + T
        while len(got) < len(data) and time.monotonic() < deadline:
            got = raw.recv(len(data) + 64, socket.MSG_PEEK)
            time.sleep(0.001)   # a short message never grows: wait for the rest, not spin
        return got == data
    finally:
        raw.close()


@pytest.fixture(params=["sha256", None], ids=["sha256", "legacy-md5"])
def digest(request):
    """The challenges' form: legacy MD5 frames are the shortest a handshake can send."""
    return request.param


@pytest.fixture(params=["tcp", "unix"])
def family(request, tmp_path):
    if request.param == "tcp":
        return ("127.0.0.1", 0), socket.AF_INET
    return str(tmp_path / "s"), socket.AF_UNIX


def _raw_client(address, fam):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(T)
    s.connect(address)
    return s


def _accept_with(family, peer, digest="sha256"):
    """Listener.accept while peer(raw client socket) runs in a thread; the accepted Connection."""
    address, fam = family
    errors = []
    with Listener(address, authkey=KEY, digest=digest) as listener:
        raw = _raw_client(listener.address, fam)

        def run():
            try:
                peer(raw)
            except BaseException as exc:    # reported by the test below
                errors.append(exc)
        t = threading.Thread(target=run)
        t.start()
        try:
            conn = listener.accept()
        finally:
            t.join(T)
    assert not errors, errors
    return conn, raw


def test_listener_leaves_a_message_sent_with_the_clients_last_frames(family, digest):
    # the whole client side in one write: response, challenge, WELCOME, a message
    def peer(raw):
        hs = Handshake(KEY, False, digest=digest)
        out = hs.receive(read_frame(raw))
        hs.abandon()    # its WELCOME goes before the listener's answer: nothing to check
        raw.sendall(b"".join(frame(p) for p in out) + frame(b"#WELCOME#") + frame(FIRST))

    conn, raw = _accept_with(family, peer, digest)
    with conn, raw:
        assert still_in_socket(conn, frame(FIRST))
        assert conn.recv_bytes() == FIRST
        assert read_frame(raw) == b"#WELCOME#"


def test_listener_reads_a_frame_that_arrives_in_pieces(family):
    # a pipelined response and challenge cut inside the first payload
    def peer(raw):
        hs = Handshake(KEY, False)
        out = hs.receive(read_frame(raw))
        data = b"".join(frame(p) for p in out)
        raw.sendall(data[:10])
        time.sleep(0.05)
        raw.sendall(data[10:])
        assert hs.receive(read_frame(raw)) == []    # the listener's WELCOME
        assert hs.receive(read_frame(raw)) == [b"#WELCOME#"] and hs.done
        raw.sendall(frame(b"#WELCOME#") + frame(FIRST))

    conn, raw = _accept_with(family, peer)
    with conn, raw:
        assert conn.recv_bytes() == FIRST


def test_client_leaves_a_message_sent_with_the_listeners_last_frames(family, digest):
    address, fam = family
    srv = socket.socket(fam, socket.SOCK_STREAM)
    if fam != socket.AF_UNIX:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(address)
    srv.listen()
    srv.settimeout(T)
    result = []
    t = threading.Thread(target=lambda: result.append(Client(srv.getsockname(), authkey=KEY, digest=digest)))
    t.start()
    try:
        peer, _ = srv.accept()
    finally:
        srv.close()
    with peer:
        peer.settimeout(T)
        hs = Handshake(KEY, True, digest=digest)
        peer.sendall(frame(hs.start()[0]))
        out = hs.receive(read_frame(peer))
        out += hs.receive(read_frame(peer))
        assert out[0] == b"#WELCOME#" and len(out) == 2
        # WELCOME, the answer to the client's challenge and a message, in one write
        peer.sendall(b"".join(frame(p) for p in out) + frame(FIRST))
        t.join(T)
        assert len(result) == 1
        with result[0] as conn:
            assert still_in_socket(conn, frame(FIRST))
            assert hs.receive(read_frame(peer)) == [] and hs.done
            assert conn.recv_bytes() == FIRST
