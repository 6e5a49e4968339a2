"""Coalescing: ``coalesce=True`` / ``Connection.coalescing()`` queue small
messages in user space and write them together, before any receive, poll or
wait on the connection, on flush() and on close(). Real sockets, real
processes: order is kept, nothing accepted is lost on a clean close, and a
peer that closes mid-stream gives a clear error with the documented fate of
the queued messages.
"""
import multiprocessing as mp
import os
import socket

import pytest

import fastnet
from fastnet import Client, Listener, Pipe

T = 10.0
WATCHDOG_SECONDS = 120
CTX = mp.get_context("fork")


def _messages(n):
    # small ones, a few over the copy threshold (sent behind the queue without a copy)
    out = []
    for i in range(n):
        size = 70000 + i if i % 997 == 0 else i % 200
        out.append(i.to_bytes(4, "big") + bytes([i % 251]) * size)
    return out


def _address(family, tmp_path):
    return ("127.0.0.1", 0) if family == "tcp" else str(tmp_path / "c.sock")


def _sender(address, n, report):
    with Client(address, coalesce=True) as c:
        for m in _messages(n):
            c.send_bytes(m)
        c.send_array(bytearray(b"abc" * 1000))     # flushes the queue, then goes at once
        c.send({"pickled": True})
        report.send(c.unflushed())
    # close() wrote what was queued


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_order_kept_and_everything_delivered_on_close(family, tmp_path):
    n = 5000
    with Listener(_address(family, tmp_path)) as lst:
        r, w = mp.Pipe(duplex=False)
        p = CTX.Process(target=_sender, args=(lst.address, n, w))
        p.start()
        c = lst.accept()
        try:
            got = []
            for _ in range(n):
                assert c.poll(T)
                got.append(c.recv_bytes())
            assert got == _messages(n)
            assert bytes(c.recv_array()) == b"abc" * 1000
            assert c.recv() == {"pickled": True}
            assert c.poll(T)
            with pytest.raises(EOFError):
                c.recv_bytes()
            assert r.recv() > 0     # the last messages were still queued when close() ran
        finally:
            c.close()
            p.join(T)
    assert p.exitcode == 0


def test_nothing_leaves_before_a_flush():
    a, b = Pipe(coalesce=False)
    with a, b:
        a._ch.set_coalesce(1 << 20)
        a.send_bytes(b"one")
        a.send_bytes(b"two")
        assert a.unflushed() == 2 * (4 + 3)
        assert not b.poll(0.2)          # nothing was written: the peer has no bytes at all
        a.flush()
        assert a.unflushed() == 0
        assert b.poll(T)
        assert [b.recv_bytes(), b.recv_bytes()] == [b"one", b"two"]


def test_threshold_writes_without_a_flush():
    a, b = Pipe()
    with a, b, a.coalescing(1024):
        assert a.coalesce == 1024
        for i in range(100):
            a.send_bytes(b"%03d" % i + b"x" * 60)
        assert 0 < a.unflushed() < 1024
        # everything up to the last write is there for the peer
        for i in range(90):
            assert b.poll(T)
            assert b.recv_bytes()[:3] == b"%03d" % i


def test_coalescing_block_flushes_and_restores():
    a, b = Pipe()
    with a, b:
        assert a.coalesce == 0
        with a.coalescing() as conn:
            assert conn is a
            assert a.coalesce == fastnet.connection.COALESCE_THRESHOLD
            a.send_bytes(b"inside")
            assert a.unflushed() > 0
        assert a.coalesce == 0
        assert a.unflushed() == 0
        assert b.poll(T) and b.recv_bytes() == b"inside"
        a.send_bytes(b"direct")
        assert a.unflushed() == 0
        assert b.recv_bytes() == b"direct"


def _echo(address):
    with Client(address) as c:
        try:
            while True:
                c.send_bytes(c.recv_bytes())
        except EOFError:
            pass


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_receive_poll_and_wait_flush_first(family, tmp_path):
    with Listener(_address(family, tmp_path), coalesce=True) as lst:
        p = CTX.Process(target=_echo, args=(lst.address,))
        p.start()
        with lst.accept() as c:
            assert c.coalesce == fastnet.connection.COALESCE_THRESHOLD
            # a request/reply exchange would hang if the receive did not flush
            c.send_bytes(b"ping")
            assert c.recv_bytes() == b"ping"
            c.send_bytes(b"polled")
            assert c.poll(T)
            assert c.recv_bytes() == b"polled"
            c.send_bytes(b"waited")
            assert fastnet.wait([c], T) == [c]
            assert c.recv_bytes() == b"waited"
        p.join(T)
    assert p.exitcode == 0


def _read_then_close(address, k, report):
    with Client(address) as c:
        got = [c.recv_bytes() for _ in range(k)]
    report.send(got)


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_peer_closing_mid_flush(family, tmp_path):
    """The peer reads k messages and closes: a later write raises ConnectionError,
    the queue is dropped, what the peer read is an exact in-order prefix."""
    k = 300
    with Listener(_address(family, tmp_path), coalesce=4096) as lst:
        r, w = mp.Pipe(duplex=False)
        p = CTX.Process(target=_read_then_close, args=(lst.address, k, w))
        p.start()
        c = lst.accept()
        sent = []
        with pytest.raises(ConnectionError):
            for i in range(10_000_000):
                m = b"%08d" % i + b"." * 56
                c.send_bytes(m)
                sent.append(m)
                if i == k:
                    # the peer has enough; wait until it has gone
                    c.flush()
                    got = r.recv()
                    p.join(T)
        assert c.unflushed() == 0           # the queue went with the failed write
        assert got == sent[:k]
        # the queue is empty: close() has nothing left to write and succeeds
        c.close()
        assert c.closed
    assert p.exitcode == 0


def test_close_raises_when_queued_messages_cannot_leave():
    a, b = Pipe(coalesce=1 << 20)
    a.send_bytes(b"never delivered")
    b.close()
    with pytest.raises(ConnectionError):
        a.close()
    assert a.closed


def test_send_many_and_fds_keep_order_behind_the_queue():
    a, b = Pipe(coalesce=True)
    with a, b:
        a.send_bytes(b"first")
        a.send_many([b"second", b"third"])
        r, w = os.pipe()
        try:
            a.send_fds([w], b"fourth")
            a.send_bytes(b"fifth")
            a.flush()
            assert [b.recv_bytes() for _ in range(3)] == [b"first", b"second", b"third"]
            data, fds = b.recv_fds()
            assert data == b"fourth" and len(fds) == 1
            os.close(fds[0])
            assert b.recv_bytes() == b"fifth"
        finally:
            os.close(r)
            os.close(w)


@pytest.mark.parametrize("bad", [-1, "yes", 1.5])
def test_bad_option_values(bad):
    with pytest.raises(ValueError):
        Pipe(coalesce=bad)


def test_channels_of_both_kernel_sets_coalesce_alike(kernels):
    a, b = socket.socketpair()
    with a, b:
        ch = kernels.framing.Channel(a, coalesce=64)
        rx = kernels.framing.Channel(b)
        assert ch.coalesce == 64
        ch.send_frame(b"x" * 10)
        assert ch.unflushed() == 14
        ch.send_frame(b"y" * 100)          # passes the threshold: written
        assert ch.unflushed() == 0
        ch.send_frame(b"z" * 70000)        # a large frame: queue and frame in one write
        ch.send_frame(b"tail")
        assert ch.unflushed() == 8
        ch.set_coalesce(0)                 # turning it off flushes
        assert ch.unflushed() == 0 and ch.coalesce == 0
        assert [rx.recv_frame() for _ in range(4)] == [b"x" * 10, b"y" * 100, b"z" * 70000, b"tail"]
        with pytest.raises(ValueError):
            ch.set_coalesce(-1)


def _tls_reader(address, cafile, n, report):
    from fastnet import tls
    ctx = tls.client_context(cafile=cafile)
    with Client(address, ssl_context=ctx, spin=20) as c:
        report.send([c.recv_bytes() for _ in range(n)])


def test_coalescing_inside_tls(tmp_path):
    pytest.importorskip("cryptography")
    from tlsutil import make_pki, server_ctx
    pki = make_pki(tmp_path)
    msgs = [b"%d" % i * (1 + i % 30) for i in range(2000)]
    with Listener(("127.0.0.1", 0), ssl_context=server_ctx(pki), coalesce=2048) as lst:
        r, w = mp.Pipe(duplex=False)
        p = CTX.Process(target=_tls_reader, args=(lst.address, pki["ca"], len(msgs), w))
        p.start()
        with lst.accept() as c:
            for m in msgs:
                c.send_bytes(m)
            assert c.unflushed() > 0
        assert r.recv() == msgs        # close() wrote the last ones, encrypted
        p.join(T)
    assert p.exitcode == 0
