"""The request handlers: socketserver's blocking styles and the framed MessageHandler."""
from __future__ import annotations

import socketserver
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Buffer


class BaseRequestHandler(socketserver.BaseRequestHandler):
    """socketserver's handler: ``setup()``, ``handle()``, ``finish()`` on one request.

    ``self.request`` is the connected socket (stream servers) or
    ``(data, server_socket)`` (datagram servers).
    """


class StreamRequestHandler(BaseRequestHandler, socketserver.StreamRequestHandler):
    """A stream handler with ``rfile``/``wfile``; ``timeout=None`` keeps the server's idle_timeout."""


class DatagramRequestHandler(BaseRequestHandler, socketserver.DatagramRequestHandler):
    """A datagram handler: ``rfile`` holds the datagram, ``wfile`` is sent back by ``finish()``."""

    def finish(self) -> None:
        count = getattr(self.server, "_count_out", None)
        if count is not None:
            # counted first, so the count is there once the peer has the reply
            count(len(self.wfile.getvalue()))  # type: ignore[attr-defined]  # a BytesIO
        super().finish()


class MessageHandler:
    """A framed-message handler, one instance per connection.

    ``message_received(data)`` is called with each whole message (bytes);
    ``reply(data)`` sends one message back (any bytes-like object) and
    ``close()`` closes the connection once the replies are sent. ``setup()``
    runs when the connection is ready (after the handshake), ``finish()``
    when it is gone. ``self.server`` and ``self.client_address`` are set,
    and ``self.transport`` (the loop's FramedTransport, or TLSTransport)
    wherever the handler runs on a loop: concurrency "loop", "fork" and
    "prefork". With "thread" the handler runs on a pool thread and
    ``reply`` is thread-safe. Override ``setup`` rather than ``__init__``.

    Over TLS, ``peercert`` is the client's certificate as
    ``ssl.SSLSocket.getpeercert()`` gives it, set only when the server's
    context verified it (``CERT_REQUIRED``, or ``CERT_OPTIONAL`` and the
    client sent one); ``verified_client`` says whether it is.
    """

    transport: Any = None
    #: The client's verified certificate (a dict), or None.
    peercert: dict[str, Any] | None = None

    @property
    def verified_client(self) -> bool:
        """True if the client presented a certificate the server's TLS context verified."""
        return bool(self.peercert)

    def __init__(self, server: Any, client_address: Any) -> None:
        self.server = server
        self.client_address = client_address
        self._send: Callable[[Buffer], object] | None = None
        self._close: Callable[[], object] | None = None

    def setup(self) -> None:
        """Called once the connection is ready."""

    def message_received(self, data: bytes) -> None:
        """Handle one message."""
        raise NotImplementedError("MessageHandler subclasses implement message_received(data)")

    def finish(self) -> None:
        """Called once the connection is closed."""

    def draining(self) -> bool:
        """Called when the server shuts down, where the handler runs on a loop.

        Return True to keep the connection open (no more messages arrive)
        until the handler calls ``close()`` itself, for instance while it
        still owes replies to work running elsewhere; the server's
        ``shutdown_timeout`` still bounds the wait. The default, False,
        closes the connection once what was sent is flushed.
        """
        return False

    def reply(self, data: Buffer) -> None:
        """Send one message to the peer."""
        self._send(data)  # type: ignore[misc]  # set once the connection is ready

    def close(self) -> None:
        """Close the connection after the replies already sent."""
        self._close()  # type: ignore[misc]
