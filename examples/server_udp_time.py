#!/usr/bin/env python3
"""UDP time server (the Cookbook's recipe 11.3) with fastnet's UDPServer.

Any datagram gets the current time back as ``time.ctime()`` text.

    python3 examples/server_udp_time.py --port 20000
    >>> from socket import socket, AF_INET, SOCK_DGRAM
    >>> s = socket(AF_INET, SOCK_DGRAM)
    >>> s.sendto(b'', ('localhost', 20000)); s.recvfrom(8192)
"""
import argparse
import time

from fastnet.server import BaseRequestHandler, UDPServer


class TimeHandler(BaseRequestHandler):
    def handle(self):
        # the request is the datagram and the server's socket
        msg, sock = self.request
        resp = time.ctime()
        sock.sendto(resp.encode("ascii"), self.client_address)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=20000)
    args = ap.parse_args()
    serv = UDPServer((args.host, args.port), TimeHandler)
    host, port = serv.address
    print(f"serving on {host}:{port}", flush=True)
    serv.serve_forever()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
