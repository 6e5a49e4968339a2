"""handle_request(): socketserver's serving of one request at a time.

It runs on the caller's thread, on a server that is not serving: no event
loop of the server's is running, so a handshake runs to the end on a loop
of its own (handshake_now, which a forked child serving TLS uses too).
"""
from __future__ import annotations

import selectors
import socket
import time
from typing import TYPE_CHECKING, Any

from fastnet.loop import EventLoop
from fastnet.server._handshake import _Handshake, _OneHandshake
from fastnet.server._util import logger

if TYPE_CHECKING:
    from fastnet.server._base import BaseServer


def wait_for_request(server: BaseServer) -> None:
    """Wait for the listening socket, then take one request; or time out (handle_timeout())."""
    timeout = server.socket.gettimeout()
    if timeout is None:
        timeout = server.timeout
    elif server.timeout is not None:
        timeout = min(timeout, server.timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    sel = selectors.PollSelector() if hasattr(selectors, "PollSelector") else selectors.SelectSelector()
    with sel:
        sel.register(server.socket, selectors.EVENT_READ)
        while True:
            if sel.select(timeout):
                server._handle_request_noblock()
                return
            if deadline is not None:
                timeout = deadline - time.monotonic()
                if timeout < 0:
                    server.handle_timeout()
                    return


def take_request(server: BaseServer) -> None:
    """get_request(), the allow-list, verify_request(), the handshakes, process_request()."""
    try:
        request, client_address = server.get_request()
    except OSError:
        return
    if isinstance(client_address, bytes):
        client_address = client_address.decode("utf-8", "surrogateescape")
    if not (server._allowed(client_address) and server.verify_request(request, client_address)):
        server._refuse(request, client_address)
        return
    if server.socket_type == socket.SOCK_STREAM and (server.authkey is not None or server.ssl_context is not None):
        request = handshake_now(server, request, client_address)
        if request is None:
            return
    server._process_request(request, client_address)


def handshake_now(server: BaseServer, sock: socket.socket, addr: Any) -> socket.socket | None:
    """Run one connection's handshakes to the end on a loop of their own (handle_request, a fork child)."""
    box = _OneHandshake()
    loop = EventLoop(server.backend, spin=server.spin)
    try:
        _Handshake(server, loop, sock, addr, owner=box)
        loop.run_until(lambda: box.done)
    finally:
        loop.close()
    if box.sock is None:
        server._auth_failed += 1
        logger.info("handshake with %r failed: %s", addr, box.error)
        return None
    return box.sock
