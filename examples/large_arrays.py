#!/usr/bin/env python3
"""Sending and receiving large numpy arrays (the Cookbook's recipe 11.13), with fastnet.

Two ways, over one TCP connection:

1. The recipe's zero-copy helpers on a plain socket:
   ``fastnet.send_from(arr, sock)`` and ``fastnet.recv_into(arr, sock)``
   move the array's own memory, with no copy and without holding the GIL.
   Like the recipe, the receiver must already know the size and type: it
   allocates the array first.
2. ``Connection.send_array(arr)`` / ``Connection.recv_array(out=arr)`` on a
   fastnet Connection wrapped around the same socket: dtype, shape and order
   travel in a small header message before the raw bytes, the receiver
   checks them against ``out`` and the bytes go straight into it.

The client asks for ``--size`` float64 values (an 8-byte request, the only
thing the recipe leaves out), the server sends ``numpy.arange(0.0, size)``
both ways, and the client checks every value and prints the throughput.

    python3 examples/large_arrays.py --port 25000                          # the server
    python3 examples/large_arrays.py --client --port 25000 --size 50000000
    python3 examples/large_arrays.py --demo
"""
import argparse
import select
import signal
import socket
import struct
import threading
import time

import numpy

import fastnet

REQUEST = struct.Struct("!Q")     # the number of float64 values asked for
# the server allocates what it is asked for: not more than this (2 GiB)
MAX_VALUES = 1 << 28

_stdout_lock = threading.Lock()


def say(*args):
    """print() whole lines: in --demo, servers and clients share stdout as threads."""
    with _stdout_lock:
        print(*args, flush=True)


def _recv_exactly(sock, n):
    buf = bytearray(n)
    fastnet.recv_into(buf, sock)
    return bytes(buf)


def _rate(nbytes, seconds):
    seconds = max(seconds, 1e-9)
    return f"{nbytes / 1e6:.1f} MB in {seconds * 1e3:.1f} ms, {nbytes / seconds / 1e9:.2f} GB/s"


# -- the server ----------------------------------------------------------------------

def handle(c):
    (n,) = REQUEST.unpack(_recv_exactly(c, REQUEST.size))
    if n > MAX_VALUES:
        say(f"refused a request for {n} values (at most {MAX_VALUES})")
        return
    a = numpy.arange(0.0, n)
    fastnet.send_from(a, c)                 # 1: the raw bytes
    with fastnet.Connection(c) as conn:     # 2: the same socket, framed
        conn.send_array(a)
        try:
            conn.recv_bytes()               # wait for the client to close
        except EOFError:
            pass
    say(f"sent {n} float64 values twice")


def serve(s):
    while True:
        c, _ = s.accept()
        try:
            handle(c)
        except (OSError, EOFError) as e:
            say(f"client gone: {e}")
        finally:
            c.close()


# -- the client ----------------------------------------------------------------------

def client(address, n):
    expected = numpy.arange(0.0, n)
    a = numpy.zeros(shape=n, dtype=float)
    b = numpy.zeros(shape=n, dtype=float)
    # touch every page now, so the clocks below time the transfer, not page faults
    a.fill(-1.0)
    b.fill(-1.0)
    with socket.create_connection(address) as c:
        c.sendall(REQUEST.pack(n))
        # start the clock when the first bytes arrive, not while the server fills its array
        select.select([c], [], [])
        t0 = time.perf_counter()
        fastnet.recv_into(a, c)
        dt = time.perf_counter() - t0
        say(f"recv_into:  a[0:5] = {a[0:5]}, a[-1] = {a[-1]}")
        say(f"recv_into:  {_rate(a.nbytes, dt)}, contents equal: {numpy.array_equal(a, expected)}")

        # a frame larger than the array asked for is refused before anything is allocated
        with fastnet.Connection(c, max_message_size=max(b.nbytes, 1 << 16)) as conn:
            t0 = time.perf_counter()
            conn.recv_array(out=b)
            dt = time.perf_counter() - t0
        say(f"recv_array: b[0:5] = {b[0:5]}, b[-1] = {b[-1]}")
        say(f"recv_array: {_rate(b.nbytes, dt)}, contents equal: {numpy.array_equal(b, expected)}")
    return numpy.array_equal(a, expected) and numpy.array_equal(b, expected)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=25000)
    ap.add_argument("--size", type=int, default=10_000_000,
                    help="client: float64 values to receive (default: %(default)s, 80 MB)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--client", action="store_true", help="receive arrays from --host/--port")
    mode.add_argument("--demo", action="store_true", help="run a server and a client in this process")
    args = ap.parse_args()
    if not 1 <= args.size <= MAX_VALUES:
        ap.error(f"--size must be from 1 to {MAX_VALUES}")
    if args.client:
        raise SystemExit(0 if client((args.host, args.port), args.size) else 1)
    s = socket.create_server((args.host, 0 if args.demo else args.port))
    with s:
        if args.demo:
            # a daemon thread: the server ends with the process
            threading.Thread(target=serve, args=(s,), daemon=True).start()
            raise SystemExit(0 if client(s.getsockname()[:2], args.size) else 1)
        signal.signal(signal.SIGTERM, signal.default_int_handler)   # SIGTERM stops like Ctrl-C
        host, port = s.getsockname()[:2]
        say(f"serving on {host}:{port}")
        try:
            serve(s)
        except KeyboardInterrupt:
            pass
    say("stopped")


if __name__ == "__main__":
    main()
