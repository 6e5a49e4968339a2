#!/usr/bin/env python3
"""UDP time server with Cookbook-style event handlers (recipe 11.12) on fastnet's loop.

Any datagram gets the server's current time back, as ``time.ctime()`` text.

    python3 examples/eventhandler_udp_time.py --port 14000
    >>> from socket import *
    >>> s = socket(AF_INET, SOCK_DGRAM)
    >>> s.sendto(b'', ('localhost', 14000)); s.recvfrom(128)
"""
import argparse
import signal
import socket
import time

import fastnet


class UDPServer(fastnet.EventHandler):
    """A bound datagram socket that always wants to receive."""

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def fileno(self):
        return self.sock.fileno()

    def wants_to_receive(self):
        return True


class UDPTimeServer(UDPServer):
    def handle_receive(self):
        try:
            _msg, addr = self.sock.recvfrom(1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return   # e.g. a truncated datagram reported as an error: ignore it
        self.sock.sendto(time.ctime().encode("ascii"), addr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=14000)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    with fastnet.EventLoop(args.backend) as loop:
        server = UDPTimeServer((args.host, args.port))
        loop.add_handler(server)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, loop.stop)
        host, port = server.sock.getsockname()
        print(f"UDP time server on {host}:{port}", flush=True)
        loop.run_forever()
        loop.remove_handler(server)
        server.sock.close()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
