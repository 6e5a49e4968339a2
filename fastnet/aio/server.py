"""serve(): a message server on the running asyncio loop, one handler coroutine per connection."""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from fastnet import server as _server
from fastnet.address import bind, parse_address
from fastnet.aio.connection import AsyncConnection
from fastnet.aio.opening import _start_tls, authenticate
from fastnet.connection import _LOOP_UNIX_SNDBUF, _tune
from fastnet.defaults import HANDSHAKE_TIMEOUT, MAX_CONNECTIONS_SERVER, MAX_MESSAGE_SIZE_CONNECTION
from fastnet.errors import ConnectionLost
from fastnet.handshake import DEFAULT_DIGEST

__all__ = ["Server", "serve"]

logger = logging.getLogger("fastnet.aio")

# connections accepted per readiness event of the listening socket
_ACCEPT_BATCH = 64

Handler = Callable[[AsyncConnection], Awaitable[Any]]


class Server:
    """A listening socket on the running loop that hands each authenticated connection to ``handler``.

    Made by :func:`serve`. ``close()`` stops accepting and cancels the
    handshakes and handlers still running; ``wait_closed()`` waits until
    they have finished and every connection is closed.
    """

    def __init__(self, sock: socket.socket, handler: Handler, authkey: bytes | None,
                 ssl_context: ssl.SSLContext | None, allow: Any, max_connections: int,
                 handshake_timeout: float | None, max_message_size: int | None, strict: bool,
                 digest: str | None, keepalive: float | None, unlink: str | None,
                 close_on_return: bool = True) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._handler = handler
        self._authkey = authkey
        self._ssl = ssl_context
        self._allow = _server.BaseServer._parse_allow(allow)
        self._limit = max_connections
        self._hs_timeout = handshake_timeout
        self._max_size = max_message_size
        self._strict = strict
        self._digest = digest
        self._keepalive = keepalive
        self._unlink = unlink
        self._close_on_return = close_on_return
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting = False
        self._closed = False
        self._done = self._loop.create_future()
        self.address = sock.getsockname()
        self.refused = 0          # peers turned away by ``allow``
        self.failed_handshakes = 0

    def __repr__(self) -> str:
        return f"<fastnet.aio.Server {self.address!r} connections={len(self._tasks)}>"

    @property
    def connections(self) -> int:
        """Connections open now (handshakes included)."""
        return len(self._tasks)

    def _start(self) -> None:
        if not self._accepting and not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._on_accept)
            self._accepting = True

    def _pause(self) -> None:
        if self._accepting:
            self._loop.remove_reader(self._sock.fileno())
            self._accepting = False

    def _on_accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            if len(self._tasks) >= self._limit:
                self._pause()     # the rest wait in the backlog
                return
            try:
                s, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:      # EMFILE, ECONNABORTED: try again on the next event
                logger.warning("accept failed: %s", exc)
                return
            if self._allow is not None and not _server.BaseServer._allowed(self, addr):  # type: ignore[arg-type]
                self.refused += 1
                s.close()
                continue
            task = self._loop.create_task(self._serve_one(s, addr))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._closed:
            if not self._tasks and not self._done.done():
                self._done.set_result(None)
        elif len(self._tasks) < self._limit:
            self._start()

    async def _open(self, s: socket.socket) -> AsyncConnection:
        s.setblocking(False)
        _tune(s, True, self._keepalive, _LOOP_UNIX_SNDBUF)
        conn: AsyncConnection
        if self._ssl is not None:
            conn = await _start_tls(s, self._ssl, True, None, self._hs_timeout, max_message_size=self._max_size)
        else:
            conn = AsyncConnection(s, max_message_size=self._max_size)
        if self._authkey is not None:
            try:
                await authenticate(conn, self._authkey, True, strict=self._strict, digest=self._digest)
            except BaseException:
                conn._abort(ConnectionLost("authentication failed"))
                raise
        return conn

    async def _serve_one(self, s: socket.socket, addr: Any) -> None:
        try:
            if self._hs_timeout is None:
                conn = await self._open(s)
            else:
                conn = await asyncio.wait_for(self._open(s), self._hs_timeout)
        except asyncio.CancelledError:
            s.close()
            raise
        except Exception as exc:
            # a bad or slow peer: only this connection goes
            s.close()
            self.failed_handshakes += 1
            logger.info("handshake with %r failed: %s: %s", addr, type(exc).__name__, exc)
            return
        handed_over = False
        try:
            await self._handler(conn)
            handed_over = not self._close_on_return
        except asyncio.CancelledError:
            raise
        except (EOFError, ConnectionError) as exc:
            logger.debug("connection from %r ended: %r", addr, exc)
        except Exception:
            logger.exception("handler for %r raised", addr)
        finally:
            if not handed_over:
                conn.close()
                await conn.wait_closed()

    async def start_serving(self) -> None:
        """Start accepting (serve() already did)."""
        self._start()

    async def serve_forever(self) -> None:
        """Accept until :meth:`close`; cancelling this closes the server."""
        self._start()
        try:
            await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self.close()
            raise

    def is_serving(self) -> bool:
        """True while connections are accepted."""
        return not self._closed

    def close(self) -> None:
        """Stop accepting and cancel the handshakes and handlers still running."""
        if self._closed:
            return
        self._closed = True
        self._pause()
        self._sock.close()
        if self._unlink is not None:
            try:
                os.unlink(self._unlink)
            except OSError:
                pass
        for t in list(self._tasks):
            t.cancel()
        if not self._tasks and not self._done.done():
            self._done.set_result(None)

    async def wait_closed(self) -> None:
        """Wait until the server is closed and every handler has returned."""
        await asyncio.shield(self._done)

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


async def serve(address: Any, handler: Handler, authkey: bytes | None = None, *,
                ssl_context: ssl.SSLContext | None = None, allow: Any = None,
                max_connections: int = MAX_CONNECTIONS_SERVER,
                handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
                max_message_size: int | None = MAX_MESSAGE_SIZE_CONNECTION, backlog: int = 128,
                family: str | int | None = None, strict: bool = False,
                digest: str | None = DEFAULT_DIGEST, keepalive: float | None = None,
                close_on_return: bool = True) -> Server:
    """Listen on ``address`` and run ``await handler(conn)`` for each connection, on the running loop.

    Each peer first passes ``allow`` (IP networks, as the blocking servers),
    then TLS (``ssl_context``) and the authkey handshake within
    ``handshake_timeout`` seconds; a peer that fails is closed and logged,
    and never reaches the handler. At most ``max_connections`` are open at
    once (the rest wait in the listen backlog). The connection is closed when
    the handler returns. A stdlib ``multiprocessing.connection.Client`` can
    connect. With ``close_on_return=False`` the handler takes the connection
    over: it stays open when the handler returns (not when it raises), and
    ``close()`` no longer reaches it. Returns a :class:`Server` that is
    already accepting.
    """
    if authkey is not None and not isinstance(authkey, bytes):
        raise TypeError("authkey should be a byte string")
    if max_connections < 1:
        raise ValueError("max_connections must be >= 1")
    fam, addr = parse_address(address, family)
    if allow is not None and fam == socket.AF_UNIX:
        raise ValueError("allow= lists IP networks; it does not apply to AF_UNIX servers")
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        if fam != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        bind(sock, addr)
        sock.listen(backlog)
        sock.setblocking(False)
        unlink = addr if fam == socket.AF_UNIX and isinstance(addr, str) and not addr.startswith("\0") else None
        server = Server(sock, handler, authkey, ssl_context, allow, max_connections, handshake_timeout,
                        max_message_size, strict, digest, keepalive, unlink, close_on_return)
    except BaseException:
        sock.close()
        raise
    server._start()
    return server
