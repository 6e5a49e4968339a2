#!/usr/bin/env python3
"""UDP echo server with Cookbook-style event handlers (recipe 11.12) on fastnet's loop.

Every datagram is sent back to its sender.

    python3 examples/eventhandler_udp_echo.py --port 15000
    >>> from socket import *
    >>> s = socket(AF_INET, SOCK_DGRAM)
    >>> s.sendto(b'Hello', ('localhost', 15000)); s.recvfrom(128)
"""
import argparse
import signal
import socket

import fastnet


class UDPEchoServer(fastnet.EventHandler):
    def __init__(self, address):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def fileno(self):
        return self.sock.fileno()

    def wants_to_receive(self):
        return True

    def handle_receive(self):
        try:
            msg, addr = self.sock.recvfrom(65535)
        except (BlockingIOError, InterruptedError):
            return
        self.sock.sendto(msg, addr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=15000)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    with fastnet.EventLoop(args.backend) as loop:
        server = UDPEchoServer((args.host, args.port))
        loop.add_handler(server)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, loop.stop)
        host, port = server.sock.getsockname()
        print(f"UDP echo server on {host}:{port}", flush=True)
        loop.run_forever()
        loop.remove_handler(server)
        server.sock.close()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
