#!/usr/bin/env python3
"""A dispatcher that passes client sockets to worker processes (the Cookbook's recipe 11.11), with fastnet.

The dispatcher accepts TCP clients but serves none of them. It sends each
accepted socket's descriptor to a worker process over an AF_UNIX connection
(``Connection.send_fds``: SCM_RIGHTS ancillary data on a message) and closes
its own copy. The worker turns the descriptor back into a socket and echoes
on it, as in the recipe.

As in the recipe's servermp.py / workermp.py pair, workers connect to the
dispatcher's AF_UNIX address with an authkey and first send their pid, so
they may also be started by hand. Clients go to the workers in turn; a worker
that has gone is dropped. ``fastnet.send_fd(sock, fd)`` / ``fastnet.recv_fd(sock)``
do the same on plain AF_UNIX sockets.

    python3 examples/pass_socket.py --port 15000 --workers 2      # dispatcher + 2 worker processes
    python3 examples/pass_socket.py --worker /tmp/servconn        # one more worker, started by hand
    python3 examples/pass_socket.py --port 15000 --workers 0 --work-address /tmp/servconn
    python3 examples/pass_socket.py --demo
    $ nc localhost 15000
"""
import argparse
import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading

import fastnet

# given to the workers this script starts through the environment, not argv
# (which any local user can read)
AUTHKEY_ENV = "PASS_SOCKET_AUTHKEY"
DEFAULT_AUTHKEY = b'peekaboo'

_stdout_lock = threading.Lock()


def say(*args):
    """print() whole lines: in --demo, servers and clients share stdout as threads."""
    with _stdout_lock:
        print(*args, flush=True)


# -- the worker ----------------------------------------------------------------------

def worker(work_address, authkey):
    pid = os.getpid()
    with fastnet.Client(work_address, authkey=authkey) as serv:
        serv.send(pid)
        while True:
            try:
                data, fds = serv.recv_fds(1)
            except EOFError:
                break         # the dispatcher has gone
            for fd in fds:
                say(f"WORKER {pid}: GOT FD {fd} for {data.decode()}")
                # family and type are read from the descriptor itself
                with socket.socket(fileno=fd) as client:
                    try:
                        while True:
                            msg = client.recv(1024)
                            if not msg:
                                break
                            say(f"WORKER {pid}: RECV {msg!r}")
                            client.sendall(msg)
                    except OSError as e:
                        say(f"WORKER {pid}: {e}")


# -- the dispatcher ------------------------------------------------------------------

class Dispatcher:
    def __init__(self, address, work_address, authkey):
        self.work = fastnet.Listener(work_address, authkey=authkey)
        self.sock = socket.create_server(address, backlog=128)
        self.workers = []           # [(pid, connection)]
        self.turn = itertools.count()
        self.children = []
        # stop() from another thread writes here to wake the select loop
        self._wake_r, self._wake_w = socket.socketpair()

    @property
    def address(self):
        return self.sock.getsockname()[:2]

    def spawn_workers(self, n, authkey):
        """Start n worker processes and wait until each has connected."""
        env = dict(os.environ, **{AUTHKEY_ENV: authkey.hex()})
        for _ in range(n):
            self.children.append(subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--worker", self.work.address], env=env))
        for _ in range(n):
            self.accept_worker()

    def accept_worker(self):
        try:
            conn = self.work.accept()
        except (fastnet.AuthenticationError, fastnet.TimeoutError) as e:
            say(f"SERVER: refused a worker: {e}")
            return
        try:
            pid = conn.recv()
        except (EOFError, OSError):
            conn.close()
            return
        self.workers.append((pid, conn))
        say(f"SERVER: worker {pid} connected")

    def dispatch(self, client, addr):
        with client:
            while self.workers:
                pid, conn = self.workers[next(self.turn) % len(self.workers)]
                try:
                    # a descriptor in flight holds its own reference: closing ours is safe
                    conn.send_fds([client.fileno()], f"{addr[0]}:{addr[1]}".encode())
                except OSError:
                    say(f"SERVER: worker {pid} has gone")
                    self.workers.remove((pid, conn))
                    conn.close()
                    continue
                say(f"SERVER: Got connection from {addr[0]}:{addr[1]}, passed to worker {pid}")
                return
            say(f"SERVER: no worker for {addr[0]}:{addr[1]}: closed")

    def serve_forever(self):
        while True:
            for ready in fastnet.wait([self.sock, self.work, self._wake_r]):
                if ready is self._wake_r:
                    return
                if ready is self.work:
                    self.accept_worker()
                else:
                    self.dispatch(*self.sock.accept())

    def stop(self):
        self._wake_w.send(b"x")

    def close(self):
        # workers see EOF and exit
        for _, conn in self.workers:
            conn.close()
        self.workers = []
        for child in self.children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.sock.close()
        self.work.close()
        self._wake_r.close()
        self._wake_w.close()


# -- a client ------------------------------------------------------------------------

def client(address, messages):
    with socket.create_connection(address, timeout=10) as s:
        for msg in messages:
            s.sendall(msg)
            reply = b""
            while len(reply) < len(msg):
                chunk = s.recv(1024)
                if not chunk:
                    raise EOFError("the server closed the connection")
                reply += chunk
            say(f"client {s.getsockname()[1]}: sent {msg!r}, got back {reply!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=15000)
    ap.add_argument("--workers", type=int, default=2, help="worker processes to start (default: %(default)s)")
    ap.add_argument("--work-address", help="the AF_UNIX path workers connect to (default: a temporary one)")
    ap.add_argument("--worker", metavar="WORK_ADDRESS", help="run as a worker of the dispatcher at WORK_ADDRESS")
    ap.add_argument("--demo", action="store_true", help="run a dispatcher, its workers and two clients")
    args = ap.parse_args()
    key = os.environ.get(AUTHKEY_ENV)
    authkey = bytes.fromhex(key) if key else DEFAULT_AUTHKEY
    if args.worker:
        try:
            worker(args.worker, authkey)
        except KeyboardInterrupt:
            pass     # Ctrl-C reaches the whole process group; the dispatcher reports
        return
    with tempfile.TemporaryDirectory() as tmp:
        work_address = args.work_address or os.path.join(tmp, "servconn")
        port = 0 if args.demo else args.port
        disp = Dispatcher((args.host, port), work_address, authkey)
        try:
            disp.spawn_workers(args.workers, authkey)
            host, port = disp.address
            if args.demo:
                t = threading.Thread(target=disp.serve_forever)
                t.start()
                for i in range(2):
                    client((host, port), [b'Hello\r\n', b'World %d\r\n' % i])
                disp.stop()
                t.join()
                return
            signal.signal(signal.SIGTERM, signal.default_int_handler)   # SIGTERM stops like Ctrl-C
            say(f"SERVER: pid {os.getpid()}, workers connect to {work_address}")
            say(f"serving on {host}:{port}")
            try:
                disp.serve_forever()
            except KeyboardInterrupt:
                pass
        finally:
            disp.close()
    say("stopped")


if __name__ == "__main__":
    main()
