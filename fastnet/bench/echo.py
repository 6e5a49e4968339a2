"""The echo case: an event-loop echo server with many connections."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .common import Impl, NotAvailable, _addr, _fastnet, _listen_address, _need, _socket_family


# An event-loop echo server with many connections.  Every server cuts
# 4-byte big-endian length-prefixed frames (multiprocessing.connection's
# framing), hands each whole message to Python code and sends a framed reply,
# so all rows do the same work.  The client is the same for every row: one
# process keeping ``conns`` connections in ping-pong (one message in flight
# per connection).  A server exits once its last connection has closed, or,
# with ``spec["persist"]``, serves one load after another until SIGTERM
# (bench/bench_echo.py runs its rounds against one long-lived server).

ECHO_BACKLOG = 4096


def _raise_nofile(n: int) -> None:
    # many connections need more descriptors than a default soft limit of 1024
    with contextlib.suppress(ImportError, ValueError, OSError):
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = max(soft, n) if hard == resource.RLIM_INFINITY else min(hard, max(soft, n))
        if want > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


class _Live:
    """Counts a server's open connections; ``on_idle()`` runs when the last one closes."""

    def __init__(self, on_idle: Callable[[], object]) -> None:
        self.open = 0
        self.on_idle = on_idle
        self.lock = threading.Lock()    # socketserver counts from its handler threads

    def opened(self) -> None:
        with self.lock:
            self.open += 1

    def closed(self) -> None:
        with self.lock:
            self.open -= 1
            idle = self.open == 0
        if idle:
            self.on_idle()


def _echo_live(spec: dict[str, Any], stop: Callable[[], object],
               on_sigterm: Callable[[Callable[[], object]], object] | None = None) -> _Live:
    """The connection counter of an echo server, and when the server stops.

    By default ``stop()`` runs when the last connection closes; with
    ``spec["persist"]`` it runs on SIGTERM instead, installed by
    ``on_sigterm(stop)`` (an event loop's own signal handling) or else by
    ``signal.signal``.
    """
    if not spec.get("persist"):
        return _Live(stop)
    if on_sigterm is not None:
        on_sigterm(stop)
    else:
        import signal
        signal.signal(signal.SIGTERM, lambda *_: stop())
    return _Live(lambda: None)


def _echo_listen(spec: dict[str, Any]) -> Any:
    import socket
    _raise_nofile(spec.get("conns", 100) + 64)
    sock = socket.socket(_socket_family(spec), socket.SOCK_STREAM)
    if spec["family"] == "tcp":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(_listen_address(spec))
    # a backlog above the connection count: a client connecting faster than
    # the loop accepts must not wait for SYN retransmits
    sock.listen(ECHO_BACKLOG)
    return sock


def _echo_ready(ready: Callable[[Any], None], address: Any) -> None:
    # the pid lets the client read the server's CPU time from /proc
    ready({"address": address, "pid": os.getpid()})


def _echo_selectors_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    import selectors
    import socket
    sel = selectors.DefaultSelector()
    lsock = _echo_listen(spec)
    lsock.setblocking(False)
    tcp = spec["family"] == "tcp"
    bufs: dict[Any, bytearray] = {}
    out: dict[Any, bytearray] = {}
    accepted = [0]
    stopped = [False]
    persist = bool(spec.get("persist"))
    _echo_live(spec, lambda: stopped.__setitem__(0, True))
    # a persistent server wakes once a second to see a SIGTERM's flag
    timeout = 1.0 if persist else None

    def accept(mask: int) -> None:
        while True:
            try:
                c, _a = lsock.accept()
            except BlockingIOError:
                return
            c.setblocking(False)
            if tcp:
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            bufs[c] = bytearray()
            accepted[0] += 1
            sel.register(c, selectors.EVENT_READ, read)

    def close(c: Any) -> None:
        sel.unregister(c)
        bufs.pop(c, None)
        out.pop(c, None)
        c.close()

    def send(c: Any, data: bytes) -> None:
        if c in out:
            out[c] += data
            return
        try:
            k = c.send(data)
        except BlockingIOError:
            k = 0
        except OSError:
            close(c)
            return
        if k < len(data):
            out[c] = bytearray(data[k:])
            sel.modify(c, selectors.EVENT_READ | selectors.EVENT_WRITE, read)

    def message_received(c: Any, msg: bytes) -> None:
        send(c, len(msg).to_bytes(4, "big") + msg)

    def flush(c: Any) -> None:
        data = out[c]
        try:
            k = c.send(data)
        except BlockingIOError:
            return
        except OSError:
            close(c)
            return
        del data[:k]
        if not data:
            del out[c]
            sel.modify(c, selectors.EVENT_READ, read)

    def read(c: Any, mask: int = selectors.EVENT_READ) -> None:
        if mask & selectors.EVENT_WRITE and c in out:
            flush(c)
        if not mask & selectors.EVENT_READ or c not in bufs:
            return
        try:
            data = c.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            close(c)
            return
        if not data:
            close(c)
            return
        buf = bufs[c]
        buf += data
        pos, end = 0, len(buf)
        while end - pos >= 4:
            n = int.from_bytes(buf[pos:pos + 4], "big", signed=True)
            if n < 0:
                close(c)
                return
            if end - pos - 4 < n:
                break
            msg = bytes(buf[pos + 4:pos + 4 + n])
            pos += 4 + n
            message_received(c, msg)
        del buf[:pos]

    sel.register(lsock, selectors.EVENT_READ, accept)
    _echo_ready(ready, lsock.getsockname())
    while not stopped[0] and (persist or not accepted[0] or bufs):
        for key, mask in sel.select(timeout):
            if key.data is accept:
                accept(mask)
            else:
                read(key.fileobj, mask)
    sel.close()
    lsock.close()


def _echo_socketserver_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    import socketserver
    tcp = spec["family"] == "tcp"
    _raise_nofile(spec.get("conns", 100) + 64)
    base: Any = socketserver.ThreadingTCPServer if tcp else socketserver.ThreadingUnixStreamServer

    class Server(base):  # type: ignore[misc]  # the base depends on the family
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = ECHO_BACKLOG

    # shutdown() waits for serve_forever to return: it must not block the handler thread
    live = _echo_live(spec, lambda: threading.Thread(target=srv.shutdown, daemon=True).start())

    class Handler(socketserver.StreamRequestHandler):
        disable_nagle_algorithm = tcp   # TCP_NODELAY is a TCP option only

        def setup(self) -> None:
            super().setup()
            live.opened()

        def handle(self) -> None:
            read, write = self.rfile.read, self.wfile.write
            while True:
                head = read(4)
                if len(head) < 4:
                    return
                n = int.from_bytes(head, "big", signed=True)
                if n < 0:
                    return
                msg = read(n)
                if len(msg) < n:
                    return
                self.message_received(msg, write)

        def message_received(self, msg: bytes, write: Callable[[bytes], object]) -> None:
            write(len(msg).to_bytes(4, "big") + msg)

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                live.closed()

    srv = Server(_listen_address(spec), Handler)
    _echo_ready(ready, srv.server_address)
    srv.serve_forever(poll_interval=0.05)
    srv.server_close()


def _asyncio_echo_protocol(asyncio: Any, live: _Live) -> Any:
    import struct
    unpack_from = struct.Struct("!i").unpack_from
    pack = struct.Struct("!i").pack

    class Echo(asyncio.Protocol):  # type: ignore[misc]  # asyncio comes in as a parameter
        """Frames cut in Python: what an asyncio message server does."""

        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.buf = b""
            live.opened()

        def data_received(self, data: bytes) -> None:
            if self.buf:
                data = self.buf + data
            pos, end = 0, len(data)
            while end - pos >= 4:
                n = unpack_from(data, pos)[0]
                if n < 0:
                    self.transport.abort()
                    return
                if end - pos - 4 < n:
                    break
                self.message_received(data[pos + 4:pos + 4 + n])
                pos += 4 + n
            self.buf = data[pos:] if pos < end else b""

        def message_received(self, msg: bytes) -> None:
            self.transport.write(pack(len(msg)) + msg)

        def connection_lost(self, exc: BaseException | None) -> None:
            live.closed()

    return Echo


def _echo_asyncio_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    import asyncio
    import signal
    loop: Any
    if spec["impl"] == "uvloop":
        try:
            import uvloop  # type: ignore[import-not-found, unused-ignore]  # optional (bench extra)
        except ImportError:
            raise NotAvailable("uvloop is not installed")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    live = _echo_live(spec, loop.stop, lambda stop: loop.add_signal_handler(signal.SIGTERM, stop))
    echo = _asyncio_echo_protocol(asyncio, live)
    sock = _echo_listen(spec)
    if spec["family"] == "tcp":
        start = loop.create_server(echo, sock=sock, backlog=ECHO_BACKLOG)
    else:
        start = loop.create_unix_server(echo, sock=sock, backlog=ECHO_BACKLOG)
    server = loop.run_until_complete(start)
    _echo_ready(ready, sock.getsockname())
    loop.run_forever()
    server.close()
    if not spec.get("persist"):
        # since 3.12 wait_closed() also waits for open connections, which a
        # SIGTERM to a persistent server may leave behind
        loop.run_until_complete(server.wait_closed())
    loop.close()


def _echo_fastnet_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    fastnet = _fastnet(spec)
    _need(fastnet, "EventLoop")
    import signal

    from fastnet.loop import Protocol

    loop = fastnet.EventLoop()
    live = _echo_live(spec, loop.stop, lambda stop: loop.add_signal_handler(signal.SIGTERM, stop))

    class Echo(Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            live.opened()

        def message_received(self, data: bytes) -> None:
            self.transport.send_bytes(data)

        def connection_lost(self, exc: BaseException | None) -> None:
            live.closed()

    sock = _echo_listen(spec)
    loop.create_server(sock, Echo)
    _echo_ready(ready, sock.getsockname())
    loop.run_forever()
    loop.close()


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far, or None without /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _echo_client(spec: dict[str, Any], address: Any) -> Any:
    """The load of every echo row: ``conns`` connections in ping-pong, one process.

    epoll (poll elsewhere) and os.read/os.write on the raw descriptors: the
    cheapest loop Python has, so that the server rather than the client is
    what the rows compare."""
    import select
    import socket
    conns = spec["conns"]
    _raise_nofile(conns + 64)
    where, pid = _addr(address["address"]), address["pid"]
    msg = (bytes(range(256)) * (spec["size"] // 256 + 1))[:spec["size"]]
    frame = len(msg).to_bytes(4, "big") + msg
    flen = len(frame)
    tcp = spec["family"] == "tcp"
    socks = []
    try:
        for _ in range(conns):
            s = socket.socket(_socket_family(spec), socket.SOCK_STREAM)
            socks.append(s)
            s.connect(where)
            if tcp:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(select, "epoll"):
            ep = select.epoll()
            for s in socks:
                ep.register(s.fileno(), select.EPOLLIN)

            def poll() -> list[tuple[int, int]]:
                return ep.poll(10.0)
        else:
            pl = select.poll()
            for s in socks:
                pl.register(s.fileno(), select.POLLIN)

            def poll() -> list[tuple[int, int]]:
                return pl.poll(10000)
        read, write, clock = os.read, os.write, time.perf_counter
        partial: dict[int, bytes] = {}

        def pump(seconds: float) -> tuple[int, float]:
            """Keep every connection busy for ``seconds``; (round trips, seconds taken)."""
            done = 0
            t0 = clock()
            end = t0 + seconds
            while True:
                events = poll()
                if not events:
                    raise TimeoutError("echo: no reply for 10 s")
                for fd, _ev in events:
                    data = read(fd, 65536)
                    if data == frame:   # the usual case: one whole reply
                        write(fd, frame)
                        done += 1
                        continue
                    if not data:
                        raise EOFError("echo: the server closed a connection")
                    data = partial.pop(fd, b"") + data
                    while len(data) >= flen:
                        if data[:flen] != frame:
                            raise ValueError("echo: the reply differs from the message")
                        data = data[flen:]
                        write(fd, frame)
                        done += 1
                    if data:
                        partial[fd] = data
                now = clock()
                if now >= end:
                    return done, now - t0

        for s in socks:
            write(s.fileno(), frame)
        pump(spec["warmup"])
        samples, total, cpu = [], 0, 0.0
        for _ in range(spec["repeat"]):
            c0 = _cpu_seconds(pid)
            n, t = pump(spec["sample"])
            c1 = _cpu_seconds(pid)
            samples.append(n / t)
            total += n
            cpu += (c1 - c0) if c0 is not None and c1 is not None else float("nan")
    finally:
        for s in socks:
            s.close()
    info: dict[str, Any] = {"conns": conns, "round_trips": total}
    if cpu == cpu and total:     # not NaN: /proc was there
        info["server_cpu_us_per_rt"] = round(cpu / total * 1e6, 3)
    return {"samples": samples, "info": info}


# (case, impl) -> (server, client) for the Python children.
ROLES: dict[tuple[str, str], Any] = {
    ("echo", "selectors"): (_echo_selectors_server, _echo_client),
    ("echo", "socketserver"): (_echo_socketserver_server, _echo_client),
    ("echo", "asyncio"): (_echo_asyncio_server, _echo_client),
    ("echo", "uvloop"): (_echo_asyncio_server, _echo_client),
    ("echo", "fastnet"): (_echo_fastnet_server, _echo_client),
}

CASES: dict[str, dict[str, Any]] = {
    "echo": {
        "title": "echo: {conns} connections in ping-pong, {size}-byte framed messages, one epoll client",
        "unit": "rt/s", "json_unit": "roundtrips/s", "better": "higher",
        # --quick: TCP only, to keep the whole quick run under a minute on 2 cores
        "quick": {"families": ("tcp",)},
        "impls": [
            Impl("selectors", "selectors loop (stdlib)", anchor=True),
            Impl("socketserver", "socketserver, a thread per conn", anchor=True),
            Impl("asyncio", "asyncio Protocol", anchor=True),
            Impl("uvloop", "uvloop Protocol", anchor=True),
            Impl("fastnet", "fastnet EventLoop", pure=False),
            Impl("fastnet-pure", "fastnet EventLoop (pure)", role="fastnet", pure=True),
        ],
    },
}

TARGETS: list[tuple[Any, ...]] = [
    ("echo", None, "fastnet vs uvloop", ("report", "fastnet", "uvloop")),
    ("echo", None, "fastnet vs selectors", ("report", "fastnet", "selectors")),
    ("echo", None, "compiled vs pure speed-up", ("report", "fastnet", "fastnet-pure")),
]
