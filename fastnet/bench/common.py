"""What every benchmark child shares: the spec helpers, the packages a row
needs, warm-up and sampling.  Loaded by file path in the children, so it
imports nothing of fastnet's at module level."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PAYLOAD_SIZE = 64
CTRL_STOP = b"N0"


class NotAvailable(Exception):
    """A case cannot run here (missing package or fastnet feature)."""


def _addr(address: Any) -> Any:
    # JSON turns the (host, port) tuple into a list; Listener/Client want a tuple.
    return tuple(address) if isinstance(address, list) else address


def _listen_address(spec: dict[str, Any]) -> Any:
    return ("127.0.0.1", 0) if spec["family"] == "tcp" else spec["path"]


def _fastnet(spec: dict[str, Any]) -> Any:
    try:
        import fastnet
    except Exception as exc:  # a half-built package must not crash the runner
        raise NotAvailable(f"import fastnet failed: {type(exc).__name__}: {exc}")
    want = spec.get("backend")
    got = getattr(fastnet, "backend", None)
    if want and got != want:
        raise NotAvailable(f"fastnet.backend is {got!r}, this case needs {want!r}")
    _need(fastnet, "Listener", "Client")
    return fastnet


def _need(obj: Any, *names: Any) -> Any:
    for name in names:
        if not hasattr(obj, name):
            owner = getattr(obj, "__name__", type(obj).__name__)
            raise NotAvailable(f"{owner}.{name} is missing")


def _conn_module(spec: dict[str, Any]) -> Any:
    if spec["impl"].startswith("mp"):
        import multiprocessing.connection as mpc
        return mpc
    return _fastnet(spec)


# Row-key words that turn on a fastnet option of the row's Listener and Client.
_OPTIONS = {"readahead": ("readahead", True), "coalesce": ("coalesce", True), "spin": ("spin", 50.0)}


def _conn_options(spec: dict[str, Any], mod: Any) -> dict[str, Any]:
    """Keyword options of a row's Listener and Client: ``readahead=True`` on a
    read-ahead row, ``coalesce=True`` on a coalescing row, ``spin=50`` on a
    spinning row (NotAvailable where fastnet's Listener or Client lacks it)."""
    words = spec["impl"].split("-")
    opts = dict(v for k, v in _OPTIONS.items() if k in words)
    if not opts:
        return {}
    import inspect
    for api in (mod.Client, mod.Listener):
        try:
            params: Any = inspect.signature(api).parameters
        except (TypeError, ValueError):  # no signature to read: take it as absent
            params = ()
        for name in opts:
            if name not in params:
                raise NotAvailable(f"fastnet.{api.__name__} has no {name} option")
    return opts


def _zmq() -> Any:
    try:
        import zmq
    except ImportError:
        raise NotAvailable("pyzmq is not installed")
    return zmq


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        raise NotAvailable("numpy is not installed")
    return numpy


def _zmq_bind(sock: Any, spec: dict[str, Any], suffix: str = "") -> Any:
    if spec["family"] == "tcp":
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        return f"tcp://127.0.0.1:{port}"
    url = f"ipc://{spec['path']}{suffix}"
    sock.bind(url)
    return url


def _zmq_close(ctx: Any, *socks: Any) -> None:
    for s in socks:
        s.close(linger=0)
    ctx.term()


def _accept_one(spec: dict[str, Any], mod: Any, ready: Callable[[Any], None], **kw: Any) -> Any:
    listener = mod.Listener(_listen_address(spec), **kw)
    ready(listener.address)
    conn = listener.accept()
    listener.close()
    return conn


def _calibrate(step: Any, spec: dict[str, Any], start: Any, minimum: Any) -> Any:
    """Warm up with step(k) in growing chunks for ``warmup`` seconds; return
    the count that lasts about ``sample`` seconds."""
    done, spent, k = 0, 0.0, start
    while spent < spec["warmup"] or done == 0:
        spent += step(k)
        done += k
        k = min(k * 2, start * 1024)
    return max(minimum, int(spec["sample"] * done / max(spent, 1e-9)))


def _samples(step: Any, spec: dict[str, Any], start: Any, minimum: Any, per: Any) -> Any:
    n = _calibrate(step, spec, start, minimum)
    return {"samples": [per(step(n), n) for _ in range(spec["repeat"])],
            "info": {"iterations": n}}


def _with_cpu_share(run: Callable[[], Any]) -> Any:
    """``run()``'s samples, with ``info["client_cpu_share"]``: this process's
    CPU for each second of the run (1.0 is a busy CPU)."""
    import time
    cpu0, t0 = time.process_time(), time.perf_counter()
    out = run()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    out["info"]["client_cpu_share"] = round(cpu / wall, 3)
    return out


def _us_per_op(t: Any, n: Any) -> Any:
    return t / n * 1e6


def _per_second(t: Any, n: Any) -> Any:
    return n / t


def _socket_family(spec: dict[str, Any]) -> Any:
    import socket
    return socket.AF_INET if spec["family"] == "tcp" else socket.AF_UNIX


def _recv_exact(sock: Any, n: Any) -> Any:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return b""
        buf += chunk
    return buf


def _msgpack() -> Any:
    try:
        import msgpack
    except ImportError:
        raise NotAvailable("msgpack is not installed")
    return msgpack


class Impl:
    """One row of a case: which child code runs it and how it is labelled."""

    def __init__(self, key: Any, label: Any, role: Any = None, anchor: bool = False, pure: Any = None, kind: str = "py") -> None:
        self.key = key              # row key in the report
        self.label = label
        self.role = role or key     # key into ROLES
        self.anchor = anchor
        self.pure = pure            # None: not fastnet; True/False: FASTNET_PURE
        self.kind = kind            # "py" or "c"

    @property
    def backend(self) -> Any:
        if self.pure is None:
            return None
        return "python" if self.pure else "cython"
