"""Fork and prefork servers fork only from their single-threaded fork server.

A process with threads must not fork (a lock another thread holds stays held
in the child; CPython 3.12+ warns). The servers here run in a program of
their own whose audit hook records, at every ``os.fork()`` of the program
and of the processes it forks, how many threads the forking process has.
The same check runs on this interpreter and on every CPython 3.12+ that
pyenv has, where the program also shows every DeprecationWarning.
Then: the fork server leaves with the server, or when its parent is killed,
and leaks no descriptor per connection.
"""
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

import fastnet
from fastnet.server import StreamRequestHandler, TCPServer
from rpcutil import readline, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 30.0

PROGRAM = r'''
import json, os, signal, socket, sys, threading, time
sys.path.insert(0, sys.argv[1])
cfg = json.loads(sys.argv[2])
LOG = cfg["log"]


def audit(event, args):
    # runs in whichever process forks: this one, or a fork server
    if event == "os.fork":
        with open(LOG, "a") as f:
            f.write("%d %d %d\n" % (os.getpid(), len(os.listdir("/proc/self/task")),
                                     threading.active_count()))


sys.addaudithook(audit)

import fastnet
from fastnet.server import (DatagramRequestHandler, MessageHandler, StreamRequestHandler,
                            TCPServer, UDPServer)


class Echo(StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(b"%d " % os.getpid() + line)


class FramedEcho(MessageHandler):
    def message_received(self, data):
        self.reply(b"%d:" % os.getpid() + data)


class DatagramEcho(DatagramRequestHandler):
    def handle(self):
        self.wfile.write(b"%d:" % os.getpid() + self.rfile.read())


mode = cfg["mode"]
addr = ("127.0.0.1", 0)
if mode == "rpc":
    srv = fastnet.RPCServer(addr, codec="json", workers=2, monitor=("127.0.0.1", 0))
    srv.register_function(lambda x: [os.getpid(), x], "echo")
elif mode == "udp":
    srv = UDPServer(addr, DatagramEcho, concurrency="fork", workers=4)
elif mode == "fork":
    srv = TCPServer(addr, Echo, concurrency="fork", workers=4)
else:
    srv = TCPServer(addr, FramedEcho, concurrency="prefork", workers=2)

if cfg["thread"]:
    # started from a thread that is gone before the server serves
    t = threading.Thread(target=srv.start)
    t.start()
    t.join()
else:
    srv.start()
# the program's own threads, besides the server's: they must not matter
stop = threading.Event()
mine = [threading.Thread(target=stop.wait) for _ in range(3)]
for t in mine:
    t.start()


def call(i):
    if mode == "rpc":
        with fastnet.RPCProxy(srv.address, codec="json", timeout=30) as p:
            pid, x = p.echo(i)
            assert x == i
            return pid
    if mode == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(30)
            s.sendto(b"hello %d" % i, srv.address)
            pid, _, rest = s.recv(100).partition(b":")
            assert rest == b"hello %d" % i
            return int(pid)
    if mode == "fork":
        with socket.create_connection(srv.address, timeout=30) as s:
            f = s.makefile("rwb")
            f.write(b"hello %d\n" % i)
            f.flush()
            pid, _, rest = f.readline().partition(b" ")
            assert rest == b"hello %d\n" % i
            return int(pid)
    with fastnet.Client(srv.address, timeout=30) as c:
        c.send_bytes(b"hello %d" % i)
        pid, _, rest = c.recv_bytes().partition(b":")
        assert rest == b"hello %d" % i
        return int(pid)


pids = {call(i) for i in range(4)}
if mode in ("rpc", "prefork"):
    # a replacement worker is forked while the server runs
    victim = srv.worker_pids[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while victim in srv.worker_pids or len(srv.worker_pids) < 2:
        assert time.monotonic() < deadline, "no replacement worker"
        time.sleep(0.01)
    pids |= {call(i) for i in range(4)}
if cfg.get("hold"):
    print(json.dumps({"pid": os.getpid(), "pids": sorted(pids), "workers": srv.worker_pids}), flush=True)
    sys.stdin.readline()
srv.shutdown()
srv.server_close()
stop.set()
for t in mine:
    t.join()
print(json.dumps({"pid": os.getpid(), "pids": sorted(pids)}), flush=True)
'''


def _pythons():
    """This interpreter (its kernels), and every CPython 3.12+ pyenv has (pure kernels)."""
    found = [pytest.param((sys.executable, None), id="this")]
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    for exe in sorted(glob.glob(os.path.join(root, "versions", "3.1[2-9].*", "bin", "python3"))):
        name = exe.split(os.sep)[-3]
        if os.path.realpath(exe) != os.path.realpath(sys.executable):
            found.append(pytest.param((exe, "1"), id=f"py{name}"))
    return found


def _run_program(tmp_path, python, pure, mode, thread=False, hold=False):
    log = tmp_path / "forks"
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if pure is not None:
        env["FASTNET_PURE"] = pure
    cfg = {"log": str(log), "mode": mode, "thread": thread, "hold": hold}
    proc = subprocess.Popen([python, "-W", "always::DeprecationWarning", "-c", PROGRAM, ROOT, json.dumps(cfg)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    return proc, log


def _forks(log):
    return [tuple(map(int, line.split())) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["fork", "prefork", "udp", "rpc"])
@pytest.mark.parametrize("python", _pythons())
def test_every_fork_happens_in_a_single_threaded_process(tmp_path, python, mode):
    exe, pure = python
    proc, log = _run_program(tmp_path, exe, pure, mode)
    try:
        out, err = proc.communicate(timeout=WAIT * 4)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err.decode()
    assert proc.returncode == 0, err[-3000:]
    served = json.loads(out.decode().splitlines()[-1])
    forks = _forks(log)
    program = served["pid"]
    # one fork in the program itself, the fork server, before any thread
    assert [f for f in forks if f[0] == program] == [(program, 1, 1)], forks
    # every child (each connection or datagram, each worker and its replacement)
    # forked by the fork server, itself a single thread
    children = [f for f in forks if f[0] != program]
    expected = 4 if mode in ("fork", "udp") else 3
    assert len(children) == expected, forks
    assert all(f[1:] == (1, 1) for f in children), forks
    assert len({f[0] for f in children}) == 1, forks
    assert program not in served["pids"] and children[0][0] not in served["pids"]
    assert "multi-threaded" not in err, err[-3000:]


def _state(pid):
    """A process's state letter from /proc, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def _children_of(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _our_new_children():
    """Children of this process other than those it had when the test began.

    Earlier tests may leave long-lived helpers behind (multiprocessing's
    forkserver and resource tracker live until the session ends); they are
    not this module's business.
    """
    return [p for p in _children_of(os.getpid()) if p not in _HELPERS]


_HELPERS: set[int] = set()


@pytest.fixture(autouse=True)
def _existing_children():
    _HELPERS.clear()
    _HELPERS.update(_children_of(os.getpid()))


def _fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fd_targets(pid):
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out


def _dead(pid):
    # gone, or a zombie its new parent has not reaped yet: either way it exited
    return _state(pid) in (None, "Z")


@pytest.mark.parametrize("thread", [False, True], ids=["main-thread", "other-thread"])
@pytest.mark.parametrize("mode", ["fork", "prefork"])
def test_fork_server_and_workers_exit_when_the_parent_is_killed(tmp_path, mode, thread):
    proc, log = _run_program(tmp_path, sys.executable, None, mode, thread=thread, hold=True)
    try:
        info = json.loads(readline(proc))
        program = info["pid"]
        fork_servers = _children_of(program)
        assert len(fork_servers) == 1, fork_servers
        assert {f[0] for f in _forks(log)} == {program, fork_servers[0]}
        os.kill(program, signal.SIGKILL)
        proc.wait(WAIT)
        # PR_SET_PDEATHSIG when serving began on the main thread, else end of file
        assert wait_for(lambda: _dead(fork_servers[0])), _state(fork_servers[0])
        # prefork workers see end of file on their channels and leave too
        assert wait_for(lambda: all(_dead(p) for p in info["workers"]))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Echo(StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(line)


def _serve_some(srv, n):
    for i in range(n):
        with socket.create_connection(srv.address, timeout=WAIT) as s:
            f = s.makefile("rwb")
            f.write(b"hello %d\n" % i)
            f.flush()
            assert f.readline() == b"hello %d\n" % i


@pytest.mark.parametrize("mode", ["fork", "prefork"])
def test_fork_server_leaves_with_the_server_and_leaks_nothing(mode):
    def cycle():
        srv = TCPServer(("127.0.0.1", 0), Echo, concurrency=mode, workers=2)
        try:
            srv.start()
            procs = _our_new_children()
            assert len(procs) == 1, procs        # the fork server; workers are its children
            fork_server = procs[0]
            settled = (lambda: srv.stats()["children"] == 0) if mode == "fork" else (lambda: True)
            _serve_some(srv, 2)
            assert wait_for(settled)
            fds = _fds(fork_server)
            _serve_some(srv, 10)
            assert wait_for(settled)
            # a connection's descriptors pass through the fork server and stay in none
            # (polled: a leaked one stays, while one still in passage is gone a moment
            # later; a failure names them)
            assert wait_for(lambda: _fds(fork_server) == fds), (fds, _fd_targets(fork_server))
            workers = srv.worker_pids
        finally:
            srv.shutdown(timeout=WAIT)
            srv.server_close()
        # gone and reaped as shutdown() returns: no child of ours is left, not even a zombie
        assert _our_new_children() == []
        assert _state(fork_server) is None
        assert all(_dead(p) for p in workers)

    cycle()
    before = sorted(os.listdir("/proc/self/fd"))
    cycle()
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_fork_server_leaves_with_a_server_closed_without_serving():
    srv = TCPServer(("127.0.0.1", 0), Echo, concurrency="fork")
    srv.shutdown()           # before serving: closes
    srv.server_close()
    assert _our_new_children() == []
    srv = TCPServer(("127.0.0.1", 0), Echo, concurrency="prefork", workers=1)
    with srv:
        srv.start()
        assert len(_our_new_children()) == 1
        _serve_some(srv, 1)
    assert _our_new_children() == []


def test_children_see_the_server_as_it_was_when_serving_began():
    seen = []

    class Tagged(StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"%s\n" % self.server.tag)

    srv = TCPServer(("127.0.0.1", 0), Tagged, concurrency="fork", workers=2)
    srv.tag = b"before"
    with srv:
        srv.start()
        srv.tag = b"after"       # the fork server's copy was made at start()
        for _ in range(2):
            with socket.create_connection(srv.address, timeout=WAIT) as s:
                seen.append(s.makefile("rb").readline())
    assert seen == [b"before\n", b"before\n"]


@pytest.mark.parametrize("mode", ["fork", "prefork"])
def test_a_killed_fork_server_shuts_the_server_down(mode):
    srv = TCPServer(("127.0.0.1", 0), Echo, concurrency=mode, workers=2)
    before = set(threading.enumerate())
    try:
        srv.start()
        serving, = set(threading.enumerate()) - before
        _serve_some(srv, 2)
        workers = srv.worker_pids
        fork_server, = _our_new_children()
        os.kill(fork_server, signal.SIGKILL)
        # nothing can be forked any more: the server stops, and its serving thread ends
        serving.join(WAIT)
        assert not serving.is_alive()
        # the workers were written off: their channels closed, so they leave
        assert wait_for(lambda: all(_dead(p) for p in workers))
        assert srv.worker_pids == []
    finally:
        srv.shutdown(timeout=WAIT)
        srv.server_close()
    assert _our_new_children() == []
    with pytest.raises(OSError):
        socket.create_connection(srv.address, timeout=WAIT)
