"""fastnet's default limits, in one leaf module (it imports nothing).

Each name says what it bounds. The transport, loop and server modules take
their defaults from here and re-export them under their historic public
names (``fastnet.connection.DEFAULT_MAX_MESSAGE_SIZE`` is
:data:`MAX_MESSAGE_SIZE_CONNECTION`, ``fastnet.server.DEFAULT_MAX_MESSAGE_SIZE``
is :data:`MAX_MESSAGE_SIZE_SERVER`).
"""

#: Largest message a Connection or a loop transport accepts unless told
#: otherwise (1 GiB). A header claiming more is refused before anything is
#: allocated; ``max_message_size=None`` lifts the limit for a trusted peer.
MAX_MESSAGE_SIZE_CONNECTION = 1 << 30
#: Largest frame a server's MessageHandler accepts (64 MiB): lower than a
#: Connection's because a server multiplies it by its connections.
MAX_MESSAGE_SIZE_SERVER = 64 << 20
#: Seconds a new peer gets to finish the TLS and authkey handshakes.
HANDSHAKE_TIMEOUT = 10.0
#: Connections a server holds open at once (handshakes included); more wait in the backlog.
MAX_CONNECTIONS_SERVER = 1000
#: Seconds without traffic after which a server closes a connection.
IDLE_TIMEOUT_SERVER = 300.0
#: Seconds a server's shutdown() gives connections and workers to finish.
SHUTDOWN_TIMEOUT_SERVER = 10.0
#: Worker threads of a server's loop-mode handler pool.
WORKER_THREADS_SERVER = 8
