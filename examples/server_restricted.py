#!/usr/bin/env python3
"""A restricted TCP time server: only listed networks may connect (the course's RestrictedTCPServer).

Beazley's version overrides ``verify_request`` to compare the peer with
'127.0.0.1'; fastnet's ``allow=`` takes CIDR networks (the Cookbook's
``ipaddress`` recipe 11.4), checks them at accept, closes refused peers at
once and counts them (``server.stats()["connections_refused"]``).

    python3 examples/server_restricted.py --port 8080 --allow 127.0.0.0/8 --allow ::1/128
"""
import argparse
import time

from fastnet.server import BaseRequestHandler, TCPServer


class TimeHandler(BaseRequestHandler):
    def handle(self):
        self.request.sendall((time.ctime() + "\n").encode("ascii"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--allow", action="append", default=None,
                    help="a network allowed to connect (repeatable; default 127.0.0.1/32)")
    args = ap.parse_args()
    serv = TCPServer((args.host, args.port), TimeHandler, allow=args.allow or ["127.0.0.1/32"])
    host, port = serv.address
    print(f"serving on {host}:{port}", flush=True)
    serv.serve_forever()
    print(f"stopped; {serv.stats()['connections_refused']} refused", flush=True)


if __name__ == "__main__":
    main()
