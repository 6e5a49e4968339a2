"""Opening an AsyncConnection: the socket connect, TLS on the loop's transport, the authkey handshake."""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from typing import Any

from fastnet import auth as _auth
from fastnet.address import parse_address
from fastnet.aio.connection import AsyncConnection, _TLSConnection, _TLSProtocol
from fastnet.connection import _LOOP_UNIX_SNDBUF, _keepalive_seconds, _tune
from fastnet.defaults import MAX_MESSAGE_SIZE_CONNECTION
from fastnet.errors import AuthenticationError, ConnectionLost, MessageTooLarge, ProtocolError, TimeoutError
from fastnet.handshake import DEFAULT_DIGEST, MAX_MESSAGE, Handshake

__all__ = ["connect", "authenticate"]


async def _start_tls(sock: socket.socket, ctx: ssl.SSLContext, server_side: bool, server_hostname: str | None,
                     timeout: float | None, **kw: Any) -> _TLSConnection:
    """Run the TLS handshake on sock with the loop's TLS transport; the connection over it."""
    loop = asyncio.get_running_loop()
    conn = _TLSConnection(sock, **kw)
    hs_timeout = None if timeout is None else max(timeout, 0.001)
    try:
        if server_side:
            await loop.connect_accepted_socket(lambda: _TLSProtocol(conn), sock, ssl=ctx,
                                               ssl_handshake_timeout=hs_timeout)
        else:
            await loop.create_connection(lambda: _TLSProtocol(conn), sock=sock, ssl=ctx,
                                         server_hostname=server_hostname, ssl_handshake_timeout=hs_timeout)
    except (ssl.SSLError, ConnectionError) as exc:
        sock.close()
        raise AuthenticationError(f"TLS handshake failed: {exc}") from exc
    except BaseException:
        sock.close()
        raise
    return conn


async def authenticate(conn: AsyncConnection, authkey: bytes, server_side: bool, *, strict: bool = False,
                       digest: str | None = DEFAULT_DIGEST) -> None:
    """Run the mutual authkey handshake over conn (either role), as ``fastnet.auth`` does on a blocking one.

    Replies wait while the peer's next frame is already received, so a
    pipelining peer gets them in one write.
    """
    hs = Handshake(authkey, server_side, strict=strict, digest=digest)
    out = hs.start()
    try:
        while True:
            if out and (hs.finished or not conn._decoder.has_frame()):
                await conn.send_many(out)
                out = []
            if hs.error is not None:
                raise hs.error
            if hs.done:
                return
            try:
                payload = await conn.recv_bytes(MAX_MESSAGE)
            except (MessageTooLarge, EOFError, ProtocolError) as exc:
                raise _auth.handshake_failure(exc) from None
            reply = hs.receive(payload)
            if not reply and hs.error is None and not conn._decoder.has_frame():
                _auth.quickack(conn)    # no reply carries the ACK of this frame
            out += reply
    finally:
        hs.abandon()


def _numeric_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _open_socket(fam: int, addr: Any) -> socket.socket:
    loop = asyncio.get_running_loop()
    if fam == socket.AF_UNIX:
        infos: list[Any] = [(socket.AF_UNIX, addr)]
    elif _numeric_host(addr[0]):
        # no lookup: asyncio's resolver would start a thread for nothing
        infos = [(fam, addr)]
    else:
        res = await loop.getaddrinfo(addr[0], addr[1], type=socket.SOCK_STREAM)
        infos = [(r[0], r[4]) for r in res]
    last: BaseException | None = None
    for family, sa in infos:
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setblocking(False)
            await loop.sock_connect(s, sa)
            return s
        except OSError as exc:
            s.close()
            last = exc
        except BaseException:
            s.close()
            raise
    assert last is not None
    raise last


async def _connect(address: Any, authkey: bytes | None, ssl_context: ssl.SSLContext | None,
                   max_message_size: int | None, keepalive: float | None, family: str | int | None,
                   strict: bool, digest: str | None, nodelay: bool, timeout: float | None,
                   server_hostname: str | None) -> AsyncConnection:
    fam, addr = parse_address(address, family)
    if ssl_context is not None and fam == socket.AF_UNIX and ssl_context.check_hostname:
        raise ValueError("TLS over AF_UNIX has no host name to check: "
                         "use an ssl_context with check_hostname=False")
    sock = await _open_socket(fam, addr)
    try:
        _tune(sock, nodelay, keepalive, _LOOP_UNIX_SNDBUF)
    except BaseException:
        sock.close()
        raise
    conn: AsyncConnection
    if ssl_context is not None:
        host = server_hostname or (None if fam == socket.AF_UNIX else addr[0])
        conn = await _start_tls(sock, ssl_context, False, host, timeout, max_message_size=max_message_size)
    else:
        conn = AsyncConnection(sock, max_message_size=max_message_size)
    if authkey is not None:
        try:
            await authenticate(conn, authkey, False, strict=strict, digest=digest)
        except BaseException:
            conn._abort(ConnectionLost("authentication failed"))
            raise
    return conn


async def connect(address: Any, authkey: bytes | None = None, *, ssl_context: ssl.SSLContext | None = None,
                  timeout: float | None = None, max_message_size: int | None = MAX_MESSAGE_SIZE_CONNECTION,
                  keepalive: float | None = None, family: str | int | None = None, strict: bool = False,
                  digest: str | None = DEFAULT_DIGEST, nodelay: bool = True,
                  server_hostname: str | None = None) -> AsyncConnection:
    """Connect to a fastnet or stdlib ``multiprocessing.connection`` Listener; return an AsyncConnection.

    The arguments are :func:`fastnet.Client`'s: ``timeout`` bounds the
    connect, TLS and the authkey handshake together (fastnet.TimeoutError);
    ``ssl_context`` runs TLS (checking the certificate against
    ``server_hostname``, the address's host if None); ``keepalive=seconds`` detects a vanished peer
    (TCP). Must be awaited on the loop that will use the connection.
    """
    if authkey is not None and not isinstance(authkey, bytes):
        raise TypeError("authkey should be a byte string")
    keepalive = _keepalive_seconds(keepalive)
    coro = _connect(address, authkey, ssl_context, max_message_size, keepalive, family, strict, digest,
                    nodelay, timeout, server_hostname)
    if timeout is None:
        return await coro
    try:
        return await asyncio.wait_for(coro, timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(f"connecting to {address!r} timed out") from None
