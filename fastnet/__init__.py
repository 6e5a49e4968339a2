"""fastnet: fast, safe message transport for Python processes and machines.

A drop-in, wire-compatible replacement for ``multiprocessing.connection``
with zero-copy arrays and compiled hot paths. ``fastnet.backend`` says which
kernels are active: ``"cython"`` or, with ``FASTNET_PURE=1``, ``"python"``.
"""
from fastnet._version import __version__
from fastnet._kernels import backend
from fastnet.errors import (
    FastnetError,
    AuthenticationError,
    ProtocolError,
    TruncatedFrameError,
    NoDescriptorError,
    MessageTooLarge,
    BufferTooShort,
    RemoteError,
    MethodNotFound,
    ConnectionLost,
    TimeoutError,
)
from fastnet.connection import (
    Connection,
    Listener,
    Client,
    Pipe,
    wait,
    set_keepalive,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_HANDSHAKE_TIMEOUT,
)
from fastnet.zerocopy import send_from, recv_into
from fastnet.fdpass import send_fd, recv_fd, send_fds, recv_fds
from fastnet import auth
from fastnet.loop import EventLoop, EventHandler
from fastnet import server
from fastnet.server import (
    TCPServer,
    UDPServer,
    UnixServer,
    UnixDatagramServer,
    BaseRequestHandler,
    StreamRequestHandler,
    DatagramRequestHandler,
    MessageHandler,
)

from fastnet import codecs
from fastnet import monitor
from fastnet.rpc import RPCServer, RPCProxy


__all__ = [
    "backend",
    "__version__",
    "FastnetError",
    "AuthenticationError",
    "ProtocolError",
    "NoDescriptorError",
    "TruncatedFrameError",
    "MessageTooLarge",
    "BufferTooShort",
    "RemoteError",
    "MethodNotFound",
    "ConnectionLost",
    "TimeoutError",
    "Connection",
    "Listener",
    "Client",
    "Pipe",
    "wait",
    "set_keepalive",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "send_from",
    "recv_into",
    "send_fd",
    "recv_fd",
    "send_fds",
    "recv_fds",
    "auth",
    "EventLoop",
    "EventHandler",
    "server",
    "TCPServer",
    "UDPServer",
    "UnixServer",
    "UnixDatagramServer",
    "BaseRequestHandler",
    "StreamRequestHandler",
    "DatagramRequestHandler",
    "MessageHandler",
    "codecs",
    "monitor",
    "RPCServer",
    "RPCProxy",
]
