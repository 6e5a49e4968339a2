"""fastnet on asyncio: message connections, servers and an RPC proxy on the running loop.

::

    conn = await fastnet.aio.connect(("127.0.0.1", 6000), authkey=b"secret")
    await conn.send({"hello": "world"})
    reply = await conn.recv()

    async def handler(conn):
        async for obj in conn:
            await conn.send(obj)

    async with await fastnet.aio.serve(("127.0.0.1", 6000), handler, authkey=b"secret") as server:
        await server.serve_forever()

The wire is :mod:`fastnet.connection`'s (CPython's multiprocessing.connection
frames and authkey handshake), so either end may be a blocking fastnet peer
or a stdlib one. Everything runs on the loop that awaited it (the default
loop or uvloop): no threads, nothing kept beyond that loop.
"""
from fastnet.aio.connection import DEFAULT_HIGH_WATER, DEFAULT_LOW_WATER, AsyncConnection
from fastnet.aio.opening import connect
from fastnet.aio.server import Server, serve
from fastnet.aio.rpc import RPCProxy

__all__ = ["connect", "AsyncConnection", "serve", "Server", "RPCProxy", "DEFAULT_HIGH_WATER",
           "DEFAULT_LOW_WATER"]
