#!/usr/bin/env python3
"""TCP echo server with Cookbook-style event handlers (recipe 11.12) on fastnet's loop.

The listening handler accepts; each client gets a handler that echoes what
it receives, wanting to send only while it has bytes queued. The loop asks
a handler what it wants only after that handler ran, so an idle client
costs nothing per event.

    python3 examples/eventhandler_tcp_echo.py --port 16000
    $ nc localhost 16000
"""
import argparse
import signal
import socket

import fastnet


class TCPServer(fastnet.EventHandler):
    def __init__(self, address, client_handler):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, True)
        self.sock.bind(address)
        self.sock.listen(128)
        self.sock.setblocking(False)
        self.client_handler = client_handler

    def fileno(self):
        return self.sock.fileno()

    def wants_to_receive(self):
        return True

    def handle_receive(self):
        try:
            client, _addr = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        client.setblocking(False)
        self.loop.add_handler(self.client_handler(client))


class TCPClient(fastnet.EventHandler):
    def __init__(self, sock):
        self.sock = sock
        self.outgoing = bytearray()

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        self.loop.remove_handler(self)
        self.sock.close()

    def wants_to_send(self):
        return bool(self.outgoing)

    def handle_send(self):
        try:
            nsent = self.sock.send(self.outgoing)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        del self.outgoing[:nsent]


class TCPEchoClient(TCPClient):
    # Stop reading while a lot is queued: a peer that sends but never
    # reads must not grow our buffer without bound.
    limit = 1 << 20

    def wants_to_receive(self):
        return len(self.outgoing) < self.limit

    def handle_receive(self):
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
        else:
            self.outgoing.extend(data)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=16000)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    with fastnet.EventLoop(args.backend) as loop:
        server = TCPServer((args.host, args.port), TCPEchoClient)
        loop.add_handler(server)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, loop.stop)
        host, port = server.sock.getsockname()
        print(f"TCP echo server on {host}:{port}", flush=True)
        loop.run_forever()
        for h in loop.handlers:
            loop.remove_handler(h)
            h.sock.close()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
