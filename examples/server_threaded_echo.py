#!/usr/bin/env python3
"""Threaded TCP echo server (the Cookbook's recipe 11.2, ThreadingTCPServer) on fastnet.

The Cookbook warns that a thread per client has no upper bound and suggests
a pre-allocated pool; fastnet's ThreadingTCPServer *is* that pool:
``workers`` threads serve, further clients wait for a free one.

    python3 examples/server_threaded_echo.py --port 20000 --workers 16
"""
import argparse

from fastnet.server import StreamRequestHandler, ThreadingTCPServer


class EchoHandler(StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=16, help="threads in the pool")
    ap.add_argument("--max-connections", type=int, default=1000)
    args = ap.parse_args()
    serv = ThreadingTCPServer((args.host, args.port), EchoHandler, workers=args.workers,
                              max_connections=args.max_connections)
    host, port = serv.address
    print(f"serving on {host}:{port}", flush=True)
    serv.serve_forever()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
