#!/usr/bin/env python3
"""The course's first TCP server and client (Beazley, "Python Network Programming"), with fastnet.

The server greets each client with ``Hello <client address>`` and closes the
connection; the course writes its accept loop by hand, here it is
fastnet.server.TCPServer with a handler. The client is the course's: connect,
read until the server closes (recv() returning b''), join the fragments.

    python3 examples/tcp_hello.py --port 9000              # the server
    python3 examples/tcp_hello.py --client --port 9000     # the client
    python3 examples/tcp_hello.py --demo                   # both, in one process
    $ telnet localhost 9000
"""
import argparse
import socket
import threading

from fastnet.server import BaseRequestHandler, TCPServer

_stdout_lock = threading.Lock()


def say(*args):
    """print() whole lines: in --demo, servers and clients share stdout as threads."""
    with _stdout_lock:
        print(*args, flush=True)


class HelloHandler(BaseRequestHandler):
    def handle(self):
        say("Received connection from", self.client_address)
        self.request.sendall(f"Hello {self.client_address[0]}\n".encode("ascii"))
        # returning closes the connection


def client(address):
    with socket.create_connection(address, timeout=10) as s:
        fragments = []
        while True:
            chunk = s.recv(10000)
            if not chunk:
                break          # the server closed: the whole message is here
            fragments.append(chunk)
    message = b"".join(fragments)
    say(f"client: {message!r}")
    return message


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--client", action="store_true", help="connect to --host/--port")
    mode.add_argument("--demo", action="store_true", help="run a server and a client in this process")
    args = ap.parse_args()
    if args.client:
        client((args.host, args.port))
        return
    serv = TCPServer((args.host, 0 if args.demo else args.port), HelloHandler)
    host, port = serv.address[:2]
    if args.demo:
        serv.start()                  # serve on a background thread
        try:
            client((host, port))
        finally:
            serv.shutdown()
            serv.server_close()
        return
    say(f"serving on {host}:{port}")
    serv.serve_forever()              # SIGINT / SIGTERM: graceful shutdown
    serv.server_close()
    say("stopped")


if __name__ == "__main__":
    main()
