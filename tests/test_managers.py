"""multiprocessing.managers on fastnet's Listener and Client (the migration recipe).

One line moves a manager onto fastnet::

    managers.listener_client["pickle"] = (fastnet.Listener, fastnet.Client)

These tests run real manager server processes that way and use them as a
program written for the stdlib would.
"""
import glob
import os
import tempfile
import threading
from multiprocessing import managers

import pytest

import fastnet

FAMILIES = {"tcp": ("127.0.0.1", 0), "unix": None}


@pytest.fixture
def on_fastnet():
    saved = managers.listener_client["pickle"]
    managers.listener_client["pickle"] = (fastnet.Listener, fastnet.Client)
    try:
        yield
    finally:
        managers.listener_client["pickle"] = saved


class Counter:
    def __init__(self):
        self.n = 0

    def incr(self, k=1):
        self.n += k
        return self.n

    def fail(self):
        raise KeyError("no such thing")


class CounterManager(managers.BaseManager):
    pass


CounterManager.register("Counter", Counter)


@pytest.mark.parametrize("family", FAMILIES)
def test_sync_manager_containers_and_locks(on_fastnet, family):
    with managers.SyncManager(address=FAMILIES[family], authkey=b"k") as m:
        d = m.dict()
        lst = m.list([1, 2])
        lock = m.Lock()
        q = m.Queue()

        def worker(i):
            with lock:
                d[i] = i * i
                lst.append(i)
            q.put(i)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert dict(d) == {i: i * i for i in range(8)}
        assert sorted(lst) == [0, 1, 1, 2, 2, 3, 4, 5, 6, 7]
        assert sorted(q.get(timeout=10) for _ in range(8)) == list(range(8))
        ns = m.Namespace(x=1)
        ns.y = "two"
        assert (ns.x, ns.y) == (1, "two")


@pytest.mark.parametrize("family", FAMILIES)
def test_custom_manager_calls_errors_and_proxy_lifetimes(on_fastnet, family):
    m = CounterManager(address=FAMILIES[family], authkey=b"k")
    m.start()
    try:
        c = m.Counter()
        assert [c.incr() for _ in range(100)][-1] == 100
        with pytest.raises(KeyError, match="no such thing"):
            c.fail()
        # each new proxy opens, authenticates and closes connections of its own
        counters = [m.Counter() for _ in range(20)]
        assert [x.incr(5) for x in counters] == [5] * 20
        del counters
        assert c.incr(0) == 100
    finally:
        m.shutdown()


def test_wrong_authkey_is_refused(on_fastnet):
    m = CounterManager(address=("127.0.0.1", 0), authkey=b"right")
    m.start()
    try:
        other = CounterManager(address=m.address, authkey=b"wrong")
        with pytest.raises(fastnet.AuthenticationError):
            other.connect()
    finally:
        m.shutdown()


def test_manager_server_leaves_no_socket_file(on_fastnet, monkeypatch):
    # the server's Listener is never closed; its auto-generated path must still go
    tmp = tempfile.mkdtemp()
    monkeypatch.setattr(tempfile, "tempdir", tmp)
    monkeypatch.setenv("TMPDIR", tmp)
    m = CounterManager(address=None, authkey=b"k")
    m.start()
    try:
        assert m.Counter().incr() == 1
        assert isinstance(m.address, str) and os.path.exists(m.address)
        assert os.path.commonpath([tmp, m.address]) == tmp
    finally:
        m.shutdown()
    assert not os.path.exists(m.address)
    assert not [p for p in glob.glob(os.path.join(tmp, "**"), recursive=True) if p.endswith(".sock")]
