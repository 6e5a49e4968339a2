"""The fdpass case: descriptors passed one per message over AF_UNIX."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from .common import Impl, NotAvailable, _fastnet, _need, _per_second, _recv_exact, _samples


# The receiver listens on AF_UNIX; per burst the sender announces n
# (b"N" + 8 bytes; n = 0 ends) and waits for b"G", then sends n descriptors of
# /dev/null, one per message, and waits for b"A".  The receiver checks every
# descriptor it gets with fstat, closes it, and acknowledges the burst.

def _fdpass_api(spec: dict[str, Any]) -> tuple[Callable[[Any, int], object], Callable[[Any], int]]:
    """(send(sock, fd), recv(sock) -> fd) of an fdpass row."""
    impl = spec["impl"]
    if impl == "mp-reduction":
        from multiprocessing import reduction
        pid = os.getppid()  # send_handle uses the peer's pid on Windows only

        def send(sock: Any, fd: int) -> None:
            reduction.send_handle(sock, fd, pid)
        return send, reduction.recv_handle
    if impl == "send_fds":
        import socket
        if not hasattr(socket, "send_fds"):
            raise NotAvailable("socket.send_fds needs Python 3.9 or later")
        send_fds, recv_fds, one = socket.send_fds, socket.recv_fds, [b"\x01"]

        def send_one(sock: Any, fd: int) -> object:
            return send_fds(sock, one, [fd])

        def recv(sock: Any) -> int:
            return recv_fds(sock, 1, 1)[1][0]
        return send_one, recv
    fastnet = _fastnet(spec)
    _need(fastnet, "send_fd", "recv_fd")
    return fastnet.send_fd, fastnet.recv_fd


def _fdpass_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    import socket
    if spec["family"] != "unix":
        raise NotAvailable("descriptors pass over AF_UNIX only")
    _, recv = _fdpass_api(spec)
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(spec["path"])
    ls.listen(1)
    ready(spec["path"])
    sock, _ = ls.accept()
    ls.close()
    want = os.stat(os.devnull).st_rdev
    fstat, close = os.fstat, os.close
    while True:
        ctrl = _recv_exact(sock, 9)
        if len(ctrl) < 9 or ctrl[:1] != b"N":
            break
        n = int.from_bytes(ctrl[1:], "big")
        if n == 0:
            break
        sock.sendall(b"G")
        for _ in range(n):
            fd = recv(sock)
            try:
                if fstat(fd).st_rdev != want:
                    raise ValueError(f"fdpass: descriptor {fd} is not {os.devnull}")
            finally:
                close(fd)
        sock.sendall(b"A")
    sock.close()


def _fdpass_client(spec: dict[str, Any], address: Any) -> Any:
    import socket
    send, _ = _fdpass_api(spec)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(address)
    fd = os.open(os.devnull, os.O_RDONLY)

    def burst(k: int) -> float:
        sock.sendall(b"N" + k.to_bytes(8, "big"))
        if _recv_exact(sock, 1) != b"G":
            raise ValueError("fdpass: bad go")
        t0 = time.perf_counter()
        for _ in range(k):
            send(sock, fd)
        if _recv_exact(sock, 1) != b"A":
            raise ValueError("fdpass: bad ack")
        return time.perf_counter() - t0

    try:
        out = _samples(burst, spec, 64, 256, _per_second)
        sock.sendall(b"N" + bytes(8))
    finally:
        os.close(fd)
        sock.close()
    return out


# (case, impl) -> (server, client) for the Python children.
ROLES: dict[tuple[str, str], Any] = {
    ("fdpass", "mp-reduction"): (_fdpass_server, _fdpass_client),
    ("fdpass", "send_fds"): (_fdpass_server, _fdpass_client),
    ("fdpass", "fastnet"): (_fdpass_server, _fdpass_client),
}

CASES: dict[str, dict[str, Any]] = {
    "fdpass": {
        "title": "fdpass: one descriptor per message, received, checked with fstat and closed",
        "unit": "fd/s", "json_unit": "fd/s", "better": "higher",
        "families": ("unix",),
        "impls": [
            Impl("mp-reduction", "multiprocessing.reduction", anchor=True),
            Impl("send_fds", "socket.send_fds/recv_fds", anchor=True),
            Impl("fastnet", "fastnet send_fd/recv_fd", pure=False),
            Impl("fastnet-pure", "fastnet send_fd/recv_fd (pure)", role="fastnet", pure=True),
        ],
    },
}

TARGETS: list[tuple[Any, ...]] = [
    ("fdpass", None, "fastnet vs multiprocessing.reduction", ("report", "fastnet", "mp-reduction")),
    ("fdpass", None, "fastnet vs socket.send_fds", ("report", "fastnet", "send_fds")),
]
