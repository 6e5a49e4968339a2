#!/usr/bin/env python3
"""TCP echo server with a StreamRequestHandler (the Cookbook's recipe 11.2) on fastnet.

The socketserver program with one changed import. Like socketserver's
TCPServer it serves one client at a time; see server_threaded_echo.py and
server_prefork_echo.py for concurrent ones.

    python3 examples/server_tcp_echo.py --port 20000
    >>> from socket import create_connection
    >>> s = create_connection(('localhost', 20000))
    >>> s.send(b'Hello\\n'); s.recv(8192)
"""
import argparse

from fastnet.server import StreamRequestHandler, TCPServer


class EchoHandler(StreamRequestHandler):
    def handle(self):
        print("Got connection from", self.client_address, flush=True)
        # self.rfile is a file-like object for reading, self.wfile for writing
        for line in self.rfile:
            self.wfile.write(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=20000)
    args = ap.parse_args()
    serv = TCPServer((args.host, args.port), EchoHandler)
    host, port = serv.address
    print(f"serving on {host}:{port}", flush=True)
    serv.serve_forever()          # SIGINT / SIGTERM: graceful shutdown
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
