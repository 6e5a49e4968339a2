#!/usr/bin/env python3
"""An echo server that authenticates its clients with HMAC (the Cookbook's recipe 11.9), with fastnet.

The recipe's ``server_authenticate``/``client_authenticate`` pair is in
``fastnet.auth``. It speaks multiprocessing's challenge-response: random
bytes, an HMAC-SHA256 of them under the shared key, digests compared with
``hmac.compare_digest``, and then the same again the other way, so the client
also knows the server holds the key. It runs on any fastnet Connection; the
first server below wraps the sockets a plain ``accept()`` returns.
``fastnet.Listener(authkey=)`` and ``fastnet.Client(authkey=)`` run the same
handshake themselves (the second server), so either kind of client talks to
either kind of server, and so does ``multiprocessing.connection.Client``.

A peer with the wrong key is refused on both sides. As the recipe says,
authentication is not encryption: the echoed data travels in clear (see
ssl_echo.py for TLS).

    python3 examples/auth_echo.py --port 18000                    # socket server + fastnet.auth
    python3 examples/auth_echo.py --port 18000 --listener         # fastnet.Listener(authkey=)
    python3 examples/auth_echo.py --client --port 18000 [--listener] [--key KEY]
    python3 examples/auth_echo.py --demo                          # every pairing, right and wrong keys
"""
import argparse
import signal
import socket
import sys
import threading

import fastnet
from fastnet.auth import client_authenticate, server_authenticate

SECRET_KEY = b'peekaboo'
# a client that connects and says nothing must not hold the (serial) server
HANDSHAKE_TIMEOUT = 10.0

_stdout_lock = threading.Lock()


def say(*args):
    """print() whole lines: in --demo, servers and clients share stdout as threads."""
    with _stdout_lock:
        print(*args, flush=True)


def echo_handler(conn):
    """Send every message back until the client closes."""
    while True:
        try:
            msg = conn.recv_bytes()
        except EOFError:
            return
        conn.send_bytes(msg)


# -- server 1: a plain listening socket, the handshake run by hand -------------------

def make_socket_server(address):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(address)
    s.listen(5)
    return s


def serve_socket(s, secret_key):
    while True:
        c, a = s.accept()
        with fastnet.Connection(c) as conn:
            try:
                server_authenticate(conn, secret_key, timeout=HANDSHAKE_TIMEOUT)
            except (fastnet.AuthenticationError, fastnet.TimeoutError, ConnectionError) as e:
                say(f"socket server: refused {a[0]}:{a[1]}: {e}")
                continue
            say(f"socket server: {a[0]}:{a[1]} authenticated")
            try:
                echo_handler(conn)
            except OSError as e:
                say(f"socket server: {a[0]}:{a[1]}: {e}")


# -- server 2: fastnet.Listener runs the handshake in accept() -----------------------

def make_listener(address, secret_key):
    return fastnet.Listener(address, backlog=5, authkey=secret_key,
                            handshake_timeout=HANDSHAKE_TIMEOUT)


def serve_listener(listener):
    while True:
        try:
            conn = listener.accept()
        except (fastnet.AuthenticationError, fastnet.TimeoutError, ConnectionError) as e:
            a = listener.last_accepted
            say(f"listener: refused {a[0]}:{a[1]}: {e}")
            continue
        a = listener.last_accepted
        say(f"listener: {a[0]}:{a[1]} authenticated")
        with conn:
            try:
                echo_handler(conn)
            except OSError as e:
                say(f"listener: {a[0]}:{a[1]}: {e}")


# -- clients -------------------------------------------------------------------------

def socket_client(address, secret_key):
    """The recipe's client: connect a socket, then authenticate on it."""
    s = socket.create_connection(address, timeout=HANDSHAKE_TIMEOUT)
    conn = fastnet.Connection(s)
    try:
        client_authenticate(conn, secret_key, timeout=HANDSHAKE_TIMEOUT)
    except BaseException:
        conn.close()
        raise
    return conn


def fastnet_client(address, secret_key):
    return fastnet.Client(address, authkey=secret_key, timeout=HANDSHAKE_TIMEOUT)


def run_client(connect, address, secret_key, label):
    """Connect, echo a message, print what happened; False if refused."""
    try:
        conn = connect(address, secret_key)
    except fastnet.AuthenticationError as e:
        say(f"{label}, key {secret_key!r}: refused: {e}")
        return False
    with conn:
        msg = b'Hello World'
        conn.send_bytes(msg)
        say(f"{label}, key {secret_key!r}: sent {msg!r}, got back {conn.recv_bytes()!r}")
    return True


def demo(host):
    sock = make_socket_server((host, 0))
    listener = make_listener((host, 0), SECRET_KEY)
    # daemon threads: the servers end with the process
    threading.Thread(target=serve_socket, args=(sock, SECRET_KEY), daemon=True).start()
    threading.Thread(target=serve_listener, args=(listener,), daemon=True).start()
    for server_name, address in (("socket server", sock.getsockname()),
                                 ("listener", listener.address)):
        for client_name, connect in (("socket client", socket_client),
                                     ("fastnet.Client", fastnet_client)):
            for key in (SECRET_KEY, b'wrong key'):
                run_client(connect, address, key, f"{client_name} -> {server_name}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18000)
    ap.add_argument("--key", default=SECRET_KEY.decode(), help="the shared secret (default: %(default)s)")
    ap.add_argument("--listener", action="store_true",
                    help="serve with fastnet.Listener(authkey=) / connect with fastnet.Client(authkey=)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--client", action="store_true", help="connect to --host/--port and echo")
    mode.add_argument("--demo", action="store_true", help="run both servers and every kind of client")
    args = ap.parse_args()
    key = args.key.encode()
    if args.demo:
        demo(args.host)
        return
    if args.client:
        connect = fastnet_client if args.listener else socket_client
        name = "fastnet.Client" if args.listener else "socket client"
        sys.exit(0 if run_client(connect, (args.host, args.port), key, name) else 1)
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # SIGTERM stops like Ctrl-C
    if args.listener:
        server = make_listener((args.host, args.port), key)
        host, port = server.address
        serve = lambda: serve_listener(server)     # noqa: E731
    else:
        server = make_socket_server((args.host, args.port))
        host, port = server.getsockname()
        serve = lambda: serve_socket(server, key)  # noqa: E731
    say(f"serving on {host}:{port}")
    try:
        serve()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    say("stopped")


if __name__ == "__main__":
    main()
