#!/usr/bin/env python3
"""Prefork echo server: one acceptor passes each client socket to N workers (recipe 11.11).

The Cookbook's recipe forks one worker and hands it every accepted socket
with ``send_handle``; here the acceptor keeps N workers, gives each new
client to the one with the fewest connections in flight, and replaces a
worker that dies. The handler is the recipe's plain ``recv``/``send`` echo.

    python3 examples/server_prefork_echo.py --port 15000 --workers 2
    $ kill -9 <a worker pid>      # it is replaced; the server keeps serving
"""
import argparse
import os

from fastnet.server import BaseRequestHandler, TCPServer


class EchoHandler(BaseRequestHandler):
    def handle(self):
        print(f"worker {os.getpid()}: connection from {self.client_address}", flush=True)
        while True:
            msg = self.request.recv(8192)
            if not msg:
                break
            self.request.sendall(msg)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=15000)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    serv = TCPServer((args.host, args.port), EchoHandler, concurrency="prefork", workers=args.workers)
    host, port = serv.address
    print(f"serving on {host}:{port}", flush=True)
    serv.serve_forever()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
