"""fastnet.rpc: RPCServer and RPCProxy over real sockets, TCP and AF_UNIX.

Most servers run in this process (``start()``) so a test can hold a
server-side function on an Event and read ``stats()``; the tests about a
server dying (SIGKILL, SIGTERM) run it in a process of its own
(``rpcutil.ServerProcess``). Every wait has a deadline, every ordering is
asserted by events, never by elapsed time.
"""
import builtins
import concurrent.futures
import json
import os
import signal
import socket
import threading
import uuid

import msgpack
import numpy as np
import pytest

import fastnet
from fastnet import rpc
from fastnet.errors import (
    AuthenticationError, ConnectionLost, FastnetError, MethodNotFound, ProtocolError, RemoteError,
)
from fastnet.rpc import LATENCY_BUCKETS, RPCProxy, RPCServer, blocking

from rpcutil import WAIT, ServerProcess, build, count_fds, free_tcp_port, wait_for

KEY = b"rpc test key"


# -- exceptions raised remotely (importable here, so pickle can rebuild them) ------------


class InventoryError(Exception):
    """A user's own exception class."""

    def __init__(self, item, *rest):
        super().__init__(item, *rest)
        self.item = item


class HoldsALock(Exception):
    """Does not pickle: it carries a lock."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


class TwoArgError(Exception):
    """Pickles, but cannot be rebuilt: __init__ wants two arguments, args holds one."""

    def __init__(self, code, detail):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class Gate:
    """A blocking server function the test releases: ``entered`` once called."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, value="released"):
        self.calls += 1
        self.entered.set()
        return value if self.release.wait(WAIT) else "gate timed out"


# -- fixtures --------------------------------------------------------------------------


def _unix_path():
    return f"/tmp/fnrpc-{uuid.uuid4().hex[:10]}.sock"


@pytest.fixture(params=["tcp", "unix"])
def address(request):
    """An address to bind: 127.0.0.1 port 0, or a filesystem AF_UNIX path."""
    if request.param == "tcp":
        yield ("127.0.0.1", 0)
    else:
        path = _unix_path()
        yield path
        if os.path.exists(path):
            os.unlink(path)


@pytest.fixture
def serve(serve):
    """serve(address=("127.0.0.1", 0), **kw) -> an RPCServer with rpcutil's functions, not yet started.

    Stopped after the test by conftest's serve (gates released, no prefork worker left behind).
    """
    return lambda address=("127.0.0.1", 0), **kw: serve.keep(build(address, **kw))

@pytest.fixture
def proxies():
    """proxies(address, **kw) -> an RPCProxy closed after the test."""
    made = []

    def make(address, **kw):
        kw.setdefault("timeout", WAIT)     # a missing reply fails the test, never hangs it
        p = RPCProxy(address, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def processes():
    made = []

    def make(address, **cfg):
        proc = ServerProcess(address, **cfg)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.close()


def add_gate(srv, name="gate"):
    gate = Gate()
    srv.register_function(gate, name, blocking=True)
    srv.gates = getattr(srv, "gates", []) + [gate]
    return gate


def raw_rpc_client(address, codec="msgpack", authkey=None):
    """A fastnet.Client that has said a valid hello."""
    c = fastnet.Client(address, authkey=authkey, timeout=WAIT)
    c.send_bytes(json.dumps({"fastnet-rpc": 1, "codec": codec}).encode())
    assert c.poll(WAIT)
    assert json.loads(c.recv_bytes()) == {"fastnet-rpc": 1, "codec": codec}
    return c


def read_to_eof(conn):
    """Every frame until the peer closes (the list), failing on a deadline."""
    frames = []
    while True:
        assert conn.poll(WAIT), "the server neither answered nor closed the connection"
        try:
            frames.append(conn.recv_bytes())
        except EOFError:
            return frames


# -- registration ------------------------------------------------------------------------


def test_public_names():
    assert fastnet.RPCServer is RPCServer and fastnet.RPCProxy is RPCProxy
    assert {"RPCServer", "RPCProxy"} <= set(fastnet.__all__)
    assert {"RPCServer", "RPCProxy", "blocking"} <= set(rpc.__all__)
    assert issubclass(MethodNotFound, RemoteError) and issubclass(MethodNotFound, AttributeError)
    assert issubclass(ConnectionLost, FastnetError) and issubclass(ConnectionLost, ConnectionError)
    assert issubclass(fastnet.TimeoutError, builtins.TimeoutError)


def test_every_registration_form(serve, proxies):
    srv = serve()
    loop_thread = {}

    def plain(x):
        loop_thread["plain"] = threading.current_thread().name
        return ["plain", x]

    def renamed():
        return "renamed"

    assert srv.register_function(plain) is plain
    assert srv.register_function(renamed, name="other.name") is renamed

    @srv.register
    def decorated(x):
        return ["decorated", x]

    @srv.register(name="named.blocking", blocking=True)
    def nb():
        return threading.current_thread().name

    @srv.register_function("by_string")
    def bs():
        return "by string"

    @srv.register
    @blocking
    def marked():
        return threading.current_thread().name

    @srv.register(name="unmarked")
    def unmarked():
        return threading.current_thread().name

    assert decorated(1) == ["decorated", 1]          # the decorators hand the function back
    assert {"plain", "other.name", "decorated", "named.blocking", "by_string", "marked",
            "unmarked"} <= set(srv.methods)
    assert "renamed" not in srv.methods and "nb" not in srv.methods and "bs" not in srv.methods
    srv.start()
    p = proxies(srv.address)
    assert p.plain(1) == ["plain", 1]
    assert p.other.name() == "renamed"
    assert p.call("other.name") == "renamed"
    assert p.decorated(2) == ["decorated", 2]
    assert p.by_string() == "by string"
    loop = p.unmarked()
    assert loop == loop_thread["plain"]             # non-blocking: all on the one loop thread
    blocking_threads = {p.named.blocking(), p.marked()}
    assert loop not in blocking_threads             # blocking: on worker threads
    with pytest.raises(MethodNotFound):
        p.renamed()
    with pytest.raises(TypeError):
        srv.register_function(42)


def test_blocking_default_for_the_whole_server(serve, proxies):
    srv = serve(blocking=True)

    @srv.register
    def where():
        return threading.current_thread().name

    @srv.register(blocking=False)
    def on_loop():
        return threading.current_thread().name

    srv.start()
    p = proxies(srv.address)
    assert p.where() != p.on_loop()


class Store:
    """Every public method is exposed; private ones never."""

    greeting = "not callable"

    def __init__(self):
        self.data = {}

    def put(self, key, value):
        "Store value under key."
        self.data[key] = value

    def take(self, key):
        return self.data.pop(key)

    def _secret(self):
        return "secret"

    def __len__(self):
        return len(self.data)


class KeyValueServer:
    """The Cookbook's key-value store (11.6): only _rpc_methods_ is exposed."""

    _rpc_methods_ = ["get", "set", "delete", "exists", "keys"]

    def __init__(self):
        self._data = {}

    def get(self, name):
        return self._data[name]

    def set(self, name, value):
        self._data[name] = value

    def delete(self, name):
        del self._data[name]

    def exists(self, name):
        return name in self._data

    def keys(self):
        return list(self._data)

    def clear(self):
        "Public, but not in _rpc_methods_: never exposed."
        self._data.clear()


def test_register_instance_exposes_public_methods_only(serve, proxies, address):
    srv = serve(address)
    store = Store()
    assert srv.register_instance(store) is store
    srv.register_instance(Store(), prefix="st")
    methods = set(srv.methods)
    assert {"put", "take", "st.put", "st.take"} <= methods
    for hidden in ("_secret", "__len__", "greeting", "__init__", "data", "st._secret", "st.__len__"):
        assert hidden not in methods
    srv.start()
    p = proxies(srv.address)
    p.put("a", [1, 2])
    assert store.data == {"a": [1, 2]}
    assert p.take("a") == [1, 2]
    p.st.put("b", 2)
    assert p.st.take("b") == 2 and store.data == {}
    for name in ("_secret", "__len__", "st._secret", "greeting"):
        with pytest.raises(MethodNotFound):
            p.call(name)
    with pytest.raises(AttributeError):
        p._secret                               # the proxy never makes private names remote
    with pytest.raises(RemoteError) as e:
        p.take("missing")
    assert e.value.type_name == "KeyError"


def test_rpc_methods_restricts_like_the_cookbook_key_value_server(serve, proxies, address):
    srv = serve(address)
    kv = KeyValueServer()
    srv.register_instance(kv, prefix="kv")
    assert sorted(n for n in srv.methods if n.startswith("kv.")) == sorted(
        "kv." + n for n in KeyValueServer._rpc_methods_)
    srv.start()
    p = proxies(srv.address)
    p.kv.set("foo", "bar")
    p.kv.set("spam", [1, 2, 3])
    assert sorted(p.kv.keys()) == ["foo", "spam"]
    assert p.kv.get("foo") == "bar"
    assert p.kv.get("spam") == [1, 2, 3]
    p.kv.delete("spam")
    assert p.kv.exists("spam") is False and p.kv.exists("foo") is True
    with pytest.raises(MethodNotFound) as e:
        p.kv.clear()                            # public, not listed: not there
    assert "kv.clear" in str(e.value)
    with pytest.raises(MethodNotFound):
        p.call("kv._data")
    with pytest.raises(MethodNotFound):
        p.call("kv.__init__")
    assert kv._data == {"foo": "bar"}           # clear() never ran


def test_rpc_methods_may_not_list_private_names_or_attributes(serve):
    srv = serve()

    class Leaky(KeyValueServer):
        _rpc_methods_ = ["get", "_data"]

    class NotAMethod(KeyValueServer):
        _rpc_methods_ = ["get", "version"]
        version = 3

    with pytest.raises(ValueError, match="_data"):
        srv.register_instance(Leaky())
    with pytest.raises(AttributeError, match="version"):
        srv.register_instance(NotAMethod(), prefix="x")
    assert "_data" not in srv.methods and "x.version" not in srv.methods


def test_unregister(serve, proxies):
    srv = serve().start()
    p = proxies(srv.address)
    assert p.add(1, 2) == 3
    srv.unregister("add")
    assert "add" not in srv.methods
    assert "add" not in p.system.list_methods()
    with pytest.raises(MethodNotFound):
        p.add(1, 2)
    with pytest.raises(KeyError):
        srv.unregister("add")
    assert p.echo("still serving") == "still serving"


def test_introspection(serve, proxies):
    srv = serve()

    @srv.register
    def undocumented(a, *args, flag=False, **kw):
        pass

    srv.start()
    p = proxies(srv.address)
    listed = p.system.list_methods()
    assert listed == sorted(listed) == srv.methods
    assert {"echo", "add", "system.list_methods", "system.method_help",
            "system.method_signature"} <= set(listed)
    assert p.system.method_help("add") == "Add two numbers."
    assert p.system.method_help("count").startswith("Record tag in the call log")
    assert p.system.method_help("undocumented") == ""
    assert p.system.method_signature("add") == "add(x, y)"
    assert p.system.method_signature("kw") == "kw(a, b=2, *, c=3)"
    assert p.system.method_signature("undocumented") == "undocumented(a, *args, flag=False, **kw)"
    with pytest.raises(MethodNotFound) as e:
        p.system.method_help("nope")
    assert "nope" in str(e.value)
    with pytest.raises(MethodNotFound):
        p.system.method_signature("nope")


def test_introspection_can_be_turned_off(serve, proxies):
    srv = serve(introspection=False).start()
    assert not [n for n in srv.methods if n.startswith("system.")]
    p = proxies(srv.address)
    with pytest.raises(MethodNotFound):
        p.system.list_methods()


# -- calls and remote errors ---------------------------------------------------------------


def test_positional_and_keyword_arguments(serve, proxies, address):
    srv = serve(address).start()
    p = proxies(srv.address)
    assert p.kw(1) == [1, 2, 3]
    assert p.kw(1, 5) == [1, 5, 3]
    assert p.kw(1, c=9) == [1, 2, 9]
    assert p.kw(a="x", b=None, c=[1]) == ["x", None, [1]]
    assert p.call("kw", 4, b=5) == [4, 5, 3]
    assert p.invoke("kw", [7], {"c": 8}) == [7, 2, 8]
    assert p.invoke("kw", (7, 6)) == [7, 6, 3]
    assert p.echo({"nested": [1, {"x": None}], "s": "ünïcödé"}) == {"nested": [1, {"x": None}], "s": "ünïcödé"}


@pytest.mark.parametrize("args,kwargs,needle", [
    ((1,), {}, "missing 1 required positional argument"),
    ((1, 2, 3), {}, "takes 2 positional arguments but 3 were given"),
    ((1, 2), {"z": 3}, "unexpected keyword argument 'z'"),
])
def test_wrong_arity_is_a_remote_type_error(serve, proxies, args, kwargs, needle):
    srv = serve().start()
    p = proxies(srv.address)
    with pytest.raises(RemoteError) as e:
        p.add(*args, **kwargs)
    assert not isinstance(e.value, MethodNotFound)
    assert e.value.type_name == "TypeError"
    assert needle in e.value.message
    assert "TypeError" in e.value.traceback
    assert p.add(1, 2) == 3


def test_unknown_method_is_method_not_found_not_a_hang(serve, proxies, address):
    srv = serve(address).start()
    p = proxies(srv.address, timeout=WAIT)
    for call in (lambda: p.no_such_method(1), lambda: p.kv.nothing(), lambda: p.call("a.b.c"),
                 lambda: p.call_async("nope").result(WAIT)):
        with pytest.raises(MethodNotFound) as e:
            call()
        assert isinstance(e.value, AttributeError) and isinstance(e.value, RemoteError)
        assert e.value.type_name == "MethodNotFound"
    assert "no_such_method" in str(p.call_async("no_such_method").exception(WAIT))
    assert p.add(2, 3) == 5


@pytest.mark.parametrize("codec", ["msgpack", "json"])
def test_remote_exception_carries_type_message_and_traceback(serve, proxies, codec):
    srv = serve(codec=codec)

    @srv.register
    def restock(item):
        raise InventoryError(item)

    srv.start()
    p = proxies(srv.address, codec=codec)
    with pytest.raises(RemoteError) as e:
        p.fail("it went wrong")
    err = e.value
    assert type(err) is RemoteError
    assert err.type_name == "ValueError" and err.message == "it went wrong"
    assert "in fail" in err.traceback and "ValueError: it went wrong" in err.traceback
    assert "ValueError" in str(err) and "it went wrong" in str(err)
    with pytest.raises(RemoteError) as e:
        p.restock("widgets")
    assert e.value.type_name.endswith("InventoryError")
    assert "widgets" in e.value.message and "in restock" in e.value.traceback
    assert p.echo(1) == 1


def test_pickle_raises_the_original_exception_type_with_the_remote_traceback(serve, proxies, address):
    srv = serve(address, codec="pickle", authkey=KEY)

    @srv.register
    def restock(item):
        raise InventoryError(item, 12)

    @srv.register
    def lookup(d, key):
        return d[key]

    srv.start()
    p = proxies(srv.address, codec="pickle", authkey=KEY)
    with pytest.raises(InventoryError) as e:
        p.restock("widgets")
    assert e.value.item == "widgets" and e.value.args == ("widgets", 12)
    cause = e.value.__cause__
    assert isinstance(cause, RemoteError)
    assert cause.type_name.endswith("InventoryError")
    assert "in restock" in cause.traceback and "InventoryError" in cause.traceback
    with pytest.raises(KeyError) as e:
        p.lookup({"a": 1}, "b")
    assert e.value.args == ("b",)
    assert isinstance(e.value.__cause__, RemoteError) and "in lookup" in e.value.__cause__.traceback
    with pytest.raises(MethodNotFound):
        p.nothing_here()
    fut = p.call_async("fail", "async")
    assert isinstance(fut.exception(WAIT), ValueError)
    assert p.lookup({"a": 1}, "a") == 1


def test_pickle_unpicklable_exception_falls_back_to_remote_error(serve, proxies):
    srv = serve(codec="pickle", authkey=KEY)

    @srv.register
    def locked():
        raise HoldsALock("cannot travel")

    srv.start()
    p = proxies(srv.address, codec="pickle", authkey=KEY)
    with pytest.raises(RemoteError) as e:
        p.locked()
    assert e.value.type_name.endswith("HoldsALock")
    assert e.value.message == "cannot travel" and "in locked" in e.value.traceback
    assert p.echo(b"ok") == b"ok"
    assert srv.stats()["connections_total"] == 1


@pytest.mark.parametrize("codec", ["msgpack", "json", "pickle"])
def test_a_result_the_codec_cannot_encode_is_an_error_reply(serve, proxies, codec):
    srv = serve(codec=codec, authkey=KEY)

    @srv.register
    def lock():
        return threading.Lock()

    @srv.register(blocking=True)
    def lock_later():
        return threading.Lock()

    srv.start()
    p = proxies(srv.address, codec=codec, authkey=KEY)
    for name in ("lock", "lock_later"):
        with pytest.raises(RemoteError) as e:
            p.call(name)
        assert e.value.type_name == "TypeError"
        assert "lock" in e.value.message and codec in e.value.message
    assert p.add(1, 2) == 3
    assert srv.stats()["connections_total"] == 1


def test_pickle_exception_that_cannot_be_rebuilt_falls_back_to_remote_error(serve, proxies):
    """An exception whose __init__ takes two arguments pickles, but unpickling it fails.

    The reply must still become an error for that call (RemoteError), not a
    broken connection that fails the call with ConnectionLost.
    """
    srv = serve(codec="pickle", authkey=KEY)

    @srv.register
    def two_args():
        raise TwoArgError(404, "no such thing")

    srv.start()
    p = proxies(srv.address, codec="pickle", authkey=KEY)
    with pytest.raises(Exception) as e:
        p.two_args()
    assert isinstance(e.value, RemoteError), repr(e.value)
    assert e.value.type_name.endswith("TwoArgError") and "no such thing" in e.value.message
    assert "in two_args" in e.value.traceback
    assert p.echo(1) == 1
    assert srv.stats()["connections_total"] == 1       # the same connection, not a new one


@pytest.mark.parametrize("on_worker_thread", [False, True], ids=["loop", "blocking"])
def test_system_exit_in_a_remote_function_is_an_error_reply_not_the_end_of_the_server(
        serve, proxies, on_worker_thread):
    """xmlrpc.server answers any BaseException with a fault: the caller gets an error reply
    and the server goes on serving (not a dead server, not a call left without reply)."""
    srv = serve()

    @srv.register(blocking=on_worker_thread)
    def quit_():
        raise SystemExit(3)

    srv.start()
    p = proxies(srv.address, connect_timeout=2, timeout=3.0)   # a deadline for a reply due at once
    outcome = _outcome(p.quit_)
    after = _outcome(p.add, 1, 2)
    assert isinstance(outcome, RemoteError), repr(outcome)
    assert outcome.type_name == "SystemExit"
    assert after == 3, repr(after)


# -- codecs ----------------------------------------------------------------------------------


def test_msgpack_bytes_and_numpy_arrays(serve, proxies, address):
    srv = serve(address).start()
    p = proxies(srv.address)
    assert p.codec == "msgpack"
    data = bytes(range(256)) * 100
    assert p.echo(data) == data and type(p.echo(data)) is bytes
    assert p.echo(bytearray(b"xy")) == b"xy"
    assert p.blob(3) == b"\x00\xff" * 3
    assert p.echo({1: b"a", None: [1.5, True], "k": (1, 2)}) == {1: b"a", None: [1.5, True], "k": [1, 2]}
    arrays = [
        np.arange(100_000, dtype=np.float64),
        np.arange(24, dtype=np.int16).reshape(2, 3, 4),
        np.asfortranarray(np.arange(12, dtype=np.uint8).reshape(3, 4)),
        np.zeros((0, 5), dtype=np.complex64),
        np.array([(1, 2.5), (3, 4.5)], dtype=[("a", "<i4"), ("b", "<f8")]),
    ]
    for a in arrays:
        b = p.echo(a)
        assert isinstance(b, np.ndarray)
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(b, a)
    out = p.echo({"w": arrays[0], "list": [arrays[1], np.float32(2.5)]})
    np.testing.assert_array_equal(out["w"], arrays[0])
    np.testing.assert_array_equal(out["list"][0], arrays[1])
    assert out["list"][1] == np.float32(2.5) and isinstance(out["list"][1], np.float32)
    assert p.add(np.int64(2), 3) == 5


def test_json_codec_bytes_result_is_a_clear_error_and_the_connection_lives(serve, proxies, address):
    srv = serve(address, codec="json").start()
    p = proxies(srv.address, codec="json")
    assert p.echo({"a": [1, 2.5, None, True], "ü": "snowman ☃"}) == {"a": [1, 2.5, None, True], "ü": "snowman ☃"}
    assert p.echo((1, 2)) == [1, 2]
    with pytest.raises(RemoteError) as e:
        p.blob(2)
    assert e.value.type_name == "TypeError"
    assert "bytes" in e.value.message and "json" in e.value.message
    assert p.add(1, 2) == 3                       # same connection, still usable
    with pytest.raises(TypeError, match="bytes"):
        p.echo(b"raw")                            # refused here, before anything is sent
    with pytest.raises(TypeError, match="bytes"):
        p.call_async("echo", b"raw")
    assert p.add(3, 4) == 7
    assert srv.stats()["connections_total"] == 1


def test_pickle_large_arrays_bytes_and_nested_structures(serve, proxies, address):
    srv = serve(address, codec="pickle", authkey=KEY)

    @srv.register
    def summary(arrays):
        return [(a.dtype.str, a.shape, float(a.sum())) for a in arrays]

    @srv.register
    def make(n, dtype):
        return np.arange(n, dtype=dtype)

    @srv.register
    def scale(a, k):
        return a * k

    srv.start()
    p = proxies(srv.address, codec="pickle", authkey=KEY)
    arrays = [np.arange(1 << 20, dtype=np.float64),                       # 8 MiB
              np.ones((512, 1024, 3), dtype=np.float32),                     # 6 MiB
              np.arange(3 << 20, dtype=np.uint8)]                            # 3 MiB

    def frames_in_and_out():
        st = srv.stats()
        return st["messages_in"], st["messages_out"]

    before = frames_in_and_out()
    assert p.summary(arrays) == [(a.dtype.str, a.shape, float(a.sum())) for a in arrays]
    after = frames_in_and_out()
    # out of band: a marker, the pickle, then each array as a frame of its own
    assert (after[0] - before[0], after[1] - before[1]) == (5, 1)
    big = p.make(1 << 20, "int32")
    assert frames_in_and_out() == (after[0] + 1, after[1] + 3)
    np.testing.assert_array_equal(big, np.arange(1 << 20, dtype=np.int32))
    np.testing.assert_array_equal(p.scale(arrays[1], 2.0), arrays[1] * 2.0)
    fortran = np.asfortranarray(np.arange(1 << 20, dtype=np.float64).reshape(1024, 1024))
    back = p.echo(fortran)
    np.testing.assert_array_equal(back, fortran)
    strided = np.arange(1 << 21, dtype=np.int64)[::3]                        # not contiguous
    np.testing.assert_array_equal(p.echo(strided), strided)
    raw = os.urandom(8 << 20)
    assert p.echo(raw) == raw
    assert p.echo(bytearray(raw[:1000])) == bytearray(raw[:1000])
    nested = {"t": (1, (2, 3)), "s": {1, 2, frozenset({3})}, "b": b"\x00" * 70_000,
              "arrays": [np.arange(10), {"deep": np.eye(300)}], 7: None, ("k", 1): 1.5}
    back = p.echo(nested)
    assert back["t"] == (1, (2, 3)) and back["s"] == {1, 2, frozenset({3})}
    assert back["b"] == nested["b"] and back[7] is None and back[("k", 1)] == 1.5
    np.testing.assert_array_equal(back["arrays"][0], np.arange(10))
    np.testing.assert_array_equal(back["arrays"][1]["deep"], np.eye(300))
    futures = [p.call_async("scale", arrays[0], k) for k in range(4)]
    for k, f in enumerate(futures):
        np.testing.assert_array_equal(f.result(WAIT), arrays[0] * k)


def test_pickle_64_mib_array_round_trip(serve, proxies):
    srv = serve(codec="pickle", authkey=KEY).start()
    p = proxies(srv.address, codec="pickle", authkey=KEY)
    a = np.random.default_rng(7).integers(0, 1 << 62, size=(64 << 20) // 8, dtype=np.int64)
    assert a.nbytes == 64 << 20
    b = p.echo(a)
    assert b.dtype == a.dtype and b.shape == a.shape
    assert np.array_equal(a, b)


def test_server_accepting_several_codecs_refuses_others_clearly(serve, proxies, address):
    srv = serve(address, codec=("msgpack", "json")).start()
    mp = proxies(srv.address, codec="msgpack")
    js = proxies(srv.address, codec="json")
    assert mp.echo(b"bin") == b"bin"
    assert js.echo("text") == "text"
    with pytest.raises(ProtocolError) as e:
        RPCProxy(srv.address, codec="pickle", timeout=WAIT)
    assert "pickle" in str(e.value)
    assert srv.stats()["errors"].get("codec") == 1
    assert mp.add(1, 1) == 2 and js.add(2, 2) == 4           # and it keeps serving
    assert proxies(srv.address, codec="json").add(3, 3) == 6

    only_json = serve(codec="json").start()
    with pytest.raises(ProtocolError) as e:
        RPCProxy(only_json.address, codec="msgpack", timeout=WAIT)
    assert "msgpack" in str(e.value)
    assert only_json.stats()["errors"] == {"codec": 1}


@pytest.mark.parametrize("hello,kind,needle", [
    (b"GET / HTTP/1.0\r\n\r\n", "protocol", "not a fastnet RPC hello"),
    (b"\xff\xfe not utf-8", "protocol", "not a fastnet RPC hello"),
    (json.dumps({"codec": "msgpack"}).encode(), "protocol", "not a fastnet RPC hello"),
    (json.dumps({"fastnet-rpc": "1", "codec": "msgpack"}).encode(), "protocol", "not a fastnet RPC hello"),
    (json.dumps({"fastnet-rpc": 2, "codec": "msgpack"}).encode(), "version", "version 2"),
    (json.dumps({"fastnet-rpc": 1, "codec": "yaml"}).encode(), "codec", "yaml"),
    (b"x" * 10000, "protocol", "hello"),
], ids=["http", "not-utf8", "no-version", "str-version", "version-2", "unknown-codec", "oversized"])
def test_raw_client_with_a_bad_hello_gets_a_refusal_then_close(serve, proxies, hello, kind, needle):
    srv = serve().start()
    with fastnet.Client(srv.address, timeout=WAIT) as c:
        c.send_bytes(hello)
        frames = read_to_eof(c)
    assert len(frames) == 1, frames
    refusal = json.loads(frames[0])
    assert refusal["fastnet-rpc"] == 1 and needle in refusal["error"]
    assert srv.stats()["errors"] == {kind: 1}
    assert proxies(srv.address).add(1, 2) == 3


# -- security --------------------------------------------------------------------------------


def test_pickle_without_authentication_refuses_to_start(address):
    before = count_fds()
    for codec in ("pickle", ("msgpack", "pickle"), ["json", "pickle"]):
        with pytest.raises(ValueError, match="pickle"):
            RPCServer(address, codec=codec)
        with pytest.raises(ValueError, match="pickle"):
            RPCServer(address, codec=codec, allow_insecure_pickle=False)
    assert count_fds() == before
    if isinstance(address, str):
        assert not os.path.exists(address)
    with pytest.raises(ValueError, match="codec"):
        RPCServer(address, codec="no-such-codec")
    with pytest.raises(ValueError):
        RPCServer(address, codec=())


def test_allow_insecure_pickle_starts_and_serves_pickle(serve, proxies, address):
    srv = serve(address, codec=("msgpack", "pickle"), allow_insecure_pickle=True).start()
    p = proxies(srv.address, codec="pickle")
    assert p.echo((1, {2})) == (1, {2})
    assert proxies(srv.address).echo((1, 2)) == [1, 2]


def test_wrong_authkey_is_an_authentication_error(serve, proxies, address):
    srv = serve(address, authkey=KEY, codec=("msgpack", "pickle")).start()
    for codec in ("msgpack", "pickle"):
        with pytest.raises(AuthenticationError):
            RPCProxy(srv.address, authkey=b"wrong key", codec=codec, timeout=WAIT)
    assert wait_for(lambda: srv.stats()["handshake_failures"] == 2)
    assert proxies(srv.address, authkey=KEY, codec="pickle").echo({1}) == {1}


def test_client_without_authkey_fails_cleanly(serve, proxies, address):
    srv = serve(address, authkey=KEY).start()
    for _ in range(3):                         # warm up
        with pytest.raises((AuthenticationError, ProtocolError)):
            RPCProxy(srv.address, timeout=WAIT, connect_timeout=WAIT)
    assert wait_for(lambda: srv.stats()["handshake_failures"] == 3)
    before = count_fds()
    for _ in range(20):
        with pytest.raises((AuthenticationError, ProtocolError)):
            RPCProxy(srv.address, timeout=WAIT, connect_timeout=WAIT)
    assert wait_for(lambda: srv.stats()["handshake_failures"] == 23)
    assert srv.stats()["connections_open"] == 0
    assert count_fds() == before
    assert proxies(srv.address, authkey=KEY).add(1, 2) == 3


# -- call_async, notify ------------------------------------------------------------------------


def test_a_thousand_calls_in_flight_matched_by_id(serve, proxies, address):
    srv = serve(address).start()
    p = proxies(srv.address)
    futures = [p.call_async("ident", i) for i in range(1000)]
    assert all(isinstance(f, concurrent.futures.Future) for f in futures)
    for i, f in enumerate(futures):
        assert f.result(WAIT) == ["reply", i, i * 7 + 1]
    assert p.pending == 0
    assert srv.stats()["methods"]["ident"]["calls"] == 1000


def test_replies_out_of_order_with_futures_wait_and_as_completed(serve, proxies, address):
    srv = serve(address)
    gate = add_gate(srv)
    srv.start()
    p = proxies(srv.address)
    slow = p.call_async("gate", "slow one")
    assert gate.entered.wait(WAIT)
    fast = [p.call_async("ident", i) for i in range(20)]
    # nobody calls result(): the proxy reads the replies on its own
    done, not_done = concurrent.futures.wait(fast, timeout=WAIT)
    assert not not_done
    assert not slow.done()                         # issued first, answered last
    seen = [f.result() for f in concurrent.futures.as_completed(fast, timeout=WAIT)]
    assert sorted(seen) == [["reply", i, i * 7 + 1] for i in range(20)]
    assert p.pending == 1
    gate.release.set()
    assert [f.result() for f in concurrent.futures.as_completed([slow], timeout=WAIT)] == ["slow one"]
    assert p.pending == 0


def test_add_done_callback_fires_with_the_result(serve, proxies):
    srv = serve()
    gate = add_gate(srv)
    srv.start()
    p = proxies(srv.address)
    got = []
    fired = threading.Event()

    def callback(f):
        got.append((f.result() if f.exception() is None else f.exception()))
        if len(got) == 3:
            fired.set()

    f1 = p.call_async("gate", "later")
    f1.add_done_callback(callback)
    assert gate.entered.wait(WAIT)
    assert not fired.is_set() and not f1.done()
    f2 = p.call_async("add", 2, 3)
    f2.add_done_callback(callback)
    f3 = p.call_async("fail", "bad")
    f3.add_done_callback(callback)
    gate.release.set()
    assert fired.wait(WAIT)
    assert "later" in got and 5 in got
    errors = [g for g in got if isinstance(g, RemoteError)]
    assert len(errors) == 1 and errors[0].type_name == "ValueError"
    done = p.call_async("add", 1, 1)
    assert done.result(WAIT) == 2
    late = []
    done.add_done_callback(late.append)            # already done: fires at once
    assert late == [done]


def test_notify_runs_on_the_server_and_returns_nothing(serve, proxies, address):
    srv = serve(address).start()
    p = proxies(srv.address)
    assert p.notify("count", "note 1") is None
    assert p.notify("count", tag="note 2") is None
    p.notify("fail", "nobody hears this")           # errors stay on the server
    p.notify("no.such.method", 1)
    assert p.pending == 0
    assert p.calls() == ["note 1", "note 2"]
    assert srv.call_log.snapshot() == ["note 1", "note 2"]
    assert srv.stats()["errors"].get("method_not_found") == 1
    assert srv.stats()["methods"]["fail"]["errors"] == 1


# -- timeouts ----------------------------------------------------------------------------------


def _slow_call(how, p):
    if how == "proxy":
        return p.gate("late")
    if how == "with_timeout":
        return p.with_timeout(0.2).gate("late")
    if how == "with_timeout.call":
        return p.with_timeout(0.2).call("gate", "late")
    return p.invoke("gate", ["late"], timeout=0.2)


@pytest.mark.parametrize("how", ["proxy", "with_timeout", "with_timeout.call", "invoke"])
def test_slow_call_times_out_and_the_late_reply_is_discarded(serve, proxies, address, how):
    srv = serve(address)
    gate = add_gate(srv)
    srv.start()
    p = proxies(srv.address, timeout=0.5 if how == "proxy" else None)
    with pytest.raises(fastnet.TimeoutError) as e:
        _slow_call(how, p)
    assert isinstance(e.value, builtins.TimeoutError)
    assert gate.entered.wait(WAIT) and p.pending == 0
    gate.release.set()
    # the server has answered (it counts the call once its reply is queued)
    assert wait_for(lambda: srv.stats()["methods"]["gate"]["calls"] == 1)
    assert p.late_replies == 0
    assert p.add(20, 22) == 42                     # reads and drops the late reply first
    assert p.late_replies == 1
    assert p.echo("next") == "next"
    assert srv.stats()["connections_total"] == 1   # the same connection throughout


def test_per_call_timeout_overrides_the_proxy_default(serve, proxies):
    srv = serve()
    gate = add_gate(srv)
    srv.start()
    p = proxies(srv.address, timeout=0.2)
    gate.release.set()
    assert p.invoke("gate", ["ok"], timeout=WAIT) == "ok"
    assert p.with_timeout(WAIT).gate("ok") == "ok"


def test_call_async_with_a_timeout_fails_its_future(serve, proxies, address):
    srv = serve(address)
    gate = add_gate(srv)
    srv.start()
    p = proxies(srv.address, timeout=0.2)
    fut = p.call_async("gate", "late")
    other = p.with_timeout(0.2).call_async("gate", "late too")
    for f in (fut, other):
        exc = f.exception(WAIT)
        assert isinstance(exc, fastnet.TimeoutError) and isinstance(exc, builtins.TimeoutError)
    assert p.pending == 0
    gate.release.set()
    assert wait_for(lambda: srv.stats()["methods"]["gate"]["calls"] == 2)
    assert p.add(1, 2) == 3
    assert p.call_async("add", 2, 2).result(WAIT) == 4
    assert p.late_replies == 2


# -- blocking functions ------------------------------------------------------------------------


def test_a_blocking_call_does_not_stall_other_clients(serve, proxies, address):
    srv = serve(address)
    gate = add_gate(srv)
    srv.start()
    slow_client = proxies(srv.address)
    fast_client = proxies(srv.address)
    slow = slow_client.call_async("gate", "slow")
    sync_result = []
    t = threading.Thread(target=lambda: sync_result.append(slow_client.gate("sync slow")))
    t.start()
    assert gate.entered.wait(WAIT)
    for i in range(100):
        assert fast_client.ident(i) == ["reply", i, i * 7 + 1]
    # the same client's own fast calls are not stuck behind its slow ones either
    assert slow_client.add(1, 2) == 3
    assert not slow.done() and t.is_alive()
    gate.release.set()
    assert slow.result(WAIT) == "slow"
    t.join(WAIT)
    assert sync_result == ["sync slow"]


def test_blocking_sleep_while_other_calls_complete(processes, proxies):
    # a real sleep(1) in a server process; the server's own log shows what ran meanwhile
    server = processes(("127.0.0.1", 0))
    a = proxies(server.address)
    b = proxies(server.address)
    slow = a.call_async("sleep", 1.0)
    assert wait_for(lambda: b.calls()[:1] == ["sleep start"])
    counts = [b.count(i) for i in range(100)]
    assert counts == sorted(set(counts))
    assert slow.result(WAIT) == 1.0
    log = b.calls()
    assert sorted(log, key=str) == sorted(["sleep start", "sleep end"] + list(range(100)), key=str)
    # the fast calls ran while the slow one slept, not after it
    assert log.index(0) < log.index("sleep end")


# -- dropped connections -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_server_killed_with_calls_pending_then_restarted(processes, proxies, kind):
    address = ("127.0.0.1", free_tcp_port()) if kind == "tcp" else _unix_path()
    try:
        server = processes(address)
        p = proxies(server.address, connect_timeout=WAIT)
        watcher = proxies(server.address, connect_timeout=1.0)
        assert p.count("before") == 1
        results = {}

        def sync_call(tag):
            try:
                results[tag] = p.park(tag)
            except BaseException as e:
                results[tag] = e

        threads = [threading.Thread(target=sync_call, args=(f"sync {i}",)) for i in range(4)]
        for t in threads:
            t.start()
        futures = [p.call_async("park", f"async {i}") for i in range(4)]
        tags = [f"sync {i}" for i in range(4)] + [f"async {i}" for i in range(4)]
        assert wait_for(lambda: len(watcher.calls()) == 9)
        assert sorted(watcher.calls()) == sorted(["before"] + tags)   # each ran once
        assert p.pending == 8
        server.kill()
        for t in threads:
            t.join(WAIT)
            assert not t.is_alive()
        for tag in tags[:4]:
            assert isinstance(results[tag], ConnectionLost), results[tag]
        for f in futures:
            assert isinstance(f.exception(WAIT), ConnectionLost)
        assert p.pending == 0
        with pytest.raises(ConnectionLost):
            watcher.calls()           # it was idle: the failure shows at its next call

        # the next call reconnects, retrying while the server comes back
        after = []
        t = threading.Thread(target=lambda: after.append(_outcome(p.count, "after")))
        t.start()
        restarted = processes(address)
        t.join(WAIT)
        assert after == [1]
        assert p.calls() == ["after"]            # nothing was sent again
        assert watcher.calls() == ["after"]
        assert restarted.address == server.address
    finally:
        if isinstance(address, str) and os.path.exists(address):
            os.unlink(address)


def test_graceful_server_shutdown_is_connection_lost_not_a_hang(processes, proxies, address):
    server = processes(address, shutdown_timeout=0.5)
    p = proxies(server.address, connect_timeout=0.5)
    idle = proxies(server.address, connect_timeout=0.5)
    assert p.count("x") == 1 and idle.echo(1) == 1
    results = []
    t = threading.Thread(target=lambda: results.append(_outcome(p.park, "pending sync")))
    t.start()
    fut = p.call_async("park", "pending async")
    assert wait_for(lambda: len(idle.calls()) == 3)
    assert server.terminate() == 0
    assert b"STOPPED" in server.proc.stdout.read()   # serve_forever returned: a graceful stop
    t.join(WAIT)
    assert not t.is_alive() and isinstance(results[0], ConnectionLost), results
    assert isinstance(fut.exception(WAIT), ConnectionLost)
    for proxy in (p, idle):
        with pytest.raises(ConnectionLost):
            proxy.echo(1)             # nobody to reconnect to: fails after connect_timeout


def _outcome(fn, *args):
    try:
        return fn(*args)
    except BaseException as e:
        return e


def test_calls_in_progress_are_answered_during_a_graceful_shutdown(serve, proxies):
    """RPCServer.shutdown: "Stop accepting, let the calls in progress answer, close, and join"."""
    srv = serve(shutdown_timeout=WAIT)
    gate = add_gate(srv)
    srv.start()
    address = srv.address
    p = proxies(address)
    fut = p.call_async("gate", "answered")
    assert gate.entered.wait(WAIT)
    stopper = threading.Thread(target=srv.shutdown)
    stopper.start()

    def refused():
        try:
            socket.create_connection(address, timeout=WAIT).close()
        except (ConnectionRefusedError, ConnectionResetError):
            # reset: the probe was in the listen backlog when the listener closed
            return True
        return False

    assert wait_for(refused)                  # shutdown has begun: no longer accepting
    gate.release.set()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    assert _outcome(fut.result, WAIT) == "answered"


def test_idle_connection_closed_by_the_server_reconnects_transparently(serve, proxies, address):
    srv = serve(address, idle_timeout=0.2).start()
    p = proxies(srv.address)
    assert p.count("first") == 1
    assert wait_for(lambda: srv.stats()["idle_closed"] == 1)
    assert _outcome(p.count, "second") == 2     # not ConnectionLost: that call never left
    assert p.calls() == ["first", "second"]
    assert srv.stats()["connections_total"] == 2


# -- threads -------------------------------------------------------------------------------------


class Turns:
    """A blocking method whose calls return in a set order, not the order they arrived in.

    ``take(i)`` waits until ``i`` is next in ``order`` and returns ``[i, i * i]``;
    with as many worker threads as calls, the replies leave in ``order``.
    """

    def __init__(self, order):
        self.order = list(order)
        self.next = 0
        self.cv = threading.Condition()

    def take(self, i):
        with self.cv:
            if not self.cv.wait_for(lambda: self.order[self.next] == i, WAIT):
                raise RuntimeError(f"call {i} never got its turn")
            self.next += 1
            self.cv.notify_all()
        return [i, i * i]


def _turns(srv, n, seed):
    import random
    order = list(range(n))
    random.Random(seed).shuffle(order)
    turns = Turns(order)
    srv.register_function(turns.take, "take", blocking=True)
    return turns


@pytest.mark.parametrize("codec", ["msgpack", "json", "pickle"])
@pytest.mark.parametrize("how", ["call_async", "batch"])
def test_pipelined_replies_in_shuffled_order_reach_their_calls(serve, proxies, address, codec, how):
    n = 64
    srv = serve(address, codec=codec, authkey=KEY, worker_threads=n)
    _turns(srv, n, seed=n + len(codec))
    srv.start()
    p = proxies(srv.address, codec=codec, authkey=KEY)
    if how == "batch":
        with p.batch() as b:
            futures = [b.call_async("take", i) for i in range(n)]
    else:
        futures = [p.call_async("take", i) for i in range(n)]
    assert [f.result(WAIT) for f in futures] == [[i, i * i] for i in range(n)]
    assert p.pending == 0 and p.late_replies == 0


def test_64_threads_get_their_own_replies_when_the_server_answers_out_of_order(serve, proxies, address):
    n = 64
    srv = serve(address, worker_threads=n)
    turns = _turns(srv, n, seed=7)
    srv.start()
    p = proxies(srv.address)
    got = {}
    errors = []
    start = threading.Barrier(n, timeout=WAIT)

    def work(i):
        try:
            start.wait()
            got[i] = p.take(i) if i % 2 else p.call_async("take", i).result(WAIT)
        except BaseException as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 2)
    assert not errors, errors[:5]
    assert got == {i: [i, i * i] for i in range(n)}
    assert turns.next == n
    assert p.pending == 0 and p.late_replies == 0



@pytest.mark.parametrize("nthreads", [16, 64])
def test_threads_sharing_one_proxy(serve, proxies, address, nthreads):
    srv = serve(address).start()
    p = proxies(srv.address)
    start = threading.Barrier(nthreads, timeout=WAIT)
    errors = []
    done = []

    def work(t):
        try:
            start.wait()
            futures = []
            for j in range(30):
                k = t * 1000 + j
                if j % 3 == 0:
                    futures.append((k, p.call_async("ident", k)))
                elif j % 3 == 1:
                    assert p.ident(k) == ["reply", k, k * 7 + 1]
                else:
                    assert p.kw(k, c=t) == [k, 2, t]
            for k, f in futures:
                assert f.result(WAIT) == ["reply", k, k * 7 + 1]
            done.append(t)
        except BaseException as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 2)
    assert not errors, errors[:5]
    assert sorted(done) == list(range(nthreads))
    assert p.pending == 0
    assert srv.stats()["methods"]["ident"]["calls"] == nthreads * 20
    assert srv.stats()["connections_total"] == 1


# -- prefork -------------------------------------------------------------------------------------


def test_prefork_workers_serve_calls(serve, proxies, address):
    srv = serve(address, workers=2).start()
    workers = set(srv.worker_pids)
    assert len(workers) == 2 and os.getpid() not in workers
    a = proxies(srv.address)
    b = proxies(srv.address)
    pids = {a.pid(), b.pid()}
    assert pids == workers                       # two connections held: one per worker
    assert {a.blocking_pid(), b.blocking_pid()} == workers
    assert a.blocking_pid() == a.pid()           # one connection stays with its worker
    futures = [a.call_async("ident", i) for i in range(200)]
    assert [f.result(WAIT) for f in futures] == [["reply", i, i * 7 + 1] for i in range(200)]
    st = srv.stats()
    assert st["workers"] == 2 and st["worker_restarts"] == 0
    a.close()
    b.close()
    assert wait_for(lambda: srv.stats()["connections_open"] == 0)
    assert srv.stats()["messages_in"] >= 206


def test_prefork_stats_sum_the_workers_and_keep_a_dead_workers_counts(serve, proxies, address):
    srv = serve(address, workers=2).start()
    a = proxies(srv.address)
    b = proxies(srv.address)
    victim = a.pid()
    assert {victim, b.pid()} == set(srv.worker_pids)        # one connection per worker
    for i in range(5):
        assert a.add(i, 1) == i + 1
        assert b.add(i, 2) == i + 2
    assert a.blocking_pid() == victim                       # on a worker thread
    with pytest.raises(RemoteError):
        a.add(1)
    with pytest.raises(MethodNotFound):
        b.nope()
    with pytest.raises(ProtocolError):
        RPCProxy(srv.address, codec="json", timeout=WAIT)   # refused in a worker
    st = srv.stats()
    assert st["methods"]["add"]["calls"] == 11 and st["methods"]["add"]["errors"] == 1
    assert st["methods"]["pid"]["calls"] == 2
    assert st["methods"]["blocking_pid"]["calls"] == 1
    assert st["errors"] == {"method_not_found": 1, "codec": 1}
    lat = st["methods"]["add"]["latency_seconds"]
    counts = [n for _le, n in lat["buckets"]]
    assert counts == sorted(counts) and counts[-1] == lat["count"] == 11 and lat["sum"] > 0
    json.dumps(st)

    # a worker dies: what it counted stays, and its replacement adds to it
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: len(srv.worker_pids) == 2 and victim not in srv.worker_pids)
    assert srv.stats()["methods"]["add"]["calls"] == 11
    for _ in range(4):
        c = proxies(srv.address)
        assert c.add(1, 1) == 2
        c.close()
    st = srv.stats()
    assert st["worker_restarts"] == 1
    assert st["methods"]["add"]["calls"] == 15 and st["methods"]["add"]["errors"] == 1
    assert st["methods"]["add"]["latency_seconds"]["count"] == 15


# -- stats ----------------------------------------------------------------------------------------


def test_stats_per_method_and_errors_by_kind(serve, proxies):
    srv = serve()
    gate = add_gate(srv)
    gate.release.set()
    srv.start()
    p = proxies(srv.address)
    for i in range(5):
        assert p.add(i, i) == 2 * i
    with pytest.raises(RemoteError):
        p.add(1)
    with pytest.raises(MethodNotFound):
        p.nope()
    assert p.gate("x") == "x"
    with pytest.raises(ProtocolError):
        RPCProxy(srv.address, codec="json", timeout=WAIT)
    with fastnet.Client(srv.address, timeout=WAIT) as c:
        c.send_bytes(b"not a hello")
        read_to_eof(c)
    st = srv.stats()
    assert st["errors"] == {"method_not_found": 1, "codec": 1, "protocol": 1}
    add = st["methods"]["add"]
    assert add["calls"] == 6 and add["errors"] == 1
    assert st["methods"]["gate"]["calls"] == 1 and st["methods"]["gate"]["errors"] == 0
    assert st["methods"]["echo"] == {"calls": 0, "errors": 0, "latency_seconds": {
        "buckets": [[le, 0] for le in LATENCY_BUCKETS] + [["+Inf", 0]], "sum": 0.0, "count": 0}}
    for name in ("add", "gate"):
        lat = st["methods"][name]["latency_seconds"]
        buckets = lat["buckets"]
        assert [b[0] for b in buckets] == list(LATENCY_BUCKETS) + ["+Inf"]
        counts = [b[1] for b in buckets]
        assert counts == sorted(counts)           # cumulative
        assert counts[-1] == lat["count"] == st["methods"][name]["calls"]
        assert lat["sum"] > 0
    assert st["connections_total"] == 3 and st["messages_in"] >= 8
    json.dumps(st)                                 # plain data, ready for a monitor


# -- server and proxy life cycle -----------------------------------------------------------------


def test_server_context_manager_start_shutdown_address_and_repr(address):
    with build(address) as srv:
        assert srv.start() is srv
        addr = srv.address
        if isinstance(address, tuple):
            assert addr[0] == "127.0.0.1" and addr[1] != 0
        else:
            assert addr == address and os.path.exists(address)
        assert repr(addr) in repr(srv) and "msgpack" in repr(srv)
        with RPCProxy(addr, timeout=WAIT) as p:
            assert p.add(1, 2) == 3
            assert "connected" in repr(p) and "msgpack" in repr(p)
        assert "closed" in repr(p)
    if isinstance(address, tuple):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(addr, timeout=WAIT)
    else:
        assert not os.path.exists(address)
    with pytest.raises(ConnectionLost):
        RPCProxy(addr, timeout=WAIT, connect_timeout=0.2)

    srv = build(("127.0.0.1", 0), codec=("json", "msgpack"))
    srv.start()
    addr = srv.address
    assert "json" in repr(srv)
    with RPCProxy(addr, codec="json", timeout=WAIT) as p:
        assert p.echo([1]) == [1]
    srv.shutdown()
    srv.server_close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(addr, timeout=WAIT)


def test_proxy_close_fails_pending_calls_and_later_calls(serve):
    srv = serve()
    gate = add_gate(srv)
    srv.start()
    p = RPCProxy(srv.address, timeout=WAIT)
    assert p.connected
    results = []
    t = threading.Thread(target=lambda: results.append(_outcome(p.gate, "never")))
    t.start()
    futures = [p.call_async("gate", "never either") for _ in range(3)]
    assert gate.entered.wait(WAIT)
    assert wait_for(lambda: p.pending == 4)
    p.close()
    t.join(5.0)          # a deadline, not a measurement: close() wakes it at once
    assert not t.is_alive(), "close() left a synchronous call blocked in another thread"
    assert isinstance(results[0], ConnectionLost), results
    for f in futures:
        assert isinstance(f.exception(WAIT), ConnectionLost)
    assert not p.connected and p.pending == 0 and "closed" in repr(p)
    for call in (lambda: p.add(1, 2), lambda: p.call_async("add", 1, 2),
                 lambda: p.notify("count", "x"), lambda: p.with_timeout(1).add(1, 2)):
        with pytest.raises(ConnectionLost):
            call()
    p.close()                                     # twice is harmless
    gate.release.set()


def test_lazy_proxy_connects_at_the_first_call(serve):
    srv = serve().start()
    with RPCProxy(srv.address, lazy=True, timeout=WAIT) as p:
        assert not p.connected and srv.stats()["connections_total"] == 0
        assert p.add(1, 2) == 3
        assert p.connected


# -- malformed requests ----------------------------------------------------------------------------


def _pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


MALFORMED = {
    # closes the connection: nothing to address a reply to
    "garbage": ([b"\x92\x01\xc4\xff"], "close"),
    "not msgpack at all": ([b"\xc7"], "close"),
    "a map": ([_pack({"method": "echo"})], "close"),
    "empty list": ([_pack([])], "close"),
    "unknown kind": ([_pack([7, 1, "echo", [], None])], "close"),
    "reply kind": ([_pack([1, 1, None, None])], "close"),
    "too few fields": ([_pack([0, 1, "echo"])], "close"),
    "too many fields": ([_pack([0, 1, "echo", [1], None, "x"])], "close"),
    "msgid a str": ([_pack([0, "1", "echo", [1], None])], "close"),
    "msgid a float": ([_pack([0, 1.0, "echo", [1], None])], "close"),
    "short oob marker": ([b"\xc1\x00\x01"], "close"),
    "oob marker of 0": ([b"\xc1\x00\x00\x00\x00"], "close"),
    "oob buffers msgpack cannot take": ([b"\xc1\x00\x00\x00\x01", _pack([0, 1, "echo", [1], None]), b"buf"],
                                        "close"),
    "notification with int method": ([_pack([2, 5, [], None])], "close"),
    # a well-formed request id: answered with an error
    "method an int": ([_pack([0, 11, 5, [], None])], "error"),
    "args a str": ([_pack([0, 12, "echo", "abc", None])], "error"),
    "args a map": ([_pack([0, 13, "echo", {"x": 1}, None])], "error"),
    "kwargs a list": ([_pack([0, 14, "echo", [], [1]])], "error"),
    "kwargs with int keys": ([_pack([0, 15, "echo", [], {1: 2}])], "error"),
}


def _send_malformed(address, frames, expect):
    c = raw_rpc_client(address)
    with c:
        for f in frames:
            c.send_bytes(f)
        if expect == "close":
            assert read_to_eof(c) == []
            return None
        assert c.poll(WAIT)
        kind, msgid, error, result = msgpack.unpackb(c.recv_bytes(), raw=False)
        assert kind == 1 and result is None and isinstance(error, list) and len(error) == 3
        # and the connection is still good for a proper request
        c.send_bytes(_pack([0, 99, "echo", ["fine"], None]))
        assert c.poll(WAIT)
        assert msgpack.unpackb(c.recv_bytes(), raw=False) == [1, 99, None, "fine"]
        return msgid, error


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_each_malformed_request(serve, proxies, name):
    srv = serve().start()
    frames, expect = MALFORMED[name]
    out = _send_malformed(srv.address, frames, expect)
    if out is not None:
        msgid, error = out
        assert msgid == msgpack.unpackb(frames[0], strict_map_key=False)[1]
        assert error[0] in ("ProtocolError", "TypeError"), error
    else:
        assert srv.stats()["errors"].get("protocol") == 1
    assert proxies(srv.address).echo("others are served") == "others are served"


def test_malformed_requests_leak_no_descriptors(serve, proxies, address):
    srv = serve(address).start()
    good = proxies(srv.address)
    cases = list(MALFORMED.values())
    for frames, expect in cases:                        # warm up
        _send_malformed(srv.address, frames, expect)
    assert wait_for(lambda: srv.stats()["connections_open"] == 1)
    before = count_fds()
    for _ in range(5):
        for frames, expect in cases:
            _send_malformed(srv.address, frames, expect)
            assert good.add(1, 1) == 2
    assert wait_for(lambda: srv.stats()["connections_open"] == 1)
    assert count_fds() == before
    closes = sum(1 for _, e in cases if e == "close")
    assert srv.stats()["errors"]["protocol"] == closes * 6
