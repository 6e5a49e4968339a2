#!/usr/bin/env python3
"""A UDP Fibonacci server whose slow work runs on the event loop's thread pool (the Cookbook's recipe 11.12).

The recipe builds a ThreadPoolHandler: a ThreadPoolExecutor plus a socket
pair whose readiness wakes the event loop when work finishes, so callbacks
run on the loop. fastnet's EventLoop has that built in:
``loop.run_in_thread(func, *args, callback=cb)`` runs ``func`` on the loop's
worker pool and calls ``cb(future)`` on the loop thread once it is done. The
server is the recipe's UDPFibServer without the plumbing: while a large
fib(n) is computed on the pool, the loop goes on receiving requests and
answers the small ones first.

    python3 examples/eventloop_threadpool.py --port 16000 --workers 16
    python3 examples/eventloop_threadpool.py --client --port 16000 30 5 10
    python3 examples/eventloop_threadpool.py --demo

    >>> from socket import *
    >>> sock = socket(AF_INET, SOCK_DGRAM)
    >>> sock.sendto(b'20', ('localhost', 16000)); sock.recvfrom(8192)
"""
import argparse
import signal
import socket
import threading

import fastnet

# fib(35) already takes seconds: a larger n would only tie up a worker
MAX_N = 35

_stdout_lock = threading.Lock()


def say(*args):
    """print() whole lines: in --demo, servers and clients share stdout as threads."""
    with _stdout_lock:
        print(*args, flush=True)


# A really bad Fibonacci implementation
def fib(n):
    if n < 2:
        return 1
    else:
        return fib(n - 1) + fib(n - 2)


def work(n):
    """Runs on a pool thread: the result and the thread it was computed on."""
    return fib(n), threading.current_thread().name


class UDPServer(fastnet.EventHandler):
    def __init__(self, address):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def fileno(self):
        return self.sock.fileno()

    def wants_to_receive(self):
        return True


class UDPFibServer(UDPServer):
    def handle_receive(self):
        try:
            msg, addr = self.sock.recvfrom(128)
        except (BlockingIOError, InterruptedError):
            return
        try:
            n = int(msg)
            if not 0 <= n <= MAX_N:
                raise ValueError
        except ValueError:
            self.sock.sendto(f"error: send an integer from 0 to {MAX_N}".encode("ascii"), addr)
            return
        self.loop.run_in_thread(work, n, callback=lambda fut: self.respond(n, fut, addr))

    def respond(self, n, fut, addr):
        # back on the loop thread
        result, thread = fut.result()
        say(f"server: fib({n}) computed on thread {thread}, answered on thread "
            f"{threading.current_thread().name}")
        self.sock.sendto(f"fib({n}) = {result}".encode("ascii"), addr)


def client(address, numbers):
    """Send every request at once, then print the answers in the order they arrive."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(30)
        for x in numbers:
            sock.sendto(str(x).encode('ascii'), address)
        for _ in numbers:
            resp, _ = sock.recvfrom(8192)
            say(f"client: got {resp.decode('ascii')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=16000)
    ap.add_argument("--workers", type=int, default=16, help="threads in the loop's pool")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--client", action="store_true", help="send the numbers to --host/--port")
    mode.add_argument("--demo", action="store_true", help="run a server and a client in this process")
    ap.add_argument("numbers", nargs="*", type=int, default=[30, 5, 10],
                    help="client: the n of each fib(n) asked for (default: 30 5 10)")
    args = ap.parse_args()
    if args.client:
        client((args.host, args.port), args.numbers)
        return
    with fastnet.EventLoop(max_workers=args.workers) as loop:
        server = UDPFibServer((args.host, 0 if args.demo else args.port))
        loop.add_handler(server)
        if args.demo:
            t = threading.Thread(target=loop.run_forever, name="event-loop")
            t.start()
            try:
                client(server.sock.getsockname(), args.numbers)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                t.join()
        else:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, loop.stop)
            host, port = server.sock.getsockname()
            say(f"serving on {host}:{port}")
            loop.run_forever()
            say("stopped")
        loop.remove_handler(server)
        server.sock.close()


if __name__ == "__main__":
    main()
