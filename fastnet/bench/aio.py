"""The asyncio cases: fastnet.aio against blocking fastnet, asyncio streams and zmq.asyncio.

aio-pingpong: one message, one reply, one at a time (time per round trip).
aio-stream: one-way messages, each checked by the receiver (the stream
case's protocol: b"N<n>", b"G", n messages, b"D").
aio-bulk: one large float64 array per transfer (the bulk case's protocol).
The asyncio rows run both ends on uvloop when it is installed ("-uvloop"
rows) or on the default loop ("-asyncio" rows).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Any

from .bulk import _bulk_conn_client, _bulk_conn_server, _check_array, _poison
from .common import Impl, NotAvailable, _addr, _listen_address, _numpy, _per_second, _us_per_op, _zmq
from .pingpong import _pingpong_conn_client, _pingpong_conn_server
from .stream import _stream_conn_client, _stream_conn_server, stream_payload

_HDR = struct.Struct("!i")


def _run(spec: dict[str, Any], main: Any) -> Any:
    """Run ``main()`` on the row's loop: uvloop for the "-uvloop" rows, else asyncio's default."""
    import asyncio
    if spec["impl"].endswith("uvloop"):
        try:
            import uvloop
        except ImportError:
            raise NotAvailable("uvloop is not installed")
        factory: Any = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    loop = factory()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def _aio(spec: dict[str, Any]) -> Any:
    from .common import _fastnet
    _fastnet(spec)
    import fastnet.aio
    return fastnet.aio


def _aio_server(spec: dict[str, Any], ready: Callable[[Any], None], body: Any) -> None:
    """Serve one fastnet.aio connection on the row's loop: ``await body(conn)``, then close."""
    async def main() -> None:
        import asyncio
        aio = _aio(spec)
        got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done = asyncio.Event()

        async def handler(conn: Any) -> None:
            got.set_result(conn)
            await done.wait()

        server = await aio.serve(_listen_address(spec), handler)
        ready(server.address)
        await body(await got)
        done.set()
        server.close()
        await server.wait_closed()
    _run(spec, main)


def _aio_client(spec: dict[str, Any], address: Any, body: Any) -> Any:
    """Connect with fastnet.aio on the row's loop; return ``await body(conn)``, closing after."""
    aio = _aio(spec)

    async def main() -> Any:
        conn = await aio.connect(_addr(address))
        out = await body(conn)
        conn.close()
        await conn.wait_closed()
        return out
    return _run(spec, main)


async def _async_samples(step: Any, spec: dict[str, Any], start: int, minimum: int, per: Any) -> Any:
    """common._samples for a coroutine step: warm up, calibrate, then ``repeat`` samples."""
    done, spent, k = 0, 0.0, start
    while spent < spec["warmup"] or done == 0:
        spent += await step(k)
        done += k
        k = min(k * 2, start * 1024)
    n = max(minimum, int(spec["sample"] * done / max(spent, 1e-9)))
    return {"samples": [per(await step(n), n) for _ in range(spec["repeat"])], "info": {"iterations": n}}


# -- pingpong ------------------------------------------------------------------

def _pingpong_aio_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    async def echo(conn: Any) -> None:
        send, recv = conn.send_bytes, conn.recv_bytes
        try:
            while True:
                await send(await recv())
        except EOFError:
            pass
    _aio_server(spec, ready, echo)


def _pingpong_aio_client(spec: dict[str, Any], address: Any) -> Any:
    async def pingpong(conn: Any) -> Any:
        # pingpong._round_trips, awaited
        payload = b"p" * spec["size"]
        send, recv = conn.send_bytes, conn.recv_bytes
        await send(payload)
        if await recv() != payload:
            raise ValueError("echo mismatch")

        async def step(k: int) -> float:
            t0 = time.perf_counter()
            for _ in range(k):
                await send(payload)
                await recv()
            return time.perf_counter() - t0
        return await _async_samples(step, spec, 64, 100, _us_per_op)
    return _aio_client(spec, address, pingpong)


# -- stream ----------------------------------------------------------------------

def _stream_burst(send: Any, recv: Any, spec: dict[str, Any]) -> Any:
    """The stream case's timed step over awaitable ``send(data)``/``recv()``:
    b"N<n>", b"G", n messages, b"D"; returns the seconds the n messages took."""
    payload = stream_payload(spec["size"])

    async def burst(n: int) -> float:
        await send(b"N%d" % n)
        if await recv() != b"G":
            raise ValueError("stream: bad go")
        t0 = time.perf_counter()
        for _ in range(n):
            await send(payload)
        if await recv() != b"D":
            raise ValueError("stream: bad done")
        return time.perf_counter() - t0
    return burst


def _stream_aio_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    expected = stream_payload(spec["size"])

    async def receive(conn: Any) -> None:
        while True:
            try:
                ctrl = await conn.recv_bytes()
            except EOFError:
                break
            n = int(ctrl[1:])
            if n == 0:
                break
            await conn.send_bytes(b"G")
            got = 0
            while got < n:
                frames = await conn.recv_many()
                for m in frames:
                    if m != expected:
                        raise ValueError("stream: bad message")
                got += len(frames)
            await conn.send_bytes(b"D")
    _aio_server(spec, ready, receive)


def _stream_aio_client(spec: dict[str, Any], address: Any) -> Any:
    async def stream(conn: Any) -> Any:
        send = conn.send_bytes
        out = await _async_samples(_stream_burst(send, conn.recv_bytes, spec), spec, 1000, 2000, _per_second)
        await send(b"N0")
        return out
    return _aio_client(spec, address, stream)


# asyncio streams with the usual framing: readexactly(4), then readexactly(n)

async def _read_frame(reader: Any) -> bytes:
    (n,) = _HDR.unpack(await reader.readexactly(4))
    return bytes(await reader.readexactly(n))


def _write_frame(writer: Any, data: bytes) -> None:
    writer.write(_HDR.pack(len(data)) + data)


def _stream_streams_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    import asyncio
    expected = stream_payload(spec["size"])

    async def main() -> None:
        finished = asyncio.Event()

        async def handle(reader: Any, writer: Any) -> None:
            try:
                while True:
                    try:
                        ctrl = await _read_frame(reader)
                    except asyncio.IncompleteReadError:
                        break
                    n = int(ctrl[1:])
                    if n == 0:
                        break
                    _write_frame(writer, b"G")
                    for _ in range(n):
                        if await _read_frame(reader) != expected:
                            raise ValueError("stream: bad message")
                    _write_frame(writer, b"D")
                    await writer.drain()
            finally:
                writer.close()
                finished.set()

        server = await _streams_server(spec, handle)
        ready(server.sockets[0].getsockname())
        await finished.wait()
        server.close()
        await server.wait_closed()
    _run(spec, main)


async def _streams_server(spec: dict[str, Any], handle: Any) -> Any:
    import asyncio
    where = _listen_address(spec)
    if spec["family"] == "tcp":
        return await asyncio.start_server(handle, *where)
    return await asyncio.start_unix_server(handle, where)


async def _streams_open(spec: dict[str, Any], address: Any) -> Any:
    import asyncio
    import socket
    where = _addr(address)
    if spec["family"] == "tcp":
        reader, writer = await asyncio.open_connection(*where[:2])
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer
    return await asyncio.open_unix_connection(where)


def _stream_streams_client(spec: dict[str, Any], address: Any) -> Any:
    async def main() -> Any:
        reader, writer = await _streams_open(spec, address)

        async def send(data: bytes) -> None:
            _write_frame(writer, data)
            await writer.drain()

        def recv() -> Any:
            return _read_frame(reader)
        out = await _async_samples(_stream_burst(send, recv, spec), spec, 1000, 2000, _per_second)
        await send(b"N0")
        writer.close()
        return out
    return _run(spec, main)


def _zmq_asyncio() -> Any:
    _zmq()
    import zmq.asyncio
    return zmq.asyncio


def _stream_zmq_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    zmq = _zmq()
    expected = stream_payload(spec["size"])

    async def main() -> None:
        ctx = _zmq_asyncio().Context()
        pair = ctx.socket(zmq.PAIR)
        if spec["family"] == "tcp":
            ready(f"tcp://127.0.0.1:{pair.bind_to_random_port('tcp://127.0.0.1')}")
        else:
            pair.bind(f"ipc://{spec['path']}")
            ready(f"ipc://{spec['path']}")
        while True:
            n = int((await pair.recv())[1:])
            if n == 0:
                break
            await pair.send(b"G")
            for _ in range(n):
                if await pair.recv() != expected:
                    raise ValueError("stream: bad message")
            await pair.send(b"D")
        pair.close(linger=0)
        ctx.term()
    _run(spec, main)


def _stream_zmq_client(spec: dict[str, Any], address: Any) -> Any:
    zmq = _zmq()

    async def main() -> Any:
        ctx = _zmq_asyncio().Context()
        pair = ctx.socket(zmq.PAIR)
        pair.connect(address)
        out = await _async_samples(_stream_burst(pair.send, pair.recv, spec), spec, 1000, 2000, _per_second)
        await pair.send(b"N0")
        pair.close(linger=1000)
        ctx.term()
        return out
    return _run(spec, main)


# -- bulk ----------------------------------------------------------------------------

def _bulk_aio_server(spec: dict[str, Any], ready: Callable[[Any], None]) -> None:
    np = _numpy()
    nelem = spec["nbytes"] // 8
    out = np.empty(nelem, dtype=np.float64)

    async def receive(conn: Any) -> None:
        while True:
            try:
                ctrl = await conn.recv_bytes()
            except EOFError:
                break
            if ctrl != b"B":
                break
            _poison(np, out)
            await conn.send_bytes(b"G")
            await conn.recv_array(out=out)
            await conn.send_bytes(b"A")
            _check_array(np, out, nelem)
    _aio_server(spec, ready, receive)


def _bulk_aio_client(spec: dict[str, Any], address: Any) -> Any:
    np = _numpy()
    arr = np.arange(spec["nbytes"] // 8, dtype=np.float64)

    async def bulk(conn: Any) -> Any:
        async def transfer() -> float:
            await conn.send_bytes(b"B")
            if await conn.recv_bytes() != b"G":
                raise ValueError("bulk: bad go")
            t0 = time.perf_counter()
            await conn.send_array(arr)
            if await conn.recv_bytes() != b"A":
                raise ValueError("bulk: bad ack")
            return time.perf_counter() - t0
        for _ in range(spec["bulk_warmup"]):
            await transfer()
        out = {"samples": [arr.nbytes / await transfer() / 1e9 for _ in range(spec["repeat"])],
               "info": {"bytes": arr.nbytes}}
        await conn.send_bytes(b"S")
        return out
    return _aio_client(spec, address, bulk)


# (case, impl) -> (server, client) for the Python children.
ROLES: dict[tuple[str, str], Any] = {
    ("aio-pingpong", "fastnet"): (_pingpong_conn_server, _pingpong_conn_client),
    ("aio-pingpong", "aio-uvloop"): (_pingpong_aio_server, _pingpong_aio_client),
    ("aio-pingpong", "aio-asyncio"): (_pingpong_aio_server, _pingpong_aio_client),
    ("aio-stream", "fastnet"): (_stream_conn_server, _stream_conn_client),
    ("aio-stream", "aio-uvloop"): (_stream_aio_server, _stream_aio_client),
    ("aio-stream", "aio-asyncio"): (_stream_aio_server, _stream_aio_client),
    ("aio-stream", "streams-uvloop"): (_stream_streams_server, _stream_streams_client),
    ("aio-stream", "zmq-uvloop"): (_stream_zmq_server, _stream_zmq_client),
    ("aio-bulk", "fastnet"): (_bulk_conn_server, _bulk_conn_client),
    ("aio-bulk", "aio-uvloop"): (_bulk_aio_server, _bulk_aio_client),
    ("aio-bulk", "aio-asyncio"): (_bulk_aio_server, _bulk_aio_client),
}

CASES: dict[str, dict[str, Any]] = {
    "aio-pingpong": {
        "title": "aio-pingpong: {size}-byte round trip, asyncio against blocking",
        "unit": "µs", "json_unit": "us/roundtrip", "better": "lower",
        "impls": [
            Impl("fastnet", "blocking fastnet send/recv_bytes", anchor=True, pure=False),
            Impl("aio-uvloop", "fastnet.aio on uvloop", pure=False),
            Impl("aio-asyncio", "fastnet.aio on asyncio's loop", pure=False),
        ],
    },
    "aio-stream": {
        "title": "aio-stream: one-way {size}-byte messages, each checked, one awaited send each",
        "unit": "msg/s", "json_unit": "msg/s", "better": "higher",
        "impls": [
            Impl("streams-uvloop", "asyncio streams, readexactly framing, uvloop", anchor=True),
            Impl("zmq-uvloop", "zmq.asyncio PAIR, uvloop", anchor=True),
            Impl("fastnet", "blocking fastnet send_bytes", pure=False),
            Impl("aio-uvloop", "fastnet.aio send_bytes/recv_many on uvloop", pure=False),
            Impl("aio-asyncio", "fastnet.aio on asyncio's loop", pure=False),
        ],
    },
    "aio-bulk": {
        "title": "aio-bulk: {mib:g} MiB float64 array, asyncio against blocking",
        "unit": "GB/s", "json_unit": "GB/s", "better": "higher",
        "impls": [
            Impl("fastnet", "blocking fastnet send_array/recv_array", anchor=True, pure=False),
            Impl("aio-uvloop", "fastnet.aio send_array/recv_array(out=) on uvloop", pure=False),
            Impl("aio-asyncio", "fastnet.aio on asyncio's loop", pure=False),
        ],
    },
}

TARGETS: list[tuple[Any, ...]] = [
    ("aio-pingpong", None, "fastnet.aio on uvloop within 1.3x blocking fastnet (time ratio)",
     ("ratio", "aio-uvloop", "fastnet", "<=", 1.3)),
    ("aio-stream", None, "fastnet.aio >= 2x asyncio streams with readexactly framing",
     ("ratio", "aio-uvloop", "streams-uvloop", ">=", 2.0)),
    ("aio-stream", None, "fastnet.aio >= 2x zmq.asyncio", ("ratio", "aio-uvloop", "zmq-uvloop", ">=", 2.0)),
    ("aio-bulk", None, "fastnet.aio send_array >= 0.9x blocking send_array",
     ("ratio", "aio-uvloop", "fastnet", ">=", 0.9)),
]
