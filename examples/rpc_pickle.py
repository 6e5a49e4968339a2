#!/usr/bin/env python3
"""Remote procedure calls with pickle (the Cookbook's recipe 11.8) on fastnet.RPCServer / RPCProxy.

The recipe hand-builds an RPCHandler and an RPCProxy that pickle
``(name, args, kwargs)`` over multiprocessing connections. fastnet has both:
``RPCServer(codec="pickle", authkey=...)`` serves the registered functions and
``RPCProxy`` turns attribute calls into requests. With pickle, any picklable
object travels (a Fraction below), and an exception raised remotely is raised
in the client as its original type, with the remote traceback attached as
its ``__cause__``.

The recipe warns that unpickling runs code: never accept pickles from
unauthenticated clients. fastnet enforces that: a pickle RPCServer without an
authkey (or TLS client certificates) refuses to start, and a client with the
wrong key is refused before it can send anything.

    python3 examples/rpc_pickle.py --port 17000               # the server
    python3 examples/rpc_pickle.py --client --port 17000      # the recipe's session
    python3 examples/rpc_pickle.py --demo                     # both, in one process
"""
import argparse
import sys
from fractions import Fraction

import fastnet

AUTHKEY = b'peekaboo'


# Some remote functions
def add(x, y):
    return x + y


def sub(x, y):
    return x - y


def make_server(address, authkey):
    serv = fastnet.RPCServer(address, authkey=authkey, codec="pickle")
    serv.register_function(add)
    serv.register_function(sub)
    return serv


def call(proxy, method, *args):
    """Call a remote function and print the call and its outcome."""
    text = f"proxy.{method}({', '.join(map(repr, args))})"
    try:
        result = getattr(proxy, method)(*args)
    except Exception as e:
        # the original exception type, not a wrapper
        print(f"{text} raised {type(e).__name__}: {e}", flush=True)
        if isinstance(e.__cause__, fastnet.RemoteError):
            frames = [ln.strip() for ln in e.__cause__.traceback.splitlines()
                      if ln.strip().startswith("File ")]
            print(f"    raised on the server at: {frames[-1]}", flush=True)
    else:
        print(f"{text} -> {result!r}", flush=True)


def client_session(address, authkey):
    with fastnet.RPCProxy(address, authkey=authkey, codec="pickle", timeout=10) as proxy:
        call(proxy, 'add', 2, 3)
        call(proxy, 'sub', 2, 3)
        call(proxy, 'sub', [1, 2], 4)
        call(proxy, 'add', Fraction(1, 3), Fraction(1, 6))
    try:
        fastnet.RPCProxy(address, authkey=b'not the key', codec="pickle", timeout=10)
    except fastnet.AuthenticationError as e:
        print(f"a client with the wrong key is refused: AuthenticationError: {e}", flush=True)
    else:
        print("a client with the wrong key was accepted", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=17000)
    ap.add_argument("--authkey", default=AUTHKEY.decode(), help="the shared secret (default: %(default)s)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--client", action="store_true", help="run the client session against --host/--port")
    mode.add_argument("--demo", action="store_true", help="run a server and the client session in this process")
    args = ap.parse_args()
    authkey = args.authkey.encode()
    if args.client:
        try:
            client_session((args.host, args.port), authkey)
        except fastnet.AuthenticationError as e:
            print(f"refused: AuthenticationError: {e}", flush=True)
            sys.exit(1)
    elif args.demo:
        with make_server((args.host, 0), authkey) as serv:
            serv.start()
            client_session(serv.address, authkey)
    else:
        serv = make_server((args.host, args.port), authkey)
        host, port = serv.address
        print(f"serving on {host}:{port}", flush=True)
        serv.serve_forever()          # SIGINT / SIGTERM: graceful shutdown
        serv.close()
        print("stopped", flush=True)


if __name__ == "__main__":
    main()
