"""The rpc cases: sequential calls, and calls kept in flight on one connection."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .common import (Impl, NotAvailable, _accept_one, _addr, _fastnet, _listen_address, _msgpack, _need,
                     _per_second, _samples, _with_cpu_share, _zmq, _zmq_bind, _zmq_close)
from .pingpong import _pingpong_conn_client, _pingpong_conn_server


# Sequential calls of add(2, 3) from one client, and calls kept in flight on
# one connection.  Every server also has echo(x) (the array RPCs of bench/)
# and stop(); servers that outlive their client's connection exit on stop.

RPC_IN_FLIGHT = 64


def _add(x: Any, y: Any) -> Any:
    return x + y


def _echo(x: Any) -> Any:
    return x


def rpc_codec(impl: Any) -> Any:
    """The fastnet codec of an rpc row: its suffix (``-json``, ``-pickle``), else msgpack."""
    for name in ("json", "pickle"):
        if impl.endswith("-" + name):
            return name
    return "msgpack"


def _rpc_key(spec: dict[str, Any], codec: Any) -> Any:
    # Only pickle needs the authkey (the RPC layer refuses it without one);
    # the other codecs run without, as a msgpack or json client would.
    if codec != "pickle":
        return None
    return bytes.fromhex(spec["authkey"]) or None


def rpc_server(spec: dict[str, Any], ready: Callable[[Any], None], **kw: Any) -> None:
    """A fastnet RPCServer with add, echo and stop, served until stop (``kw``: RPCServer options)."""
    fastnet = _fastnet(spec)
    _need(fastnet, "RPCServer")
    codec = rpc_codec(spec["impl"])
    srv = fastnet.RPCServer(_listen_address(spec), authkey=_rpc_key(spec, codec), codec=codec, **kw)
    srv.register_function(_add, "add")
    srv.register_function(_echo, "echo")
    # shutdown() waits for the loop, so it cannot run on the loop's own thread
    srv.register_function(
        lambda: threading.Thread(target=srv.shutdown, daemon=True).start(), "stop")
    ready(srv.address)
    srv.serve_forever()
    srv.server_close()


def rpc_proxy(spec: dict[str, Any], address: Any, **kw: Any) -> Any:
    """An RPCProxy for ``rpc_server`` (same codec and key); ``kw``: RPCProxy options."""
    fastnet = _fastnet(spec)
    _need(fastnet, "RPCProxy")
    codec = rpc_codec(spec["impl"])
    return fastnet.RPCProxy(_addr(address), authkey=_rpc_key(spec, codec), codec=codec, **kw)


def rpc_stop(proxy: Any) -> None:
    """End an ``rpc_server`` child: a notification, since the shutdown it
    starts may close the connection before a reply to stop could leave."""
    proxy.notify("stop")
    proxy.close()


def _timed_calls(call: Any, k: Any) -> Any:
    t0 = time.perf_counter()
    for _ in range(k):
        call(2, 3)
    return time.perf_counter() - t0


def rpc_sequential(call: Any, spec: dict[str, Any]) -> Any:
    """Samples of calls/s of ``call(2, 3)``, one call at a time."""
    if call(2, 3) != 5:
        raise ValueError("rpc: add(2, 3) != 5")
    return _samples(lambda k: _timed_calls(call, k), spec, 64, 100, _per_second)


def _rpc_fastnet_client(spec: dict[str, Any], address: Any, **kw: Any) -> Any:
    """Sequential calls through an RPCProxy (``kw``: its options), with the proxy's CPU per call."""
    import statistics
    proxy = rpc_proxy(spec, address, **kw)
    out = _with_cpu_share(lambda: rpc_sequential(proxy.add, spec))
    info = out["info"]
    info.update(backend=_fastnet(spec).backend, codec=proxy.codec)
    info["client_cpu_us_per_call"] = round(info["client_cpu_share"] / statistics.median(out["samples"]) * 1e6, 2)
    rpc_stop(proxy)
    return out


# The opt-in busy-polling: the server's loop and the proxy poll for up to
# 50 µs before they sleep, burning CPU to skip the scheduler's wake-up.
_SPIN_US = 50.0


def _rpc_spin_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    rpc_server(spec, ready, spin=_SPIN_US)


def _rpc_spin_client(spec: dict[str, Any], address: Any) -> Any:
    return _rpc_fastnet_client(spec, address, spin=_SPIN_US)


def rpc_window(call_async: Any, spec: dict[str, Any]) -> Any:
    """Samples of calls/s with ``window`` calls in flight: a new call as each oldest one completes."""
    from collections import deque
    window = spec.get("window", RPC_IN_FLIGHT)

    def step(k: Any) -> Any:
        pending: deque[Any] = deque()
        popleft, push = pending.popleft, pending.append
        t0 = time.perf_counter()
        for _ in range(k):
            if len(pending) >= window:
                if popleft().result() != 5:
                    raise ValueError("rpc: add(2, 3) != 5")
            push(call_async("add", 2, 3))
        while pending:
            if popleft().result() != 5:
                raise ValueError("rpc: add(2, 3) != 5")
        return time.perf_counter() - t0

    out = _samples(step, spec, 1024, 1024, _per_second)
    out["info"]["in_flight"] = window
    return out


def rpc_batches(submit: Any, spec: dict[str, Any]) -> Any:
    """Samples of calls/s in batches: ``submit(n)`` starts n calls and returns
    their futures, then all n replies are awaited before the next batch."""
    window = spec.get("window", RPC_IN_FLIGHT)

    def step(k: Any) -> Any:
        t0 = time.perf_counter()
        for _ in range(-(-k // window)):
            for f in submit(window):
                if f.result() != 5:
                    raise ValueError("rpc: add(2, 3) != 5")
        return time.perf_counter() - t0

    out = _samples(step, spec, 1024, 1024, lambda t, n: -(-n // window) * window / t)
    out["info"]["in_flight"] = window
    return out


def rpc_submit(proxy: Any, impl: Any) -> Any:
    """``submit(n)`` for rpc_batches: n call_async (``fastnet-batch``) or one
    ``proxy.batch()`` of n (``fastnet-pbatch``: the requests go out in one write)."""
    call_async = proxy.call_async
    if impl.startswith("fastnet-pbatch"):
        if not hasattr(type(proxy), "batch"):   # (any other name is a remote method)
            raise NotAvailable("RPCProxy.batch is missing")

        def submit(n: Any) -> Any:
            with proxy.batch() as b:
                return [b.call_async("add", 2, 3) for _ in range(n)]
    else:
        def submit(n: Any) -> Any:
            return [call_async("add", 2, 3) for _ in range(n)]
    return submit


def _rpc_fastnet_pipelined_client(spec: dict[str, Any], address: Any) -> Any:
    impl = spec["impl"]
    kw: dict[str, Any] = {}
    if "coalesce" in impl.split("-"):
        # requests queued and written together, when a reply is waited for
        import inspect
        if "coalesce" not in inspect.signature(_fastnet(spec).RPCProxy).parameters:
            raise NotAvailable("fastnet.RPCProxy has no coalesce option")
        kw["coalesce"] = True
    proxy = rpc_proxy(spec, address, **kw)
    if impl.startswith("fastnet-batch") or impl.startswith("fastnet-pbatch"):
        out = rpc_batches(rpc_submit(proxy, impl), spec)
    else:
        out = rpc_window(proxy.call_async, spec)
    out["info"].update(backend=_fastnet(spec).backend, codec=proxy.codec)
    rpc_stop(proxy)
    return out


def _rpc_pingpong_client(spec: dict[str, Any], address: Any) -> Any:
    # fastnet's bare round trip (64-byte echo) as calls/s: the floor under an RPC call
    out = _pingpong_conn_client(spec, address)
    out["samples"] = [1e6 / us for us in out["samples"]]
    return out


# The pickle RPC of the Python Cookbook's recipe 11.8 over multiprocessing.connection:
# the proxy sends (name, args, kwargs), the handler answers the result or the exception.

class CookbookRPCHandler:
    def __init__(self) -> None:
        self._functions: dict[str, Any] = {}

    def register_function(self, func: Any, name: Any = None) -> None:
        self._functions[name or func.__name__] = func

    def handle_connection(self, connection: Any) -> None:
        try:
            while True:
                func_name, args, kwargs = connection.recv()
                try:
                    r = self._functions[func_name](*args, **kwargs)
                    connection.send(r)
                except Exception as e:
                    connection.send(e)
        except EOFError:
            pass


class CookbookRPCProxy:
    def __init__(self, connection: Any) -> None:
        self._connection = connection

    def __getattr__(self, name: Any) -> Any:
        def do_rpc(*args: Any, **kwargs: Any) -> Any:
            self._connection.send((name, args, kwargs))
            result = self._connection.recv()
            if isinstance(result, Exception):
                raise result
            return result
        return do_rpc


def _rpc_mp_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    import multiprocessing.connection as mpc
    handler = CookbookRPCHandler()
    handler.register_function(_add, "add")
    handler.register_function(_echo, "echo")
    conn = _accept_one(spec, mpc, ready, authkey=bytes.fromhex(spec["authkey"]))
    handler.handle_connection(conn)
    conn.close()


def _rpc_mp_client(spec: dict[str, Any], address: Any) -> Any:
    import multiprocessing.connection as mpc
    conn = mpc.Client(_addr(address), authkey=bytes.fromhex(spec["authkey"]))
    proxy = CookbookRPCProxy(conn)
    if spec["case"] == "rpc-pipe":
        out = _rpc_mp_pipelined(conn, spec)
    else:
        # the recipe's proxy.add(2, 3): a new closure per attribute lookup, as written
        out = rpc_sequential(lambda x, y: proxy.add(x, y), spec)
    conn.close()
    return out


def _rpc_mp_pipelined(conn: Any, spec: dict[str, Any]) -> Any:
    # The recipe's handler answers in order, so a client may send a batch of
    # requests and then read their replies (the pipe holds them meanwhile).
    window = spec.get("window", RPC_IN_FLIGHT)
    send, recv = conn.send, conn.recv
    request: tuple[str, tuple[int, int], dict[str, Any]] = ("add", (2, 3), {})

    def step(k: Any) -> Any:
        t0 = time.perf_counter()
        for _ in range(-(-k // window)):
            for _ in range(window):
                send(request)
            for _ in range(window):
                if recv() != 5:
                    raise ValueError("rpc: add(2, 3) != 5")
        return time.perf_counter() - t0

    out = _samples(step, spec, 1024, 1024, lambda t, n: -(-n // window) * window / t)
    out["info"]["in_flight"] = window
    return out


def _rpc_xmlrpc_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> Any:
    if spec["family"] != "tcp":
        raise NotAvailable("xmlrpc speaks HTTP over TCP only")
    from xmlrpc.server import SimpleXMLRPCServer
    srv = SimpleXMLRPCServer(("127.0.0.1", 0), logRequests=False, allow_none=True)
    stopping = []
    srv.register_function(_add, "add")
    srv.register_function(lambda: stopping.append(1), "stop")
    ready(srv.server_address)
    while not stopping:
        srv.handle_request()
    srv.server_close()


def _rpc_xmlrpc_client(spec: dict[str, Any], address: Any) -> Any:
    import xmlrpc.client
    host, port = _addr(address)
    proxy = xmlrpc.client.ServerProxy(f"http://{host}:{port}/", allow_none=True)
    out = rpc_sequential(proxy.add, spec)
    proxy.stop()
    proxy("close")()
    return out




# pyzmq + msgpack: request [msgid, method, args], reply [msgid, error, result].

def _zmq_rpc_reply(functions: Any, packb: Any, unpackb: Any, data: Any) -> Any:
    msgid, method, args = unpackb(data)
    try:
        return packb([msgid, None, functions[method](*args)]), method == "stop"
    except Exception as e:
        return packb([msgid, f"{type(e).__name__}: {e}", None]), False


def _rpc_zmq_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    zmq = _zmq()
    mp = _msgpack()
    ctx = zmq.Context()
    router = spec["case"] == "rpc-pipe"
    sock = ctx.socket(zmq.ROUTER if router else zmq.REP)
    ready(_zmq_bind(sock, spec))
    functions = {"add": _add, "echo": _echo, "stop": lambda: None}
    packb, unpackb = mp.packb, mp.unpackb
    stop = False
    while not stop:
        if router:
            ident, data = sock.recv_multipart()
            reply, stop = _zmq_rpc_reply(functions, packb, unpackb, data)
            sock.send_multipart([ident, reply])
        else:
            reply, stop = _zmq_rpc_reply(functions, packb, unpackb, sock.recv())
            sock.send(reply)
    _zmq_close(ctx, sock)


def _rpc_zmq_client(spec: dict[str, Any], address: Any) -> Any:
    zmq = _zmq()
    mp = _msgpack()
    ctx = zmq.Context()
    pipelined = spec["case"] == "rpc-pipe"
    sock = ctx.socket(zmq.DEALER if pipelined else zmq.REQ)
    sock.connect(address)
    packb, unpackb = mp.packb, mp.unpackb
    send, recv = sock.send, sock.recv
    ids = iter(range(1, 1 << 62))

    def call(x: Any, y: Any) -> Any:
        send(packb([next(ids), "add", [x, y]]))
        msgid, error, result = unpackb(recv())
        if error is not None:
            raise RuntimeError(error)
        return result

    if pipelined:
        out = _zmq_window(send, recv, packb, unpackb, spec)
    else:
        out = rpc_sequential(call, spec)
    send(packb([0, "stop", []]))
    recv()
    _zmq_close(ctx, sock)
    return out


def _zmq_window(send: Any, recv: Any, packb: Any, unpackb: Any, spec: dict[str, Any]) -> Any:
    # DEALER: ``window`` requests in flight, a new one sent as each reply arrives
    window = spec.get("window", RPC_IN_FLIGHT)

    def step(k: Any) -> Any:
        t0 = time.perf_counter()
        sent = 0
        for _ in range(min(window, k)):
            sent += 1
            send(packb([sent, "add", [2, 3]]))
        for _ in range(k):
            msgid, error, result = unpackb(recv())
            if result != 5:
                raise ValueError(f"rpc: add(2, 3) -> {error or result!r}")
            if sent < k:
                sent += 1
                send(packb([sent, "add", [2, 3]]))
        return time.perf_counter() - t0

    out = _samples(step, spec, 1024, 1024, _per_second)
    out["info"]["in_flight"] = window
    return out


def _rpc_pyro5_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> Any:
    try:
        import Pyro5.api  # type: ignore[import-untyped, import-not-found, unused-ignore]  # no type hints; optional
    except ImportError:
        raise NotAvailable("Pyro5 is not installed")
    if spec["family"] == "tcp":
        daemon = Pyro5.api.Daemon(host="127.0.0.1", port=0)
    else:
        daemon = Pyro5.api.Daemon(unixsocket=spec["path"])

    @Pyro5.api.expose
    class Calc:
        def add(self, x: Any, y: Any) -> Any:
            return x + y

        def stop(self) -> None:
            threading.Thread(target=daemon.shutdown, daemon=True).start()

    uri = daemon.register(Calc(), "calc")
    ready(str(uri))
    daemon.requestLoop()
    daemon.close()


def _rpc_pyro5_client(spec: dict[str, Any], address: Any) -> Any:
    import Pyro5.api  # type: ignore[import-untyped, import-not-found, unused-ignore]  # no type hints; optional
    proxy = Pyro5.api.Proxy(address)
    out = rpc_sequential(proxy.add, spec)
    out["info"]["serializer"] = Pyro5.config.SERIALIZER
    proxy.stop()
    proxy._pyroRelease()
    return out


def _rpc_rpyc_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> Any:
    try:
        import rpyc  # type: ignore[import-untyped, import-not-found, unused-ignore]  # no type hints; optional
        from rpyc.utils.server import OneShotServer  # type: ignore[import-untyped, import-not-found, unused-ignore]  # no type hints; optional
    except ImportError:
        raise NotAvailable("rpyc is not installed")

    class CalcService(rpyc.Service):  # type: ignore[misc]  # rpyc has no type hints
        def exposed_add(self, x: Any, y: Any) -> Any:
            return x + y

    if spec["family"] == "tcp":
        srv = OneShotServer(CalcService, hostname="127.0.0.1", port=0)
        ready(["127.0.0.1", srv.port])
    else:
        srv = OneShotServer(CalcService, socket_path=spec["path"])
        ready(spec["path"])
    srv.start()     # serves the one client until it disconnects


def _rpc_rpyc_client(spec: dict[str, Any], address: Any) -> Any:
    import rpyc  # type: ignore[import-untyped, import-not-found, unused-ignore]  # no type hints; optional
    if spec["family"] == "tcp":
        conn = rpyc.connect(*_addr(address))
    else:
        conn = rpyc.utils.factory.unix_connect(address)
    # conn.root.add would cost a remote getattr on every call; a cached
    # method is one round trip per call, as every other row does
    out = rpc_sequential(conn.root.add, spec)
    conn.close()
    return out


# (case, impl) -> (server, client) for the Python children.
ROLES: dict[tuple[str, str], Any] = {
    ("rpc-seq", "mp-rpc"): (_rpc_mp_server, _rpc_mp_client),
    ("rpc-seq", "xmlrpc"): (_rpc_xmlrpc_server, _rpc_xmlrpc_client),
    ("rpc-seq", "zmq-rpc"): (_rpc_zmq_server, _rpc_zmq_client),
    ("rpc-seq", "pyro5"): (_rpc_pyro5_server, _rpc_pyro5_client),
    ("rpc-seq", "rpyc"): (_rpc_rpyc_server, _rpc_rpyc_client),
    ("rpc-seq", "pingpong"): (_pingpong_conn_server, _rpc_pingpong_client),
    ("rpc-seq", "fastnet"): (rpc_server, _rpc_fastnet_client),
    ("rpc-seq", "fastnet-json"): (rpc_server, _rpc_fastnet_client),
    ("rpc-seq", "fastnet-pickle"): (rpc_server, _rpc_fastnet_client),
    ("rpc-seq", "fastnet-spin"): (_rpc_spin_server, _rpc_spin_client),
    ("rpc-pipe", "mp-rpc"): (_rpc_mp_server, _rpc_mp_client),
    ("rpc-pipe", "zmq-rpc"): (_rpc_zmq_server, _rpc_zmq_client),
    ("rpc-pipe", "fastnet"): (rpc_server, _rpc_fastnet_pipelined_client),
    ("rpc-pipe", "fastnet-batch"): (rpc_server, _rpc_fastnet_pipelined_client),
    ("rpc-pipe", "fastnet-pbatch"): (rpc_server, _rpc_fastnet_pipelined_client),
    ("rpc-pipe", "fastnet-coalesce"): (rpc_server, _rpc_fastnet_pipelined_client),
    ("rpc-pipe", "fastnet-batch-coalesce"): (rpc_server, _rpc_fastnet_pipelined_client),
}

CASES: dict[str, dict[str, Any]] = {
    "rpc-seq": {
        "title": "rpc-seq: sequential add(2, 3) calls from one client",
        "unit": "calls/s", "json_unit": "calls/s", "better": "higher",
        "columns": ["mp-rpc", "zmq-rpc", "pingpong"],
        # --quick: TCP only, to keep the whole quick run near a minute on 2 cores
        "quick": {"families": ("tcp",)},
        "impls": [
            Impl("mp-rpc", "pickle RPC, multiprocessing", anchor=True),
            Impl("xmlrpc", "xmlrpc (stdlib)", anchor=True),
            Impl("zmq-rpc", "pyzmq REQ/REP + msgpack", anchor=True),
            Impl("pyro5", "Pyro5", anchor=True),
            Impl("rpyc", "rpyc", anchor=True),
            Impl("pingpong", "fastnet bare pingpong 64 B", pure=False),
            Impl("fastnet", "fastnet RPC msgpack", pure=False),
            Impl("fastnet-spin", "fastnet msgpack, spin 50 µs (proxy and server)", pure=False),
        ],
    },
    "rpc-pipe": {
        "title": "rpc-pipe: add(2, 3) with {window} calls in flight on one connection",
        "unit": "calls/s", "json_unit": "calls/s", "better": "higher",
        # --quick: TCP only, without the multiprocessing row (Nagle stalls make
        # it slow to measure over TCP) and the plain call_async batches
        "quick": {"families": ("tcp",), "skip": ("mp-rpc", "fastnet-batch")},
        "impls": [
            Impl("mp-rpc", "pickle RPC, mp: 64 sent, 64 read", anchor=True),
            Impl("zmq-rpc", "pyzmq DEALER/ROUTER + msgpack", anchor=True),
            Impl("fastnet", "fastnet call_async, window", pure=False),
            Impl("fastnet-batch", "fastnet call_async, batches", pure=False),
            Impl("fastnet-pbatch", "fastnet proxy.batch(), batches", pure=False),
            Impl("fastnet-coalesce", "fastnet call_async, coalescing", pure=False),
            Impl("fastnet-batch-coalesce", "fastnet coalescing, batches", pure=False),
        ],
    },
}

TARGETS: list[tuple[Any, ...]] = [
    ("rpc-seq", None, "msgpack RPC >= 2.5x mp pickle RPC", ("ratio", "fastnet", "mp-rpc", ">=", 2.5)),
    ("rpc-seq", None, "msgpack RPC >= 35k calls/s", ("value", "fastnet", ">=", 35e3)),
    ("rpc-seq", None, "RPC within 1.3x bare pingpong (time ratio)", ("ratio", "pingpong", "fastnet", "<=", 1.3)),
    ("rpc-seq", None, "msgpack RPC, spin 50 µs >= 2.5x mp pickle RPC", ("ratio", "fastnet-spin", "mp-rpc", ">=", 2.5)),
    ("rpc-seq", None, "msgpack RPC, spin 50 µs >= 3x pyzmq+msgpack", ("ratio", "fastnet-spin", "zmq-rpc", ">=", 3.0)),
    ("rpc-pipe", None, "window of 64 >= 150k calls/s", ("value", "fastnet", ">=", 150e3)),
    ("rpc-pipe", None, "batches of 64 >= 150k calls/s", ("value", "fastnet-batch", ">=", 150e3)),
    ("rpc-pipe", None, "proxy.batch() of 64 >= 150k calls/s", ("value", "fastnet-pbatch", ">=", 150e3)),
    ("rpc-pipe", None, "call_async with coalescing, window of 64 >= 150k calls/s",
     ("value", "fastnet-coalesce", ">=", 150e3)),
]
