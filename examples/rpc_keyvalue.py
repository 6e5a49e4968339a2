#!/usr/bin/env python3
"""A key-value store served over RPC (the Cookbook's recipe 11.6) with fastnet.

The recipe's KeyValueServer, moved from SimpleXMLRPCServer to fastnet.RPCServer.
The class keeps its ``_rpc_methods_`` list and ``register_instance`` exposes
exactly those methods. Values travel as msgpack instead of XML, so ``None``
needs no ``allow_none`` and bytes come back as bytes (XML-RPC hands back a
``Binary``). An error in a method reaches the client as fastnet.RemoteError,
which carries the remote exception's type name, message and traceback.

    python3 examples/rpc_keyvalue.py --port 15000            # the server
    python3 examples/rpc_keyvalue.py --client --port 15000   # the recipe's client session
    python3 examples/rpc_keyvalue.py --demo                  # both, in one process

    >>> import fastnet
    >>> s = fastnet.RPCProxy(('localhost', 15000))
    >>> s.set('foo', 'bar')
    >>> s.get('foo')
    'bar'
"""
import argparse

import fastnet


class KeyValueServer:
    _rpc_methods_ = ['get', 'set', 'delete', 'exists', 'keys']

    def __init__(self, address):
        self._data = {}
        self._serv = fastnet.RPCServer(address)
        self._serv.register_instance(self)

    def get(self, name):
        return self._data[name]

    def set(self, name, value):
        self._data[name] = value

    def delete(self, name):
        del self._data[name]

    def exists(self, name):
        return name in self._data

    def keys(self):
        return list(self._data)

    # serving: not in _rpc_methods_, so not callable remotely

    @property
    def address(self):
        return self._serv.address

    def serve_forever(self):
        self._serv.serve_forever()   # SIGINT / SIGTERM: graceful shutdown

    def start(self):
        self._serv.start()           # on a background thread

    def close(self):
        self._serv.close()


def call(proxy, method, *args):
    """Call a remote method and print the call and its result like an interactive session."""
    text = f"s.{method}({', '.join(map(repr, args))})"
    try:
        result = getattr(proxy, method)(*args)
    except fastnet.RemoteError as e:
        print(f"{text} raised {type(e).__name__}: {e}", flush=True)
    else:
        print(f"{text} -> {result!r}", flush=True)


def client_session(address):
    with fastnet.RPCProxy(address, timeout=10) as s:
        call(s, 'set', 'foo', 'bar')
        call(s, 'set', 'spam', [1, 2, 3])
        call(s, 'keys')
        call(s, 'get', 'foo')
        call(s, 'get', 'spam')
        call(s, 'delete', 'spam')
        call(s, 'exists', 'spam')
        call(s, 'get', 'spam')
        call(s, 'set', 'foo', b'Hello World')
        call(s, 'get', 'foo')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=15000)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--client", action="store_true", help="run the client session against --host/--port")
    mode.add_argument("--demo", action="store_true", help="run a server and the client session in this process")
    args = ap.parse_args()
    if args.client:
        client_session((args.host, args.port))
    elif args.demo:
        kvserv = KeyValueServer((args.host, 0))
        kvserv.start()
        try:
            client_session(kvserv.address)
        finally:
            kvserv.close()
    else:
        kvserv = KeyValueServer((args.host, args.port))
        host, port = kvserv.address
        print(f"serving on {host}:{port}", flush=True)
        kvserv.serve_forever()
        kvserv.close()
        print("stopped", flush=True)


if __name__ == "__main__":
    main()
