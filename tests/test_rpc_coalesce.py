"""RPCProxy(coalesce=...): requests queued in user space and written together.

Real servers (tests/rpcutil.py's ``build``) over TCP and AF_UNIX. What a
request queued by coalescing may rely on: it keeps its order, it leaves when
anything waits on a reply, and a connection lost while the queue is written
fails the affected futures with ConnectionLost instead of losing them.
"""
import concurrent.futures
import os
import threading
import uuid

import pytest

from fastnet.connection import COALESCE_THRESHOLD
from fastnet.errors import ConnectionLost
from fastnet.rpc import RPCProxy

from rpcutil import WAIT, build, wait_for

# a queued request nobody flushes would hang the run: fail it with every thread's stack
WATCHDOG_SECONDS = 120


@pytest.fixture(params=["tcp", "unix"])
def address(request):
    if request.param == "tcp":
        yield ("127.0.0.1", 0)
    else:
        path = f"/tmp/fnrpcc-{uuid.uuid4().hex[:10]}.sock"
        yield path
        if os.path.exists(path):
            os.unlink(path)


@pytest.fixture
def server(serve, address):
    return serve.keep(build(address)).start()


@pytest.fixture
def proxies():
    made = []

    def make(address, **kw):
        kw.setdefault("timeout", WAIT)
        p = RPCProxy(address, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        try:
            p.close()
        except ConnectionLost:
            pass


def test_default_is_off_and_true_means_the_connection_threshold(server, proxies):
    assert proxies(server.address).coalesce == 0
    assert proxies(server.address, coalesce=True).coalesce == COALESCE_THRESHOLD
    assert proxies(server.address, coalesce=4096).coalesce == 4096
    with pytest.raises(ValueError):
        RPCProxy(server.address, coalesce=-1)


def test_queued_requests_stay_in_the_queue_until_flushed_then_keep_their_order(server, proxies):
    p = proxies(server.address, coalesce=True)
    futs = [p.call_async("count", i) for i in range(50)]
    p.notify("count", "note")
    # nothing waited, the threshold is far: the server has seen none of them
    assert server.call_log.snapshot() == []
    assert not any(f.done() for f in futs)
    p.flush()
    assert [f.result(WAIT) for f in futs] == list(range(1, 51))
    assert wait_for(lambda: len(server.call_log.snapshot()) == 51)
    assert server.call_log.snapshot() == list(range(50)) + ["note"]


def test_a_waiting_future_flushes_its_own_request(server, proxies):
    p = proxies(server.address, coalesce=True)
    f = p.call_async("add", 2, 3)
    assert f.result() == 5                  # no timeout: only the flush can finish it
    g = p.call_async("fail", "boom")
    assert "boom" in str(g.exception())


def test_futures_waited_on_by_concurrent_futures_wait_complete(server, proxies):
    p = proxies(server.address, coalesce=True)
    futs = [p.call_async("ident", i) for i in range(20)]
    done, not_done = concurrent.futures.wait(futs, WAIT)
    assert not not_done
    assert [f.result() for f in futs] == [["reply", i, i * 7 + 1] for i in range(20)]
    got = []
    ev = threading.Event()
    p.call_async("add", 1, 1).add_done_callback(lambda f: (got.append(f.result()), ev.set()))
    assert ev.wait(WAIT) and got == [2]


def test_waiting_through_concurrent_futures_while_the_reader_thread_reads(serve, address, proxies):
    srv = serve.keep(build(address))
    entered, release = threading.Event(), threading.Event()

    def gate():
        entered.set()
        return release.wait(WAIT)

    srv.register_function(gate, "gate", blocking=True)
    srv.start()
    p = proxies(srv.address, coalesce=True)
    held = p.call_async("gate")
    p.flush()
    assert entered.wait(WAIT)
    # nobody waits on ``held``: the proxy's reader thread takes over reading
    # for it, and must still write the next requests when they start to be
    # waited on
    assert wait_for(p._replies.rlock.locked)
    later = [p.call_async("add", i, 1) for i in range(5)]
    done, not_done = concurrent.futures.wait(later, WAIT)
    assert not not_done and [f.result() for f in later] == [1, 2, 3, 4, 5]
    assert not held.done()
    release.set()
    assert held.result() is True


def test_a_synchronous_call_writes_the_queue_first(server, proxies):
    p = proxies(server.address, coalesce=True)
    futs = [p.call_async("count", f"a{i}") for i in range(10)]
    p.notify("count", "n")
    assert p.count("sync") == 12            # the queue ran before it, in order
    assert server.call_log.snapshot() == [f"a{i}" for i in range(10)] + ["n", "sync"]
    assert [f.result(WAIT) for f in futs] == list(range(1, 11))


def test_the_threshold_writes_the_queue(server, proxies):
    p = proxies(server.address, coalesce=200)
    futs = [p.call_async("count", i) for i in range(40)]
    # 40 requests of ~16 bytes passed 200 bytes: all but the last few have left unasked
    assert wait_for(lambda: len(server.call_log.snapshot()) >= 30)
    assert server.call_log.snapshot() == list(range(len(server.call_log.snapshot())))
    assert [f.result(WAIT) for f in futs] == list(range(1, 41))


def test_batch_with_coalescing_keeps_the_order(server, proxies):
    p = proxies(server.address, coalesce=True)
    first = p.call_async("count", "before")
    with p.batch() as b:
        futs = [b.call_async("count", i) for i in range(300)]      # over the batch's 256
        b.notify("count", "batched note")
    last = p.call_async("count", "after")
    assert last.result(WAIT) == 303
    assert first.result(WAIT) == 1
    assert [f.result(WAIT) for f in futs] == list(range(2, 302))
    assert server.call_log.snapshot() == ["before", *range(300), "batched note", "after"]


def test_notify_then_close_delivers_the_notification(server, proxies):
    p = RPCProxy(server.address, coalesce=True)
    p.notify("count", "last words")
    assert server.call_log.snapshot() == []
    p.close()
    assert wait_for(lambda: server.call_log.snapshot() == ["last words"])


def test_64_threads_share_a_coalescing_proxy(server, proxies):
    p = proxies(server.address, coalesce=True)
    errors = []
    start = threading.Barrier(64)

    def worker(t):
        try:
            start.wait(WAIT)
            for k in range(20):
                i = t * 1000 + k
                futs = [p.call_async("ident", i + 100 * j) for j in range(3)]
                if k % 4 == 0:
                    assert p.ident(i) == ["reply", i, i * 7 + 1]
                if k % 5 == 0:
                    p.notify("echo", i)
                assert [f.result() for f in futs] == [["reply", i + 100 * j, (i + 100 * j) * 7 + 1]
                                                       for j in range(3)]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(64)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(WAIT)
    assert not any(th.is_alive() for th in threads)
    assert errors == []
    assert p.pending == 0


def test_server_closing_mid_flush_fails_the_queued_futures_and_loses_none(serve, address, proxies):
    # the server refuses a message over 64 KiB by closing the connection: queue
    # 100 calls, an oversize one and megabytes more, so the close lands while
    # the queue is being written
    srv = serve.keep(build(address, max_message_size=65536)).start()
    p = proxies(srv.address, coalesce=64 * 1024 * 1024)
    before = [p.call_async("count", i) for i in range(100)]
    p.notify("echo", b"x" * 200_000)
    after = [p.call_async("echo", b"y" * 1000) for _ in range(32000)]
    for f in before:
        try:
            assert 1 <= f.result() <= 100
        except ConnectionLost:
            pass
    for f in after:
        with pytest.raises(ConnectionLost):
            f.result()
    assert all(f.done() for f in before + after)
    assert p.pending == 0
    # the server ran a prefix of the queue, in order
    assert srv.call_log.snapshot() == list(range(len(srv.call_log.snapshot())))
    # the proxy connects again and the next calls go through
    assert p.add(2, 3) == 5
    assert p.call_async("add", 1, 2).result() == 3


def _queue_a_refused_message(p):
    # an oversize notification the server closes the connection on, and 32 MB
    # behind it, more than the socket buffers hold: the write fails
    p.notify("echo", b"x" * 200_000)
    for _ in range(32000):
        p.notify("echo", b"y" * 1000)


def test_flush_and_close_raise_when_the_write_fails(serve, address):
    srv = serve.keep(build(address, max_message_size=65536)).start()
    p = RPCProxy(srv.address, coalesce=64 * 1024 * 1024, timeout=WAIT)
    f = p.call_async("add", 1, 1)
    _queue_a_refused_message(p)
    with pytest.raises(ConnectionLost):
        p.flush()
    with pytest.raises(ConnectionLost):
        f.result()
    assert p.add(2, 3) == 5                 # a new connection
    g = p.call_async("add", 2, 2)
    _queue_a_refused_message(p)
    with pytest.raises(ConnectionLost):
        p.close()
    assert not p.connected
    with pytest.raises(ConnectionLost):
        g.result()
    with pytest.raises(ConnectionLost):
        p.add(1, 1)                         # closed for good
