"""What every part of the server package shares: its logger and ways to end a socket that never raise."""
from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("fastnet.server")

# the methods fastnet.server._mixins._own_or_stdlib made: on fastnet's servers
# they only pass the call on, so ForkingMixIn's service_actions() gives
# serving nothing to do
_DEFERRING: set[Callable[..., Any]] = set()


def _quiet_close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _shut(sock: socket.socket, how: int) -> None:
    try:
        # the socket's own shutdown: SSLSocket.shutdown would also drop its TLS
        # state, and a handler reading on another thread must see end of file
        # through TLS, not ciphertext
        socket.socket.shutdown(sock, how)
    except OSError:
        pass


def _tls_goodbye(sock: ssl.SSLSocket) -> None:
    """Send a TLS close_notify on a finished SSLSocket without waiting for the peer's."""
    try:
        if sock.fileno() < 0:
            return
        sock.settimeout(0.0)
        sock.unwrap()
    except (OSError, ValueError):
        pass
