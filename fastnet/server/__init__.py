"""Servers: socketserver's TCP, UDP and AF_UNIX servers on fastnet's event loop.

A socketserver program ports by changing its import::

    from fastnet.server import TCPServer, StreamRequestHandler

    class EchoHandler(StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                self.wfile.write(line)

    TCPServer(("", 20000), EchoHandler).serve_forever()

Handlers come in two styles:

* socketserver's: ``handle()`` with ``self.request`` (the client socket, or
  ``(data, socket)`` for a datagram), ``self.client_address`` and
  ``self.server``; :class:`StreamRequestHandler` adds ``rfile``/``wfile`` and
  :class:`DatagramRequestHandler` does the same for one datagram. These
  handlers block. The stdlib's own handler classes work unchanged.
* framed: a :class:`MessageHandler` gets whole messages in
  ``message_received(data)`` and answers with ``reply(data)``. The frames are
  multiprocessing's, so ``fastnet.Client`` and
  ``multiprocessing.connection.Client`` are its clients.

``concurrency`` says where handlers run:

``"loop"`` (the default)
    On the server's event loop. A MessageHandler must not block there. A
    blocking stream handler serves one connection at a time, exactly as
    socketserver's plain ``TCPServer``; a datagram handler runs per datagram.
``"thread"``
    On a pool of ``workers`` threads (default 16), not a thread per client:
    connections beyond the pool wait for a free thread. A MessageHandler's
    messages are handled one at a time per connection, in order.
``"fork"``
    One child process per connection (per datagram for UDP), at most
    ``workers`` at a time (default 40); children are reaped as they exit.
``"prefork"`` (stream servers)
    ``workers`` processes (default: the CPU count) forked when serving
    starts. The server process accepts, checks and authenticates each
    connection, then passes its socket to the worker with the fewest
    connections in flight (SCM_RIGHTS, the Cookbook's recipe 11.11).
    Workers report every finished connection back; a worker that dies is
    replaced and its connections written off. A worker runs MessageHandlers
    on its own event loop and blocking handlers on ``worker_threads``
    threads (default 8).

Limits, keyword arguments with these defaults:

``max_connections=1000``
    connections open at once, pending handshakes included. Beyond it new
    connections wait in the listen backlog, or with ``overflow="refuse"``
    are accepted and closed at once (and counted as refused).
``max_message_size=64 MiB``
    the largest frame a MessageHandler accepts; a larger one closes that
    connection before anything is allocated for it.
``idle_timeout=300``
    seconds without traffic after which a connection is closed (for
    blocking handlers: the socket timeout). ``None`` disables it.
``handshake_timeout=10``
    with an ``authkey`` or an ``ssl_context``, seconds a client has for its
    handshakes (TLS, then multiprocessing's mutual authkey handshake). They
    run on the loop as non-blocking state machines, so a silent client
    never delays another.
``shutdown_timeout=10``
    seconds ``shutdown()`` waits for connections and workers to finish.

``ssl_context=`` (an ``ssl.SSLContext``, see :func:`fastnet.tls.server_context`)
serves TLS on every stream server; with an ``authkey`` too, the authkey
handshake runs inside TLS, as ``fastnet.Listener`` does. The TLS handshake
counts as part of the handshake: bounded by ``handshake_timeout``, inside
``max_connections``, failures counted in ``stats()["handshake_failures"]``,
and it never blocks the loop. A MessageHandler's TLS runs on the loop that
serves it (``TLSTransport``); a blocking handler gets ``self.request`` as an
``ssl.SSLSocket`` whose handshake the loop finished before the handler
started, so a silent peer holds no handler thread. In prefork mode the
worker does the handshakes, since TLS state cannot move between processes.
With a context that requires client certificates (``verify_mode ==
CERT_REQUIRED``), only verified clients get in; MessageHandler's
``peercert`` and ``verified_client`` say who they are. Datagram servers
refuse ``ssl_context``.

``allow=["127.0.0.0/8", "::1/128"]`` refuses, at accept, every peer outside
the listed networks (``ipaddress``); refused peers are closed at once and
counted. ``verify_request`` is still called for the others.

``backend="auto"`` picks the event loop's readiness backend (``"epoll"``,
``"poll"`` or ``"select"``). ``spin=`` microseconds (default 0: off) makes
every event loop of the server (the serving one, a prefork worker's, a fork
child's) busy-poll before it sleeps: a request that arrives within that time
skips the scheduler's wake-up, at the price of a CPU burnt for up to
``spin`` per wait, while idle too. See :class:`fastnet.EventLoop`.

``handle_request()`` serves one request on the calling thread, as in
socketserver, for a server that is not serving: it honours ``timeout`` and
``handle_timeout()``, and serves in the concurrency mode's way (a thread
per request for "thread", a child per request for "fork" and "prefork").

``serve_forever()`` serves on the calling thread (in the main thread it
turns SIGINT and SIGTERM into a graceful shutdown; a second signal stops
waiting), ``start()`` on a background thread. ``shutdown()`` is graceful:
stop accepting, let connections finish what they were given and send what
is queued, close, then join threads and processes; what is left after the
timeout is closed or killed. ``stats()`` returns simple counters.

``fork`` and ``prefork`` never fork from the serving process, whose loop
thread and pools would leave a child locks no thread will release. When
serving starts (``serve_forever()``, or ``start()`` before its thread),
before any thread of the server exists, the server forks a fork server: a
single-threaded copy of the process that forks every child on request
(connections and report channels travel to it as SCM_RIGHTS), reaps them
and reports their exits, and leaves when the server closes or its parent
dies (if it is killed, the server shuts down). Start forking servers
before the program starts threads of its own:
that one fork copies the process as it is then. Children leave with
``os._exit`` and never touch the parent's event loop. A child inherits the
descriptors the process had when serving started, as with socketserver's
ForkingMixIn: a process that is also a client of its own forking server
should run those clients elsewhere.
"""
from __future__ import annotations

from fastnet.server._base import (
    CONCURRENCY,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_WORKER_THREADS,
    BaseServer,
    TCPServer,
    UDPServer,
    UnixDatagramServer,
    UnixServer,
    UnixStreamServer,
)
from fastnet.server._handlers import (
    BaseRequestHandler,
    DatagramRequestHandler,
    MessageHandler,
    StreamRequestHandler,
)
from fastnet.server._mixins import (
    ForkingMixIn,
    ForkingTCPServer,
    ForkingUDPServer,
    ForkingUnixDatagramServer,
    ForkingUnixStreamServer,
    PreforkMixIn,
    PreforkTCPServer,
    ThreadingMixIn,
    ThreadingTCPServer,
    ThreadingUDPServer,
    ThreadingUnixDatagramServer,
    ThreadingUnixStreamServer,
)
from fastnet.server._util import logger

# The internals keep the names they had when this package was one module.
from fastnet.server._mixins import _own_or_stdlib
from fastnet.server._fork import _Child
from fastnet.server._engine import _Blocking, _Engine, _FramedConn
from fastnet.server._handshake import _Handshake, _OneHandshake
from fastnet.server._pool import _Pool, _Threads, _thread_died
from fastnet.server._util import _quiet_close, _shut, _tls_goodbye

__all__ = [
    "BaseServer", "TCPServer", "UDPServer", "UnixServer", "UnixStreamServer", "UnixDatagramServer",
    "ThreadingMixIn", "ForkingMixIn", "PreforkMixIn",
    "ThreadingTCPServer", "ForkingTCPServer", "PreforkTCPServer",
    "ThreadingUDPServer", "ForkingUDPServer",
    "ThreadingUnixStreamServer", "ThreadingUnixDatagramServer",
    "ForkingUnixStreamServer", "ForkingUnixDatagramServer",
    "BaseRequestHandler", "StreamRequestHandler", "DatagramRequestHandler", "MessageHandler",
    "CONCURRENCY", "DEFAULT_MAX_CONNECTIONS", "DEFAULT_MAX_MESSAGE_SIZE", "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_HANDSHAKE_TIMEOUT", "DEFAULT_SHUTDOWN_TIMEOUT",
]
