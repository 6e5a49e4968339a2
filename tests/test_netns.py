"""Multi-host: a fastnet server in one network namespace, its clients in another.

Each test makes two namespaces joined by a veth pair (unique names, deleted at
teardown even when the test fails), starts servers inside namespace ``a`` with
``ip netns exec a python3 tools/soak.py serve ...`` and runs clients on threads that
entered namespace ``b`` (setns): every byte crosses the veth, as between two hosts.
Messages, RPC calls, a 64 MiB array with its content checked, TLS with a certificate
made here for the server's address, and the link taken down and up in the middle of
a transfer: the transfer completes correctly once the link is back (or fails with a
clear error within a bound) -- nothing corrupt, nothing silently lost.

Skipped, with the reason, where namespaces cannot be made (not root, no ``ip``).
"""
import json
import os
import threading
import time
import zlib

import pytest

import fastnet
from fastnet.errors import FastnetError

import fastnet_soak as soak   # tools/soak.py, loaded by conftest: server hosts, checked workloads, figures

np = pytest.importorskip("numpy")

SKIP = soak.netns_available()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=str(SKIP))

WAIT = 30.0
KEY = "netns-key"
MiB = 1 << 20


@pytest.fixture
def net():
    pair = soak.NetnsPair("fnn")
    try:
        yield pair
    finally:
        pair.close()
    leftover = soak.ip("netns", "list").stdout
    assert pair.a not in leftover and pair.b not in leftover


def run_for(seconds, *workloads):
    time.sleep(seconds)
    for w in workloads:
        w.stop()


def put_and_get(address, arr, authkey=None, ssl_context=None):
    """PUT arr (the server answers its CRC-32 and size), then GET an arange of the same length."""
    out = {}
    with fastnet.Client(address, authkey=authkey, timeout=WAIT, ssl_context=ssl_context) as c:
        t0 = time.perf_counter()
        c.send_bytes(b"PUT")
        c.send_array(arr)
        assert c.poll(WAIT)
        out["put"] = json.loads(c.recv_bytes())
        out["put_s"] = time.perf_counter() - t0
        n = arr.nbytes // 8
        t0 = time.perf_counter()
        c.send_bytes(b"GET %d %d" % (n, 12345))
        assert c.poll(WAIT)
        got = c.recv_array()
        out["get_s"] = time.perf_counter() - t0
        out["get_ok"] = bool(got.shape == (n,) and np.array_equal(got, np.arange(12345, 12345 + n, dtype=np.int64)))
    return out


def test_messages_and_rpc_calls_across_namespaces(net, hosts, tmp_path):
    log = str(tmp_path / "calls.log")
    echo = hosts({"kind": "echo", "address": [net.ip_a, 0]}, netns=net.a)
    rpc = hosts({"kind": "rpc", "address": [net.ip_a, 0], "log": log, "authkey": KEY}, netns=net.a)
    base_e, base_r = echo.stats(), rpc.stats()
    before = soak.fd_count()
    stream = soak.StreamWorkload(echo.address, clients=4, window=4, payload=512)
    own = soak.RPCWorkload(rpc.address, threads=4, authkey=KEY.encode())
    shared = soak.RPCWorkload(rpc.address, threads=8, authkey=KEY.encode(), shared=True, seq_base=10 ** 9)
    for w in (stream, own, shared):
        soak.in_netns(net.b, w.start)
    run_for(1.5, stream, own, shared)
    assert stream.check() == [] and stream.messages > 0
    assert [r.as_dict() for r in stream.records if r.error] == []
    assert own.check(log, others=shared.outcomes) == [] and own.counts["ok"] > 0
    assert shared.check(log, others=own.outcomes) == [] and shared.counts["ok"] > 0
    assert own.counts["lost"] == own.counts["timeout"] == shared.counts["lost"] == 0
    for h, b in ((echo, base_e), (rpc, base_r)):
        h.wait_stats(lambda r: r["stats"]["connections_open"] == 0 and r["fds"] == b["fds"])
        assert h.stats()["fds"] == b["fds"]
    assert soak.fd_count() == before
    soak.record_figure("netns: messages and RPC across a veth", stream_messages=stream.messages,
                       rpc_calls=own.counts["ok"] + shared.counts["ok"], lost=0, ran_twice=0, fds_leaked=0)


def test_client_address_is_the_other_namespace(net, hosts):
    arrays = hosts({"kind": "arrays", "address": [net.ip_a, 0]}, netns=net.a)

    def local_and_peer():
        with fastnet.Client(arrays.address, timeout=WAIT) as c:
            import socket
            s = socket.socket(fileno=os.dup(c.fileno()))
            try:
                return s.getsockname()[0], s.getpeername()[0]
            finally:
                s.close()

    local, peer = soak.in_netns(net.b, local_and_peer)
    assert (local, peer) == (net.ip_b, net.ip_a)


def test_bulk_64mib_array_across_namespaces(net, hosts):
    arrays = hosts({"kind": "arrays", "address": [net.ip_a, 0], "authkey": KEY}, netns=net.a)
    base = arrays.stats()
    before = soak.fd_count()
    arr = np.random.default_rng(7).integers(0, 1 << 62, size=64 * MiB // 8, dtype=np.int64)
    res = soak.in_netns(net.b, put_and_get, arrays.address, arr, authkey=KEY.encode())
    assert res["put"] == [zlib.crc32(arr), arr.nbytes]
    assert res["get_ok"]
    rep = arrays.wait_stats(lambda r: r["stats"]["connections_open"] == 0 and r["fds"] == base["fds"])
    assert rep["fds"] == base["fds"] and rep["stats"]["ended"] == {"EOFError": 1}
    assert soak.fd_count() == before
    soak.record_figure("netns: 64 MiB array each way", put_mib_s=round(64 / res["put_s"]),
                       get_mib_s=round(64 / res["get_s"]), content="checked (CRC-32 / whole array)",
                       fds_leaked=0)


def test_tls_across_namespaces(net, hosts, tmp_path):
    pytest.importorskip("cryptography")
    from fastnet import tls
    pki = soak.make_pki(str(tmp_path), addresses=[net.ip_a], names=())
    srv_tls = {"cert": pki["cert"], "key": pki["key"]}
    log = str(tmp_path / "calls.log")
    echo = hosts({"kind": "echo", "address": [net.ip_a, 0], "tls": srv_tls}, netns=net.a)
    rpc = hosts({"kind": "rpc", "address": [net.ip_a, 0], "tls": srv_tls, "log": log, "authkey": KEY},
                netns=net.a)
    arrays = hosts({"kind": "arrays", "address": [net.ip_a, 0], "tls": srv_tls}, netns=net.a)
    bases = [h.stats() for h in (echo, rpc, arrays)]
    before = soak.fd_count()
    ctx = tls.client_context(cafile=pki["ca"])      # verifies the chain and the IP address
    stream = soak.StreamWorkload(echo.address, clients=3, window=4, ssl_context=ctx)
    calls = soak.RPCWorkload(rpc.address, threads=3, authkey=KEY.encode(), ssl_context=ctx)
    for w in (stream, calls):
        soak.in_netns(net.b, w.start)
    arr = np.random.default_rng(8).integers(0, 1 << 62, size=64 * MiB // 8, dtype=np.int64)
    res = soak.in_netns(net.b, put_and_get, arrays.address, arr, ssl_context=ctx)
    run_for(0.5, stream, calls)
    assert res["put"] == [zlib.crc32(arr), arr.nbytes] and res["get_ok"]
    assert stream.check() == [] and stream.messages > 0
    assert [r.as_dict() for r in stream.records if r.error] == []
    assert calls.check(log) == [] and calls.counts["ok"] > 0 and calls.counts["lost"] == 0

    # a client that does not trust the certificate is refused, cleanly
    def untrusted():
        try:
            fastnet.Client(arrays.address, timeout=WAIT, ssl_context=tls.client_context())
        except fastnet.AuthenticationError as e:
            return str(e)
        return None

    assert "certificate" in (soak.in_netns(net.b, untrusted) or "")
    for h, b in zip((echo, rpc, arrays), bases):
        rep = h.wait_stats(lambda r: r["stats"]["connections_open"] == 0 and r["fds"] == b["fds"])
        assert rep["fds"] == b["fds"], rep
    assert soak.fd_count() == before
    soak.record_figure("netns: TLS messages, RPC and 64 MiB array", stream_messages=stream.messages,
                       rpc_calls=calls.counts["ok"], put_mib_s=round(64 / res["put_s"]),
                       get_mib_s=round(64 / res["get_s"]), fds_leaked=0)


LINK_DOWN = 2.0       # seconds the link stays down
BOUND = 60.0          # a transfer that has not finished this long after the link returned has failed


def test_link_down_and_up_during_transfers(net, hosts, tmp_path):
    log = str(tmp_path / "calls.log")
    arrays = hosts({"kind": "arrays", "address": [net.ip_a, 0]}, netns=net.a)
    echo = hosts({"kind": "echo", "address": [net.ip_a, 0]}, netns=net.a)
    rpc = hosts({"kind": "rpc", "address": [net.ip_a, 0], "log": log, "authkey": KEY}, netns=net.a)
    bases = [h.stats() for h in (echo, rpc, arrays)]
    before = soak.fd_count()
    stream = soak.StreamWorkload(echo.address, clients=2, window=2, reconnect=False, reply_timeout=BOUND)
    calls = soak.RPCWorkload(rpc.address, threads=2, authkey=KEY.encode(), timeout=BOUND)
    # calls with a short timeout: they time out while the link is down, then succeed again
    short = soak.RPCWorkload(rpc.address, threads=2, authkey=KEY.encode(), timeout=0.5, seq_base=10 ** 9)
    state = {"done": [], "error": None, "stop": threading.Event(), "after_up": threading.Event()}

    def transfer():
        # 16 MiB arrays back to back on one connection; each one's CRC-32 checked
        rng = np.random.default_rng(9)
        arr = rng.integers(0, 1 << 62, size=16 * MiB // 8, dtype=np.int64)
        crc = zlib.crc32(arr)
        try:
            with fastnet.Client(arrays.address, timeout=WAIT) as c:
                while not state["stop"].is_set():
                    c.send_bytes(b"PUT")
                    c.send_array(arr)
                    if not c.poll(BOUND):
                        raise fastnet.TimeoutError(f"no answer {BOUND} s after the array was sent")
                    got = json.loads(c.recv_bytes())
                    state["done"].append((time.monotonic(), got == [crc, arr.nbytes]))
        except (OSError, EOFError, FastnetError) as e:
            state["error"] = (time.monotonic(), e)

    t = None

    def start_all():
        nonlocal t
        stream.start()
        calls.start()
        short.start()
        t = threading.Thread(target=transfer, daemon=True)
        t.start()

    soak.in_netns(net.b, start_all)
    deadline = time.monotonic() + WAIT
    while len(state["done"]) < 3:
        assert time.monotonic() < deadline and state["error"] is None, state
        time.sleep(0.01)
    n_down = len(state["done"])
    down_at = time.monotonic()
    net.link("down")
    time.sleep(LINK_DOWN)
    during = len(state["done"]) - n_down
    net.link("up")
    up_at = time.monotonic()
    # the transfer resumes: wait for three more arrays after the link came back (or an error)
    while sum(1 for ts, _ in state["done"] if ts > up_at) < 3 and state["error"] is None:
        assert time.monotonic() < up_at + BOUND, "the transfer neither resumed nor failed"
        time.sleep(0.02)
    # and the short-timeout calls succeed again on their connections
    while not any(o == "ok" and ts > up_at for o, ts in list(short.outcomes.values())):
        assert time.monotonic() < up_at + BOUND, "calls that timed out during the outage never recovered"
        time.sleep(0.02)
    resumed = min((ts for ts, _ in state["done"] if ts > up_at), default=None)
    state["stop"].set()
    t.join(BOUND)
    stream.stop(BOUND)
    calls.stop(BOUND)
    short.stop(BOUND)
    if state["error"] is not None:
        # failing is allowed only as a clear error within the bound
        when, e = state["error"]
        assert when < up_at + BOUND and isinstance(e, (ConnectionError, TimeoutError, EOFError)), e
    assert all(ok for _, ok in state["done"]), "an array arrived corrupted"
    assert stream.check() == [] and [r.as_dict() for r in stream.records if r.error] == []
    assert calls.check(log, others=short.outcomes) == []
    assert calls.counts["lost"] == 0 and calls.counts["timeout"] == 0
    assert short.check(log, others=calls.outcomes) == [] and short.counts["lost"] == 0
    assert short.counts["timeout"] >= 1, "calls with a 0.5 s timeout during a 2 s outage time out"
    for h, b in zip((echo, rpc, arrays), bases):
        rep = h.wait_stats(lambda r: r["stats"]["connections_open"] == 0 and r["fds"] == b["fds"])
        assert rep["fds"] == b["fds"], rep
    assert soak.fd_count() == before
    soak.record_figure("netns: link down 2 s and up during transfers",
                       arrays_16mib=len(state["done"]), arrays_while_down=during,
                       resumed_after_up_s=None if resumed is None else round(resumed - up_at, 2),
                       stall_s=None if resumed is None else round(resumed - down_at, 2),
                       transfer_error=None if state["error"] is None else repr(state["error"][1]),
                       stream_messages=stream.messages, rpc_calls=calls.counts["ok"] + short.counts["ok"],
                       rpc_timeouts_0_5s=short.counts["timeout"],
                       calls_ok_again_after_up_s=round(min(ts for o, ts in short.outcomes.values()
                                                           if o == "ok" and ts > up_at) - up_at, 2),
                       lost=0, corrupt=0, ran_twice=0)
