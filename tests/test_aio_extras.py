"""fastnet.aio's verbs for integrations that own their connections (the Dask comm backend):
write_many, abort, peer_gone, serve(close_on_return=False), connect(server_hostname=).

Real sockets on the default loop and on uvloop; run once per kernel set
(``FASTNET_PURE=1``); TLS with certificates made here.
"""
import asyncio
import os
import socket

import pytest

import fastnet.aio as aio
from fastnet.errors import AuthenticationError, ConnectionLost

from rpcutil import count_fds
from test_aio import run  # noqa: F401  (the fixture: each test on the default loop and on uvloop)

pytest.importorskip("cryptography")
from tlsutil import client_ctx, make_pki, server_ctx  # noqa: E402

pytest.importorskip("uvloop")
np = pytest.importorskip("numpy")

MiB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _eventually(predicate):
    """Whether predicate() turns true within a few seconds, polled on the running loop."""
    for _ in range(500):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


async def _pair(ssl_server=None, ssl_client=None, **connect_kw):
    """(client conn, server conn, server) with the server's connection handed over to the test."""
    got = asyncio.get_running_loop().create_future()

    async def handler(conn):
        got.set_result(conn)

    srv = await aio.serve(("127.0.0.1", 0), handler, ssl_context=ssl_server, close_on_return=False)
    c = await aio.connect(srv.address, ssl_context=ssl_client, **connect_kw)
    s = await got
    return c, s, srv


def test_write_many_returns_at_once_and_keeps_buffers_by_reference(run):
    async def main():
        c, s, srv = await _pair()
        big = np.arange(4 * MiB, dtype=np.uint32)      # 16 MiB: more than the socket buffers hold
        c.write_many([b"head", big, b"tail"])           # no await: a writer that then reads its peer
        assert c.write_buffer_size > 0
        assert await s.recv_bytes() == b"head"
        out = np.empty_like(big)
        assert await s.recv_bytes_into(out) == big.nbytes
        assert await s.recv_bytes() == b"tail"
        assert (out == big).all()
        await c.drain()
        c.close()
        s.close()
        await c.wait_closed()
        srv.close()
    run(main)


def test_abort_drops_the_queue_and_fails_the_waiting_receive(run):
    async def main():
        before = count_fds()
        c, s, srv = await _pair()
        recv = asyncio.ensure_future(c.recv_bytes())
        await asyncio.sleep(0)
        c.write_many([np.zeros(8 * MiB, np.uint8)])
        c.abort()
        with pytest.raises(ConnectionLost):
            await recv
        assert c.closed and c.peer_gone()
        with pytest.raises(OSError):
            await c.send_bytes(b"x")
        # the peer sees the connection go, not a whole 8 MiB message
        with pytest.raises((EOFError, OSError)):
            while True:
                assert len(await s.recv_bytes()) < 8 * MiB
        s.close()
        srv.close()
        await srv.wait_closed()
        assert count_fds() == before
    run(main)


def test_peer_gone_with_no_receive_waiting(run):
    async def main():
        c, s, srv = await _pair()
        assert not c.peer_gone() and not s.peer_gone()
        await c.send_bytes(b"last words")
        c.close()
        await c.wait_closed()
        await asyncio.sleep(0.05)
        # the message is still to be received: not gone yet
        assert not s.peer_gone()
        assert await s.recv_bytes() == b"last words"
        assert await _eventually(s.peer_gone)
        with pytest.raises(EOFError):
            await s.recv_bytes()
        s.close()
        srv.close()
    run(main)


def test_peer_gone_on_reset(run):
    async def main():
        c, s, srv = await _pair()
        sock = c.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.abort()        # linger 0: the peer gets a RST
        assert await _eventually(s.peer_gone)
        s.close()
        srv.close()
    run(main)


def test_tls_peer_gone_and_server_hostname(run, pki):
    async def main():
        ctx = client_ctx(pki)         # checks the host name
        # the certificate names localhost and 127.0.0.1; connecting by IP, checked against a name
        c, s, srv = await _pair(server_ctx(pki), ctx, server_hostname="localhost")
        assert c.get_extra_info("peercert")["subject"] == ((("commonName", "localhost"),),)
        assert not s.peer_gone()
        c.close()
        await c.wait_closed()
        assert await _eventually(s.peer_gone)
        s.close()
        with pytest.raises(AuthenticationError):
            await aio.connect(srv.address, ssl_context=ctx, server_hostname="example.com")
        srv.close()
        await srv.wait_closed()
    run(main)


def test_serve_close_on_return_false_hands_the_connection_over(run):
    async def main():
        kept = []
        raised = asyncio.Event()

        async def handler(conn):
            if kept:
                raised.set()
                raise RuntimeError("handler failed")
            kept.append(conn)

        srv = await aio.serve(("127.0.0.1", 0), handler, close_on_return=False)
        c1 = await aio.connect(srv.address)
        while not kept:
            await asyncio.sleep(0.01)
        srv.close()                         # stops accepting; the handed-over connection stays
        await srv.wait_closed()
        await c1.send_bytes(b"ping")
        assert await kept[0].recv_bytes() == b"ping"
        await kept[0].send_bytes(b"pong")
        assert await c1.recv_bytes() == b"pong"
        kept[0].close()
        c1.close()

        # a handler that raises still has its connection closed
        srv = await aio.serve(("127.0.0.1", 0), handler, close_on_return=False)
        c2 = await aio.connect(srv.address)
        await raised.wait()
        with pytest.raises(EOFError):
            await c2.recv_bytes()
        c2.close()
        srv.close()
        await srv.wait_closed()
    run(main)


def test_nothing_left_open(run):
    before = count_fds()
    async def main():
        for _ in range(3):
            c, s, srv = await _pair()
            c.write_many([os.urandom(100)])
            assert len(await s.recv_bytes()) == 100
            c.abort()
            s.abort()
            srv.close()
            await srv.wait_closed()
    run(main)
    assert count_fds() == before
