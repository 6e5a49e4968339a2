#!/usr/bin/env python3
"""Remote procedure calls with JSON (the JSON-RPC variant of the Cookbook's recipe 11.8) on fastnet.

The recipe adapts its pickle RPCHandler/RPCProxy to JSON by swapping
``pickle.dumps``/``loads`` for ``json.dumps``/``loads``, and sends exceptions
back as strings. With fastnet it is the ``codec="json"`` argument on both
ends. JSON cannot run code when it is decoded, so the server needs no authkey
(add one to keep strangers out all the same). What JSON cannot say changes
what comes back: a tuple arrives as a list, bytes are refused by name, and a
remote exception arrives as fastnet.RemoteError whose ``type_name`` and
``message`` describe it (its type is not rebuilt, unlike with pickle).

    python3 examples/rpc_json.py --port 17001               # the server
    python3 examples/rpc_json.py --client --port 17001      # the client session
    python3 examples/rpc_json.py --demo                     # both, in one process
"""
import argparse

import fastnet


def add(x, y):
    return x + y


def sub(x, y):
    return x - y


def make_server(address):
    serv = fastnet.RPCServer(address, codec="json")
    serv.register_function(add)
    serv.register_function(sub)
    return serv


def call(proxy, method, *args):
    """Call a remote function and print the call and its outcome."""
    text = f"proxy.{method}({', '.join(map(repr, args))})"
    try:
        result = getattr(proxy, method)(*args)
    except fastnet.RemoteError as e:
        print(f"{text} raised RemoteError: type_name={e.type_name!r} message={e.message!r}", flush=True)
    except TypeError as e:
        # raised here, before sending: JSON has no bytes
        print(f"{text} raised TypeError: {e}", flush=True)
    else:
        print(f"{text} -> {result!r}", flush=True)


def client_session(address):
    with fastnet.RPCProxy(address, codec="json", timeout=10) as proxy:
        call(proxy, 'add', 2, 3)
        call(proxy, 'sub', 2, 3)
        call(proxy, 'add', (1, 2), (3,))
        call(proxy, 'sub', [1, 2], 4)
        call(proxy, 'add', b'spam', b'eggs')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=17001)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--client", action="store_true", help="run the client session against --host/--port")
    mode.add_argument("--demo", action="store_true", help="run a server and the client session in this process")
    args = ap.parse_args()
    if args.client:
        client_session((args.host, args.port))
    elif args.demo:
        with make_server((args.host, 0)) as serv:
            serv.start()
            client_session(serv.address)
    else:
        serv = make_server((args.host, args.port))
        host, port = serv.address
        print(f"serving on {host}:{port}", flush=True)
        serv.serve_forever()          # SIGINT / SIGTERM: graceful shutdown
        serv.close()
        print("stopped", flush=True)


if __name__ == "__main__":
    main()
