"""fastnet.server: every concurrency mode, handler styles, limits, handshake, shutdown.

Servers run in this process (``start()``); clients that must not share this
process with forked children run in a client subprocess, because a child
forked here would inherit their sockets and keep those connections open.
Every wait has a deadline and nothing asserts on timing.
"""
import json
import multiprocessing.connection
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid

import pytest

import fastnet
import fastnet.loop
from fastnet.server import (
    CONCURRENCY,
    BaseRequestHandler,
    DatagramRequestHandler,
    MessageHandler,
    StreamRequestHandler,
    TCPServer,
    ThreadingTCPServer,
    UDPServer,
    UnixDatagramServer,
    UnixServer,
)
from rpcutil import readline, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 30.0   # generous deadline for what should take milliseconds


# -- handlers -----------------------------------------------------------------------

class StreamEcho(StreamRequestHandler):
    """The Cookbook's echo, with the serving pid in front of each line."""

    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"%d " % os.getpid() + line)


class RawEcho(BaseRequestHandler):
    """The Cookbook's first echo handler: recv/send on the bare socket."""

    def handle(self):
        while True:
            msg = self.request.recv(8192)
            if not msg:
                break
            self.request.sendall(msg)


class FramedEcho(MessageHandler):
    def message_received(self, data):
        self.reply(b"%d:" % os.getpid() + data)


class ConnectionEcho(BaseRequestHandler):
    """A blocking handler speaking frames on the socket the handshake handed over."""

    def handle(self):
        conn = fastnet.Connection(self.request)
        while True:
            try:
                data = conn.recv_bytes()
            except EOFError:
                break
            conn.send_bytes(b"%d:" % os.getpid() + data)


class TimeHandler(BaseRequestHandler):
    """The Cookbook's UDP time server handler."""

    def handle(self):
        msg, sock = self.request
        sock.sendto(time.ctime().encode("ascii"), self.client_address)


class DatagramEcho(DatagramRequestHandler):
    def handle(self):
        self.wfile.write(b"%d:" % os.getpid() + self.rfile.read())


HANDLERS = {"stream": StreamEcho, "framed": FramedEcho}


# -- helpers --------------------------------------------------------------------------

CLIENT = r'''
import json, os, socket, sys, threading
sys.path.insert(0, sys.argv[1])
import fastnet

cfg = json.loads(sys.argv[2])
addr = cfg["address"]
addr = tuple(addr) if isinstance(addr, list) else addr
kind, n, m = cfg["kind"], cfg["clients"], cfg["messages"]
key = bytes.fromhex(cfg["authkey"]) if cfg.get("authkey") else None
together = threading.Barrier(n + 1, timeout=60) if cfg.get("together") else None
go = threading.Event()
results = [None] * n
first_pid = [None] * n


def connect():
    if kind == "framed":
        return fastnet.Client(addr, authkey=key, timeout=60)
    if isinstance(addr, str):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(60)
        s.connect(addr)
        return s
    return socket.create_connection(addr, timeout=60)


def roundtrip(c, f, i, j):
    if kind == "framed":
        payload = b"client %d message %d " % (i, j) + os.urandom(j % 13)
        c.send_bytes(payload)
        if not c.poll(60):
            raise TimeoutError("no reply")
        pid, _, rest = c.recv_bytes().partition(b":")
    else:
        payload = b"client %d message %d %s\n" % (i, j, os.urandom(4).hex().encode())
        f.write(payload)
        f.flush()
        line = f.readline()
        if not line:
            raise EOFError("connection closed")
        pid, _, rest = line.partition(b" ")
    if rest != payload:
        raise AssertionError("reply %r to %r" % (rest, payload))
    return int(pid)


def one(i):
    pid = None
    done = 0
    c = None
    try:
        c = connect()
        f = c.makefile("rwb") if kind != "framed" else None
        pid = first_pid[i] = roundtrip(c, f, i, 0)
        done = 1
        if together is not None:
            together.wait()
        if cfg.get("hold"):
            go.wait(60)
        for j in range(1, m):
            p = roundtrip(c, f, i, j)
            if p != pid:
                raise AssertionError("one connection, two pids")
            done += 1
        results[i] = {"pid": pid, "ok": True, "done": done}
    except BaseException as e:
        results[i] = {"pid": pid, "ok": False, "done": done, "error": repr(e)}
        if together is not None and done == 0:
            together.abort()
    finally:
        if c is not None:
            c.close()


threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
for t in threads:
    t.start()
if together is not None:
    try:
        together.wait()
    except threading.BrokenBarrierError:
        pass
if cfg.get("hold"):
    print(json.dumps({"held": first_pid}), flush=True)
    sys.stdin.readline()
    go.set()
for t in threads:
    t.join(120)
print(json.dumps(results), flush=True)
'''


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def spawn_clients(address, kind, clients, messages, **cfg):
    cfg.update(address=address, kind=kind, clients=clients, messages=messages)
    if isinstance(cfg.get("authkey"), bytes):
        cfg["authkey"] = cfg["authkey"].hex()
    return subprocess.Popen([sys.executable, "-c", CLIENT, ROOT, json.dumps(cfg)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env())


def finish(proc, stdin_data=None):
    try:
        out, err = proc.communicate(stdin_data, timeout=WAIT * 2)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"client process hung: {err.decode()[-2000:]}")
    assert proc.returncode == 0, err.decode()[-2000:]
    return json.loads(out.decode().strip().splitlines()[-1])


def run_clients(address, kind, clients, messages, **cfg):
    return finish(spawn_clients(address, kind, clients, messages, **cfg))


def check_all_ok(results, messages):
    bad = [r for r in results if not (r and r["ok"] and r["done"] == messages)]
    assert not bad, bad


# -- the public names ---------------------------------------------------------------

def test_exports():
    import fastnet.server as srvmod
    for name in ("TCPServer", "UDPServer", "UnixServer", "UnixDatagramServer", "BaseRequestHandler",
                 "StreamRequestHandler", "DatagramRequestHandler", "MessageHandler"):
        assert getattr(fastnet, name) is getattr(srvmod, name)
        assert name in fastnet.__all__
    assert issubclass(StreamRequestHandler, socketserver.StreamRequestHandler)
    assert CONCURRENCY == ("loop", "thread", "fork", "prefork")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="concurrency"):
        TCPServer(("127.0.0.1", 0), StreamEcho, concurrency="greenlet")
    with pytest.raises(ValueError, match="prefork"):
        UDPServer(("127.0.0.1", 0), TimeHandler, concurrency="prefork")
    with pytest.raises(TypeError, match="stream server"):
        UDPServer(("127.0.0.1", 0), FramedEcho)
    with pytest.raises(ValueError, match="AF_UNIX"):
        UnixServer("\0fastnet-bad", StreamEcho, allow=["127.0.0.0/8"])
    with pytest.raises(ValueError, match="UnixServer"):
        TCPServer("\0fastnet-bad", StreamEcho)
    with pytest.raises(TypeError):
        TCPServer(("127.0.0.1", 0), FramedEcho, authkey="text")


# -- every concurrency mode, both handler styles ---------------------------------------

@pytest.mark.parametrize("kind", ["stream", "framed"])
@pytest.mark.parametrize("mode", CONCURRENCY)
def test_echo_many_clients(serve, mode, kind):
    nclients, nmsgs = 12, 20
    srv = serve(TCPServer, ("127.0.0.1", 0), HANDLERS[kind], concurrency=mode, workers=3)
    results = run_clients(srv.address, kind, nclients, nmsgs)
    check_all_ok(results, nmsgs)
    pids = {r["pid"] for r in results}
    if mode in ("loop", "thread"):
        assert pids == {os.getpid()}
    else:
        assert os.getpid() not in pids
    if mode == "fork":
        assert len(pids) == nclients          # a process per connection
    if mode == "prefork":
        assert pids <= set(srv.worker_pids)
    srv.shutdown(timeout=WAIT)
    st = srv.stats()
    assert st["connections_total"] == nclients and st["connections_open"] == 0
    assert st["connections_refused"] == 0
    if kind == "framed":
        assert st["messages_in"] == st["messages_out"] == nclients * nmsgs
        assert st["bytes_out"] > st["bytes_in"] > 0
    assert srv.worker_pids == []


@pytest.mark.parametrize("backend", fastnet.loop.BACKENDS)
def test_every_loop_backend(serve, backend):
    srv = serve(TCPServer, ("127.0.0.1", 0), FramedEcho, backend=backend, authkey=b"k")
    for _ in range(3):
        with fastnet.Client(srv.address, authkey=b"k", timeout=WAIT) as c:
            for i in range(5):
                c.send_bytes(b"%d" % i)
                assert c.poll(WAIT) and c.recv_bytes() == b"%d:%d" % (os.getpid(), i)


def test_stdlib_handler_classes_and_threading_names(serve):
    class Upper(socketserver.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                self.wfile.write(line.upper())

    srv = serve(ThreadingTCPServer, ("127.0.0.1", 0), Upper)
    assert srv.concurrency == "thread"
    with socket.create_connection(srv.address, timeout=WAIT) as s:
        f = s.makefile("rwb")
        for word in (b"ab\n", b"cd\n"):
            f.write(word)
            f.flush()
            assert f.readline() == word.upper()


def test_raw_socket_echo_loop_serves_clients_in_turn(serve):
    srv = serve(TCPServer, ("127.0.0.1", 0), RawEcho)
    socks = [socket.create_connection(srv.address, timeout=WAIT) for _ in range(3)]
    try:
        for i, s in enumerate(socks):
            s.sendall(b"hello %d" % i)
        # serial like socketserver.TCPServer: the first is answered, the next after it closes
        assert socks[0].recv(100) == b"hello 0"
        for i, s in enumerate(socks[1:], 1):
            socks[i - 1].close()
            assert s.recv(100) == b"hello %d" % i
    finally:
        for s in socks:
            s.close()


def test_thread_mode_is_a_bounded_pool(serve):
    # a blocking handler holds its thread for the whole connection: with two
    # threads, the other six clients wait their turn and are all served
    srv = serve(TCPServer, ("127.0.0.1", 0), StreamEcho, concurrency="thread", workers=2)
    results = run_clients(srv.address, "stream", 8, 5)
    check_all_ok(results, 5)
    assert len(srv._engine.pool.threads) == 2


# -- prefork ------------------------------------------------------------------------

def test_prefork_workers_are_processes_that_share_the_load(serve):
    srv = serve(TCPServer, ("127.0.0.1", 0), FramedEcho, concurrency="prefork", workers=2)
    workers = set(srv.worker_pids)
    assert len(workers) == 2 and os.getpid() not in workers
    results = run_clients(srv.address, "framed", 10, 10, together=True)
    check_all_ok(results, 10)
    per_worker = {pid: sum(1 for r in results if r["pid"] == pid) for pid in workers}
    assert {r["pid"] for r in results} == workers
    assert all(n >= 1 for n in per_worker.values()), per_worker
    # least-loaded: ten connections held at once split evenly
    assert sorted(per_worker.values()) == [5, 5], per_worker


@pytest.mark.parametrize("kind", ["stream", "framed"])
def test_prefork_worker_killed_midrun_is_replaced(serve, kind):
    srv = serve(TCPServer, ("127.0.0.1", 0), HANDLERS[kind], concurrency="prefork", workers=2)
    first = set(srv.worker_pids)
    proc = spawn_clients(srv.address, kind, 6, 5, together=True, hold=True)
    try:
        held = json.loads(readline(proc))["held"]
        assert set(held) == first, held
        victim = held[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: srv.stats()["worker_restarts"] == 1 and len(srv.worker_pids) == 2)
        now = set(srv.worker_pids)
        assert victim not in now and len(now - first) == 1
        results = finish(proc, b"go\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
    for r in results:
        if r["pid"] == victim:
            assert not r["ok"] and r["done"] == 1, r     # its connection died with it
        else:
            assert r["ok"] and r["done"] == 5, r
    # its in-flight connections were written off, and the server goes on
    assert wait_for(lambda: srv.stats()["connections_open"] == 0)
    results = run_clients(srv.address, kind, 6, 5, together=True)
    check_all_ok(results, 5)
    assert {r["pid"] for r in results} == now


def test_prefork_worker_started_gets_a_slot_that_its_replacement_keeps(serve, tmp_path):
    log = tmp_path / "slots"

    class SlotServer(TCPServer):
        def worker_started(self, slot):
            # runs in the worker, before it serves
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {slot}\n")

    def slots():
        return dict(tuple(map(int, line.split())) for line in log.read_text().splitlines()) \
            if log.exists() else {}

    srv = serve(SlotServer, ("127.0.0.1", 0), FramedEcho, concurrency="prefork", workers=2)
    assert wait_for(lambda: len(slots()) == 2)
    first = slots()
    assert set(first) == set(srv.worker_pids) and sorted(first.values()) == [0, 1]
    victim = srv.worker_pids[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: len(slots()) == 3)
    (new_pid, new_slot), = [(p, k) for p, k in slots().items() if p not in first]
    assert new_slot == first[victim]
    # the worker may run its hook before the server has heard its pid from the fork server
    assert wait_for(lambda: new_pid in srv.worker_pids)
    check_all_ok(run_clients(srv.address, "framed", 4, 3, together=True), 3)


def test_prefork_with_authkey_and_blocking_handler(serve):
    srv = serve(TCPServer, ("127.0.0.1", 0), ConnectionEcho, concurrency="prefork", workers=2,
                authkey=b"secret")
    results = run_clients(srv.address, "framed", 6, 8, authkey=b"secret", together=True)
    check_all_ok(results, 8)
    assert {r["pid"] for r in results} == set(srv.worker_pids)


def test_fork_children_are_reaped_and_bounded(serve):
    srv = serve(TCPServer, ("127.0.0.1", 0), StreamEcho, concurrency="fork", workers=2)
    results = run_clients(srv.address, "stream", 6, 5)
    check_all_ok(results, 5)
    assert wait_for(lambda: srv.stats()["children"] == 0)
    for r in results:
        assert not os.path.exists(f"/proc/{r['pid']}")     # exited and already reaped


# -- the allow-list -----------------------------------------------------------------

def _from(ip, address):
    s = socket.socket()
    s.settimeout(WAIT)
    s.bind((ip, 0))
    s.connect(address)
    return s


def _closed_by_peer(s):
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("mode", ["loop", "thread", "prefork"])
def test_allow_list_refuses_other_addresses(serve, mode):
    srv = serve(TCPServer, ("127.0.0.1", 0), StreamEcho, concurrency=mode, workers=2,
                allow=["127.0.0.1/32"])
    refused = _from("127.0.0.2", srv.address)
    try:
        refused.sendall(b"let me in\n")
        assert _closed_by_peer(refused)
    finally:
        refused.close()
    assert srv.stats()["connections_refused"] == 1
    with _from("127.0.0.1", srv.address) as ok:
        f = ok.makefile("rwb")
        f.write(b"hello\n")
        f.flush()
        assert f.readline().split(b" ", 1)[1] == b"hello\n"
    st = srv.stats()
    assert st["connections_refused"] == 1 and st["connections_total"] == 1


def test_allow_list_networks(serve):
    srv = serve(TCPServer, ("127.0.0.1", 0), StreamEcho, allow=["127.0.0.0/8", "::1/128"])
    with _from("127.0.0.2", srv.address) as s:
        f = s.makefile("rwb")
        f.write(b"x\n")
        f.flush()
        assert f.readline().endswith(b" x\n")
    assert srv._allowed(("::1", 5, 0, 0)) and srv._allowed(("::ffff:127.0.0.9", 5, 0, 0))
    assert not srv._allowed(("10.0.0.1", 5)) and not srv._allowed(("::2", 5, 0, 0))
    assert srv.stats()["connections_refused"] == 0


def test_ipv6(serve):
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    srv = serve(TCPServer, ("::1", 0), FramedEcho, allow=["::1/128"])
    assert srv.address[0] == "::1"
    with fastnet.Client(srv.address[:2], timeout=WAIT) as c:
        c.send_bytes(b"six")
        assert c.poll(WAIT) and c.recv_bytes().endswith(b":six")


def test_verify_request_hook_like_the_restricted_server(serve):
    class Restricted(TCPServer):
        def verify_request(self, request, client_address):
            return client_address[0] == "127.0.0.1"

    srv = serve(Restricted, ("127.0.0.1", 0), StreamEcho)
    with _from("127.0.0.3", srv.address) as s:
        assert _closed_by_peer(s)
    assert srv.stats()["connections_refused"] == 1


# -- limits -----------------------------------------------------------------------

def test_max_connections_excess_waits_in_the_backlog(serve):
    srv = serve(TCPServer, ("127.0.0.1", 0), FramedEcho, max_connections=2)
    c1 = fastnet.Client(srv.address, timeout=WAIT)
    c2 = fastnet.Client(srv.address, timeout=WAIT)
    c3 = None
    try:
        for c in (c1, c2):
            c.send_bytes(b"hi")
            assert c.poll(WAIT) and c.recv_bytes().endswith(b":hi")
        c3 = fastnet.Client(srv.address, timeout=WAIT)   # completes in the kernel's backlog
        c3.send_bytes(b"waiting")
        # a round trip on c1 after c3 connected: had the server accepted, it would have by now
        c1.send_bytes(b"again")
        assert c1.poll(WAIT) and c1.recv_bytes().endswith(b":again")
        st = srv.stats()
        assert st["connections_open"] == 2 and st["connections_total"] == 2
        assert not c3.poll(0)
        c1.close()
        assert c3.poll(WAIT) and c3.recv_bytes().endswith(b":waiting")
        assert srv.stats()["connections_total"] == 3
    finally:
        for c in (c1, c2, c3):
            if c is not None:
                c.close()


def test_max_connections_refuse_closes_the_excess(serve):
    srv = serve(TCPServer, ("127.0.0.1", 0), FramedEcho, max_connections=1, overflow="refuse")
    with fastnet.Client(srv.address, timeout=WAIT) as c1:
        c1.send_bytes(b"one")
        assert c1.poll(WAIT) and c1.recv_bytes().endswith(b":one")
        with socket.create_connection(srv.address, timeout=WAIT) as s:
            assert _closed_by_peer(s)
        assert srv.stats()["connections_refused"] == 1
        c1.send_bytes(b"still")
        assert c1.poll(WAIT) and c1.recv_bytes().endswith(b":still")
    assert wait_for(lambda: srv.stats()["connections_open"] == 0)
    with fastnet.Client(srv.address, timeout=WAIT) as c:   # a slot again once c1 is gone
        c.send_bytes(b"two")
        assert c.poll(WAIT) and c.recv_bytes().endswith(b":two")


def test_max_message_size_closes_only_that_connection(serve):
    srv = serve(TCPServer, ("127.0.0.1", 0), FramedEcho, max_message_size=1024)
    with fastnet.Client(srv.address, timeout=WAIT) as big, fastnet.Client(srv.address, timeout=WAIT) as ok:
        big.send_bytes(b"x" * 2048)
        assert big.poll(WAIT)
        with pytest.raises(EOFError):
            big.recv_bytes()
        ok.send_bytes(b"y" * 1024)
        assert ok.poll(WAIT) and ok.recv_bytes().endswith(b":" + b"y" * 1024)


@pytest.mark.parametrize("kind", ["stream", "framed"])
def test_idle_connections_are_closed(serve, kind):
    srv = serve(TCPServer, ("127.0.0.1", 0), HANDLERS[kind], idle_timeout=0.3, concurrency="thread")
    with socket.create_connection(srv.address, timeout=WAIT) as s:
        if kind == "framed":
            s.sendall(b"\x00\x00\x00\x02hi")
            assert s.recv(100).endswith(b":hi")
        else:
            s.sendall(b"hi\n")
            assert s.recv(100).endswith(b" hi\n")
        assert _closed_by_peer(s)      # then silence: the server hangs up
    assert wait_for(lambda: srv.stats()["connections_open"] == 0)
    if kind == "framed":
        assert srv.stats()["idle_closed"] == 1


def test_handler_errors_close_the_connection_not_the_server(serve):
    class Picky(MessageHandler):
        def message_received(self, data):
            if data == b"boom":
                raise ValueError("boom")
            self.reply(data)

    srv = serve(TCPServer, ("127.0.0.1", 0), Picky)
    with fastnet.Client(srv.address, timeout=WAIT) as c:
        c.send_bytes(b"boom")
        assert c.poll(WAIT)
        with pytest.raises(EOFError):
            c.recv_bytes()
    with fastnet.Client(srv.address, timeout=WAIT) as c:
        c.send_bytes(b"fine")
        assert c.poll(WAIT) and c.recv_bytes() == b"fine"


@pytest.mark.parametrize("kind", ["stream", "framed"])
def test_pool_threads_survive_systemexit_and_keyboardinterrupt(kind, monkeypatch):
    # more exiting handlers than pool threads: each thread reports its
    # exception as a dying thread would (threading.excepthook), then serves on
    died = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_type))
    exits = {b"exit": SystemExit, b"interrupt": KeyboardInterrupt}

    class Exiting(StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline().strip()
            if line in exits:
                raise exits[line]("from the handler")
            self.wfile.write(line + b"\n")

    class FramedExiting(MessageHandler):
        def message_received(self, data):
            if data in exits:
                raise exits[data]("from the handler")
            self.reply(data)

    srv = TCPServer(("127.0.0.1", 0), Exiting if kind == "stream" else FramedExiting,
                    concurrency="thread", workers=2, shutdown_timeout=600)
    srv.start()
    try:
        for i, word in enumerate([b"exit", b"interrupt"] * 3):
            if kind == "stream":
                with socket.create_connection(srv.address, timeout=WAIT) as s:
                    s.sendall(word + b"\n")
                    assert s.recv(10) == b""        # the handler ended, the connection with it
            else:
                with fastnet.Client(srv.address, timeout=WAIT) as c:
                    c.send_bytes(word)
                    assert c.poll(WAIT)
                    with pytest.raises(EOFError):
                        c.recv_bytes()
            # the peer may see the close before the thread reports: wait for
            # each report, so the next word cannot overtake it
            assert wait_for(lambda: len(died) == i + 1)
        assert wait_for(lambda: len(died) == 6)
        assert died == [SystemExit, KeyboardInterrupt] * 3
        pool = srv._engine.pool
        assert len(pool.threads) == 2 and all(t.is_alive() for t in pool.threads)
        for _ in range(3):
            if kind == "stream":
                with socket.create_connection(srv.address, timeout=WAIT) as s:
                    s.sendall(b"still here\n")
                    assert s.makefile("rb").readline() == b"still here\n"
            else:
                with fastnet.Client(srv.address, timeout=WAIT) as c:
                    c.send_bytes(b"still here")
                    assert c.poll(WAIT) and c.recv_bytes() == b"still here"
        assert wait_for(lambda: srv.stats()["connections_open"] == 0)
    finally:
        # nothing is left open: shutdown() returns without waiting out its 600 s
        stopper = threading.Thread(target=srv.shutdown, daemon=True)
        stopper.start()
        stopper.join(WAIT)
        assert not stopper.is_alive()
        srv.server_close()


# -- the authkey handshake --------------------------------------------------------

@pytest.mark.parametrize("mode", ["loop", "thread"])
def test_silent_client_does_not_block_a_good_one(serve, mode):
    srv = serve(TCPServer, ("127.0.0.1", 0), FramedEcho, concurrency=mode, authkey=b"secret",
                handshake_timeout=1.0)
    silent = socket.create_connection(srv.address, timeout=WAIT)
    try:
        assert silent.recv(4)               # the challenge came; we say nothing
        with fastnet.Client(srv.address, authkey=b"secret", timeout=WAIT) as good:
            good.send_bytes(b"served")
            assert good.poll(WAIT) and good.recv_bytes().endswith(b":served")
            assert srv.stats()["connections_open"] == 2     # the silent one is still pending
        # the silent one is dropped once its handshake time is up
        silent.settimeout(WAIT)
        while True:
            try:
                if not silent.recv(4096):
                    break
            except ConnectionResetError:
                break
    finally:
        silent.close()
    assert wait_for(lambda: srv.stats()["handshake_failures"] == 1)


def test_wrong_key_is_refused_and_counted(serve):
    srv = serve(TCPServer, ("127.0.0.1", 0), FramedEcho, authkey=b"secret")
    with pytest.raises(fastnet.AuthenticationError):
        fastnet.Client(srv.address, authkey=b"wrong", timeout=WAIT)
    with pytest.raises(multiprocessing.AuthenticationError):
        multiprocessing.connection.Client(srv.address, authkey=b"wrong")
    assert wait_for(lambda: srv.stats()["handshake_failures"] == 2)
    with fastnet.Client(srv.address, authkey=b"secret", timeout=WAIT) as c:
        c.send_bytes(b"ok")
        assert c.poll(WAIT) and c.recv_bytes().endswith(b":ok")


def test_garbage_handshake_is_refused(serve):
    srv = serve(TCPServer, ("127.0.0.1", 0), FramedEcho, authkey=b"secret")
    with socket.create_connection(srv.address, timeout=WAIT) as s:
        s.sendall(b"\x7f\xff\xff\xff" + b"x" * 100)     # claims 2 GiB
        while True:
            try:
                if not s.recv(4096):
                    break
            except ConnectionResetError:
                break
    assert wait_for(lambda: srv.stats()["handshake_failures"] == 1)


def test_stdlib_client_talks_to_an_authenticated_server(serve):
    srv = serve(TCPServer, ("127.0.0.1", 0), FramedEcho, authkey=b"secret")
    with multiprocessing.connection.Client(srv.address, authkey=b"secret") as c:
        for i in range(5):
            c.send_bytes(b"stdlib %d" % i)
            assert c.recv_bytes() == b"%d:stdlib %d" % (os.getpid(), i)
        c.send({"pickled": [1, 2]})            # pickles are bytes to the handler
        pid, _, rest = c.recv_bytes().partition(b":")
        assert __import__("pickle").loads(rest) == {"pickled": [1, 2]}


def test_handshake_hands_a_clean_socket_to_a_blocking_handler(serve):
    # the client's first message follows its last handshake frame at once;
    # none of it may be swallowed by the handshake
    srv = serve(TCPServer, ("127.0.0.1", 0), ConnectionEcho, concurrency="thread", authkey=b"k")
    for _ in range(3):
        with fastnet.Client(srv.address, authkey=b"k", timeout=WAIT) as c:
            c.send_many([b"a", b"b", b"c"])
            assert c.poll(WAIT)
            assert [c.recv_bytes() for _ in range(3)] == [b"%d:%s" % (os.getpid(), x) for x in (b"a", b"b", b"c")]
    with multiprocessing.connection.Client(srv.address, authkey=b"k") as c:
        for x in (b"a", b"b", b"c"):
            c.send_bytes(x)
        assert [c.recv_bytes() for _ in range(3)] == [b"%d:%s" % (os.getpid(), x) for x in (b"a", b"b", b"c")]


# -- shutdown -----------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["loop", "thread"])
def test_graceful_shutdown_drains_queued_replies(mode):
    n, size = 50, 16384
    seen = threading.Event()
    queued = []

    class Big(MessageHandler):
        count = 0

        def message_received(self, data):
            self.reply(data * (size // len(data)))
            Big.count += 1
            if Big.count == n:
                if self.transport is not None:
                    queued.append(self.transport.get_write_buffer_size())
                seen.set()

    class SmallBuffers(TCPServer):
        def verify_request(self, request, client_address):
            # small kernel buffers: most of the replies wait in the server's queue
            request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            return True

    srv = SmallBuffers(("127.0.0.1", 0), Big, concurrency=mode).start()
    c = socket.socket()
    try:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.settimeout(WAIT)
        c.connect(srv.address)
        c.sendall(b"".join(b"\x00\x00\x00\x04%04d" % i for i in range(n)))
        assert seen.wait(WAIT)
        if mode == "loop":
            assert queued[0] > 0             # the test is only meaningful with replies queued
        stopper = threading.Thread(target=srv.shutdown, kwargs={"timeout": WAIT})
        stopper.start()
        f = c.makefile("rb")
        for i in range(n):
            hdr = f.read(4)
            assert int.from_bytes(hdr, "big") == size, (i, hdr)
            assert f.read(size) == (b"%04d" % i) * (size // 4)
        assert f.read(1) == b""             # then the server closes
        stopper.join(WAIT)
        assert not stopper.is_alive()
    finally:
        c.close()
        srv.shutdown(timeout=1)
    st = srv.stats()
    assert st["messages_out"] == n and st["connections_open"] == 0
    with pytest.raises(OSError):
        socket.create_connection(srv.address, timeout=WAIT)   # no longer listening


def test_shutdown_stops_blocking_handlers_and_joins(serve):
    srv = serve(TCPServer, ("127.0.0.1", 0), StreamEcho, concurrency="thread", idle_timeout=None)
    s = socket.create_connection(srv.address, timeout=WAIT)
    try:
        s.sendall(b"one\n")
        assert s.recv(100).endswith(b" one\n")
        srv.shutdown(timeout=WAIT)            # the handler sits in a read: it sees end of file
        assert _closed_by_peer(s)
        assert all(not t.is_alive() for t in srv._engine.pool.threads)
    finally:
        s.close()


@pytest.mark.parametrize("kind", ["stream", "framed"])
@pytest.mark.parametrize("mode", ["fork", "prefork"])
def test_shutdown_ends_child_processes(serve, mode, kind):
    srv = serve(TCPServer, ("127.0.0.1", 0), HANDLERS[kind], concurrency=mode, workers=2,
                idle_timeout=None)
    proc = spawn_clients(srv.address, kind, 2, 3, together=True, hold=True)
    try:
        held = json.loads(readline(proc))["held"]
        srv.shutdown(timeout=WAIT)
        for pid in set(held):
            assert not os.path.exists(f"/proc/{pid}")    # gone and reaped
        assert srv.worker_pids == []
        results = finish(proc, b"go\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
    assert all(r["done"] >= 1 for r in results)


def test_context_manager_and_shutdown_before_serving():
    with TCPServer(("127.0.0.1", 0), StreamEcho) as srv:
        addr = srv.address
    assert srv.socket.fileno() == -1
    srv = TCPServer(("127.0.0.1", 0), StreamEcho)
    srv.shutdown()                      # never served: returns, closes
    with pytest.raises(RuntimeError):
        srv.serve_forever()
    assert addr[1] > 0
    with TCPServer(("127.0.0.1", 0), FramedEcho) as srv:
        srv.start()
        with fastnet.Client(srv.address, timeout=WAIT) as c:
            c.send_bytes(b"x")
            assert c.poll(WAIT)


# -- UDP ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["loop", "thread", "fork"])
def test_udp_time_and_echo(serve, mode):
    tsrv = serve(UDPServer, ("127.0.0.1", 0), TimeHandler, concurrency=mode)
    esrv = serve(UDPServer, ("127.0.0.1", 0), DatagramEcho, concurrency=mode)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(WAIT)
        s.sendto(b"", tsrv.address)
        msg, addr = s.recvfrom(8192)
        assert addr == tsrv.address
        time.strptime(msg.decode("ascii"))          # a ctime() string
        pids = set()
        for i in range(20):
            s.sendto(b"datagram %d" % i, esrv.address)
            pid, _, rest = s.recvfrom(8192)[0].partition(b":")
            assert rest == b"datagram %d" % i
            pids.add(int(pid))
    assert (pids == {os.getpid()}) == (mode != "fork")
    st = esrv.stats()
    assert st["messages_in"] == 20 and st["connections_total"] == 20
    if mode != "fork":
        assert st["messages_out"] == 20


def test_udp_allow_list(serve):
    srv = serve(UDPServer, ("127.0.0.1", 0), DatagramEcho, allow=["127.0.0.1/32"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as bad, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as good:
        bad.bind(("127.0.0.2", 0))
        bad.sendto(b"refused", srv.address)
        good.settimeout(WAIT)
        good.sendto(b"allowed", srv.address)
        assert good.recvfrom(100)[0].endswith(b":allowed")
    assert srv.stats()["connections_refused"] == 1


# -- AF_UNIX --------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["path", "abstract"])
def test_unix_server(serve, tmp_path, where):
    address = str(tmp_path / "echo.sock") if where == "path" else f"\0fastnet-test-{uuid.uuid4().hex}"
    srv = serve(UnixServer, address, FramedEcho)
    assert srv.address == address
    with fastnet.Client(address, timeout=WAIT) as c:
        c.send_bytes(b"over unix")
        assert c.poll(WAIT) and c.recv_bytes().endswith(b":over unix")
    ssrv = serve(UnixServer, address + "-stream", StreamEcho, concurrency="thread")
    results = run_clients(ssrv.address, "stream", 4, 5)
    check_all_ok(results, 5)
    srv.shutdown()
    if where == "path":
        assert not os.path.exists(address)     # the path is removed on close


def test_unix_datagram_server(serve, tmp_path):
    address = f"\0fastnet-dgram-{uuid.uuid4().hex}"
    srv = serve(UnixDatagramServer, address, DatagramEcho)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(tmp_path / "client.sock"))
        s.settimeout(WAIT)
        s.sendto(b"hello", address)
        assert s.recv(100).endswith(b":hello")


def test_prefork_on_unix_socket(serve, tmp_path):
    srv = serve(UnixServer, str(tmp_path / "pre.sock"), FramedEcho, concurrency="prefork", workers=2)
    results = run_clients(srv.address, "framed", 4, 5, together=True)
    check_all_ok(results, 5)
    assert {r["pid"] for r in results} == set(srv.worker_pids)


# -- examples ----------------------------------------------------------------------

def _example(name, *args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "examples", name), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())


def _listening(proc):
    line = readline(proc)
    assert "serving on" in line, line
    host, port = line.rsplit(" ", 1)[1].strip().rsplit(":", 1)
    return host, int(port)


def _stop(proc, sig=signal.SIGINT):
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("example did not stop")
    assert proc.returncode == 0, err.decode()[-2000:]


@pytest.mark.parametrize("script", ["server_tcp_echo.py", "server_threaded_echo.py", "server_prefork_echo.py"])
def test_example_echo_servers(script):
    proc = _example(script, "--port", "0")
    try:
        addr = _listening(proc)
        for i in range(3):
            with socket.create_connection(addr, timeout=WAIT) as s:
                f = s.makefile("rwb")
                for j in range(3):
                    f.write(b"line %d %d\n" % (i, j))
                    f.flush()
                    assert f.readline() == b"line %d %d\n" % (i, j)
        _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_example_udp_time_server():
    proc = _example("server_udp_time.py", "--port", "0")
    try:
        addr = _listening(proc)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(WAIT)
            s.sendto(b"", addr)
            time.strptime(s.recvfrom(8192)[0].decode("ascii"))
        _stop(proc, signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_example_restricted_server():
    proc = _example("server_restricted.py", "--host", "127.0.0.1", "--port", "0", "--allow", "127.0.0.1/32")
    try:
        addr = _listening(proc)
        with _from("127.0.0.1", addr) as s:
            assert b":" in s.recv(100)       # the time, then the server closes
        with _from("127.0.0.2", addr) as s:
            assert _closed_by_peer(s)
        _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
