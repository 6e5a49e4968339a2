"""The handshake case: connect, authenticate both ways, echo one message, close.

Every pair is measured: fastnet or the stdlib's multiprocessing.connection
as the client, either one as the listener.  A drop-in meets the other side's
implementation, and a pair can stall where neither side alone does (small
handshake writes held back by Nagle's algorithm while the peer delays its ACK).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .common import Impl, _addr, _conn_module, _conn_options, _listen_address, _per_second, _samples


# The rows where only one side is fastnet; the other is multiprocessing.connection.
_STDLIB_SIDE = {"fastnet-client": "server", "fastnet-listener": "client"}


def _side(spec: dict[str, Any], role: str) -> tuple[Any, dict[str, Any]]:
    """The module on ``role``'s side of the row's pair, and its Listener's or Client's options."""
    if _STDLIB_SIDE.get(spec["impl"]) == role:
        import multiprocessing.connection as mpc
        return mpc, {}
    mod = _conn_module(spec)
    return mod, _conn_options(spec, mod)


def _handshake_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    mod, opts = _side(spec, "server")
    key = bytes.fromhex(spec["authkey"])
    listener = mod.Listener(_listen_address(spec), authkey=key, **opts)
    ready(listener.address)
    while True:
        conn = listener.accept()
        msg = conn.recv_bytes()
        if msg == b"STOP":
            conn.close()
            break
        conn.send_bytes(msg)
        conn.close()
    listener.close()


def handshake_once(mod: Any, address: Any, key: Any, payload: Any, **opts: Any) -> Any:
    """Connect, authenticate both ways, echo one message, close."""
    conn = mod.Client(address, authkey=key, **opts)
    conn.send_bytes(payload)
    if conn.recv_bytes() != payload:
        raise ValueError("handshake: echo mismatch")
    conn.close()


def _handshake_client(spec: dict[str, Any], address: Any) -> Any:
    mod, opts = _side(spec, "client")
    key = bytes.fromhex(spec["authkey"])
    address = _addr(address)
    payload = b"h" * spec["size"]

    def step(k: Any) -> Any:
        t0 = time.perf_counter()
        for _ in range(k):
            handshake_once(mod, address, key, payload, **opts)
        return time.perf_counter() - t0

    out = _samples(step, spec, 1, 3, _per_second)
    out["info"]["backend"] = getattr(mod, "backend", None)
    conn = mod.Client(address, authkey=key)
    conn.send_bytes(b"STOP")
    conn.close()
    return out


# (case, impl) -> (server, client) for the Python children.
ROLES: dict[tuple[str, str], Any] = {
    ("handshake", "mp"): (_handshake_server, _handshake_client),
    ("handshake", "fastnet"): (_handshake_server, _handshake_client),
    ("handshake", "fastnet-readahead"): (_handshake_server, _handshake_client),
    ("handshake", "fastnet-client"): (_handshake_server, _handshake_client),
    ("handshake", "fastnet-listener"): (_handshake_server, _handshake_client),
}

CASES: dict[str, dict[str, Any]] = {
    "handshake": {
        "title": "handshake: connect + authkey both ways + echo + close",
        "unit": "conn/s", "json_unit": "conn/s", "better": "higher",
        "impls": [
            Impl("mp", "multiprocessing.connection", anchor=True),
            Impl("fastnet", "fastnet", pure=False),
            Impl("fastnet-readahead", "fastnet, read-ahead", pure=False),
            Impl("fastnet-client", "fastnet Client, stdlib Listener", pure=False),
            Impl("fastnet-listener", "stdlib Client, fastnet Listener", pure=False),
        ],
    },
}

TARGETS: list[tuple[Any, ...]] = [
    ("handshake", "tcp", "fastnet >= 4000 conn/s", ("value", "fastnet", ">=", 4000.0)),
    ("handshake", None, "fastnet vs multiprocessing", ("report", "fastnet", "mp")),
    ("handshake", None, "read-ahead speed-up over the default", ("report", "fastnet-readahead", "fastnet")),
    ("handshake", None, "stdlib Listener: fastnet vs stdlib Client", ("report", "fastnet-client", "mp")),
    ("handshake", None, "stdlib Client: fastnet vs stdlib Listener", ("report", "fastnet-listener", "mp")),
]
