"""Busy-polling: ``spin=`` microseconds on Client, Listener, Pipe and the
kernels' Channel. A receive that would block first polls the socket with
non-blocking reads; whatever it finds (frames, EOF, descriptors, a timeout)
it reports exactly as the sleeping receive does. Real processes and sockets.
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


def _echo(address, spin):
    with Client(address, spin=spin) as c:
        try:
            while True:
                c.send_bytes(c.recv_bytes())
        except EOFError:
            pass


@pytest.mark.parametrize("family", ["tcp", "unix"])
@pytest.mark.parametrize("readahead", [False, True])
def test_round_trips_between_processes(family, readahead, tmp_path):
    address = ("127.0.0.1", 0) if family == "tcp" else str(tmp_path / "p.sock")
    with Listener(address, spin=50, readahead=readahead) as lst:
        p = CTX.Process(target=_echo, args=(lst.address, 50.0))
        p.start()
        with lst.accept() as c:
            assert c.spin == 50.0
            for i in range(2000):
                m = b"%d" % i * (1 + i % 50)
                c.send_bytes(m)
                assert c.recv_bytes() == m
            big = os.urandom(300_000)        # a payload that arrives in pieces
            c.send_bytes(big)
            assert c.recv_bytes() == big
            c.send_bytes(b"many")
            assert c.recv_many() == [b"many"]
        p.join(T)
    assert p.exitcode == 0


def test_default_is_off_and_bad_values_refused():
    a, b = Pipe()
    with a, b:
        assert a.spin == 0.0
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError):
            Pipe(spin=bad)
        with pytest.raises(ValueError):
            Client(("127.0.0.1", 1), spin=bad)


def test_eof_timeout_and_descriptors_while_spinning():
    a, b = Pipe(spin=200)
    with a, b:
        with pytest.raises(fastnet.TimeoutError):
            b._ch.recv_frame(timeout=0.01)
        assert not b.poll(0)
        r, w = os.pipe()
        try:
            a.send_fds([w], b"fd")
            data, fds = b.recv_fds()
            assert data == b"fd" and len(fds) == 1
            os.write(fds[0], b"through")
            os.close(fds[0])
            assert os.read(r, 10) == b"through"
        finally:
            os.close(r)
            os.close(w)
        a.close()
        with pytest.raises(EOFError):
            b.recv_bytes()


def test_channels_of_both_kernel_sets_spin_alike(kernels):
    a, b = socket.socketpair()
    with a, b:
        tx = kernels.framing.Channel(a)
        rx = kernels.framing.Channel(b, spin=100.0)
        assert rx.spin == pytest.approx(100.0)
        tx.send_frames([b"x", b"y" * 70000])
        assert rx.recv_frames() == [b"x", b"y" * 70000]    # the peek path
        tx.send_frame(b"w" * 100_000)
        assert rx.recv_frame() == b"w" * 100_000
        with pytest.raises(fastnet.TimeoutError):
            rx.recv_frame(timeout=0.001)
        r, w = os.pipe()
        try:
            tx.send_frame_fds(b"fds", [r])
            f, fds = rx.recv_frame_fds(maxlength=10)
            assert f == b"fds" and len(fds) == 1
            os.close(fds[0])
        finally:
            os.close(r)
            os.close(w)
        tx.send_frame(b"z" * 11)
        with pytest.raises(fastnet.MessageTooLarge):
            rx.recv_frame_fds(maxlength=10)
        with pytest.raises(ValueError):
            kernels.framing.Channel(a, spin=-1.0)


def test_rpc_proxy_spins_on_its_replies():
    from rpcutil import ServerProcess
    srv = ServerProcess(("127.0.0.1", 0))
    try:
        with fastnet.RPCProxy(srv.address, spin=50, timeout=T) as proxy:
            assert proxy._link.conn.spin == 50
            assert [proxy.add(i, 1) for i in range(500)] == list(range(1, 501))
            futures = [proxy.call_async("add", i, i) for i in range(64)]
            assert [f.result(T) for f in futures] == [2 * i for i in range(64)]
        with pytest.raises(ValueError):
            fastnet.RPCProxy(srv.address, spin=-5)
    finally:
        srv.close()
