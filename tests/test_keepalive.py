"""keepalive=: the socket options that make a vanished peer fail a blocking receive.

The detection itself (a peer's host gone without FIN or RST) needs two network
namespaces: tests/test_faults.py::test_half_open_peer_vanished_without_fin and
::test_rpc_call_to_a_vanished_host_fails_within_the_keepalive_bound.
"""
import socket

import pytest

import fastnet


def options(fileno):
    s = socket.socket(fileno=fileno)
    try:
        return {
            "on": s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "idle": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "interval": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "count": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            "user_timeout_ms": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        }
    finally:
        s.detach()


@pytest.mark.parametrize("seconds", [0.5, 1, 2, 3, 4.5, 5, 10, 30, 61, 7200])
def test_the_probes_give_up_within_the_requested_time(seconds):
    with socket.socket() as s:
        fastnet.set_keepalive(s, seconds)
        o = options(s.fileno())
    total = max(2, -(-seconds // 1))
    assert o["on"] == 1
    assert o["idle"] >= 1 and o["interval"] >= 1 and o["count"] >= 1
    # the last unanswered probe ends the connection no later than asked ...
    assert o["idle"] + o["count"] * o["interval"] <= total
    # ... and not much earlier, so a slow but live network is not cut off
    assert o["idle"] + o["count"] * o["interval"] >= total * 0.6
    assert o["user_timeout_ms"] == total * 1000


def test_off_by_default_as_in_the_stdlib():
    with fastnet.Listener(("127.0.0.1", 0)) as ln:
        with fastnet.Client(ln.address) as c, ln.accept() as a:
            assert options(c.fileno())["on"] == 0
            assert options(a.fileno())["on"] == 0


def test_client_and_listener_set_it_and_the_connection_works():
    with fastnet.Listener(("127.0.0.1", 0), authkey=b"k", keepalive=10) as ln:
        import threading
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("a", ln.accept()))
        t.start()
        with fastnet.Client(ln.address, authkey=b"k", keepalive=4) as c:
            t.join()
            with box["a"] as a:
                oc, oa = options(c.fileno()), options(a.fileno())
                assert (oc["on"], oc["user_timeout_ms"]) == (1, 4000)
                assert (oa["on"], oa["user_timeout_ms"]) == (1, 10000)
                c.send_bytes(b"ping")
                assert a.recv_bytes() == b"ping"
                a.send([1, 2])
                assert c.recv() == [1, 2]


def test_rpc_proxy_passes_it_to_every_connection_it_opens():
    srv = fastnet.RPCServer(("127.0.0.1", 0))
    srv.register(lambda x: x + 1, name="inc")
    srv.start()
    try:
        proxy = fastnet.RPCProxy(srv.address, keepalive=6)
        try:
            assert proxy.inc(1) == 2
            assert options(proxy._conn.fileno())["user_timeout_ms"] == 6000
        finally:
            proxy.close()
    finally:
        srv.shutdown()


def test_unix_sockets_have_no_keepalive_and_ignore_it(tmp_path):
    path = str(tmp_path / "s")
    with fastnet.Listener(path, keepalive=3) as ln:
        with fastnet.Client(path, keepalive=3) as c, ln.accept() as a:
            c.send_bytes(b"x")
            assert a.recv_bytes() == b"x"


@pytest.mark.parametrize("bad", [0, -1, float("nan")])
def test_a_non_positive_time_is_refused(bad):
    with pytest.raises(ValueError, match="keepalive"):
        fastnet.Client(("127.0.0.1", 1), keepalive=bad)
    with pytest.raises(ValueError, match="keepalive"):
        fastnet.Listener(("127.0.0.1", 0), keepalive=bad)
