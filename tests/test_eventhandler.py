"""The Cookbook's EventHandler style (recipe 11.12) on fastnet's loop, and its examples run as scripts."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import fastnet
from fastnet.loop import BACKENDS, EventLoop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
WAIT = 20.0


@pytest.fixture(params=BACKENDS)
def loop(request):
    lp = EventLoop(request.param)
    yield lp
    lp.close()


class Pair(fastnet.EventHandler):
    """One end of a socketpair that records its calls and echoes in upper case."""

    def __init__(self, sock):
        self.sock = sock
        self.sock.setblocking(False)
        self.outgoing = bytearray()
        self.received = []
        self.sends = 0
        self.receiving = True

    def fileno(self):
        return self.sock.fileno()

    def wants_to_receive(self):
        return self.receiving

    def handle_receive(self):
        data = self.sock.recv(4096)
        self.received.append(data)
        self.outgoing += data.upper()

    def wants_to_send(self):
        return bool(self.outgoing)

    def handle_send(self):
        self.sends += 1
        n = self.sock.send(self.outgoing)
        del self.outgoing[:n]


def test_handler_receives_sends_and_interest_follows_its_answers(loop):
    a, b = socket.socketpair()
    h = Pair(a)
    try:
        loop.add_handler(h)
        assert h.loop is loop
        assert loop.interest(a.fileno()) == {"read"}
        b.sendall(b"hello")
        b.settimeout(WAIT)
        got = []
        th = threading.Thread(target=lambda: got.append(b.recv(100)))
        th.start()
        assert loop.run_until(lambda: got, WAIT)
        th.join(WAIT)
        assert got == [b"HELLO"] and h.received == [b"hello"]
        # after the send the handler wants only to receive again
        assert loop.interest(a.fileno()) == {"read"}
        assert h.sends == 1
    finally:
        loop.remove_handler(h)
        a.close()
        b.close()


def test_interest_changes_only_when_an_answer_changes(loop):
    a, b = socket.socketpair()
    h = Pair(a)
    try:
        loop.add_handler(h)
        before = loop.ctl_calls
        for i in range(20):
            b.sendall(b"x")
            loop.run_until(lambda: len(h.received) > i and not h.outgoing, WAIT)
        b.setblocking(False)
        # each message: receive (wants_to_send turns on), send (turns off) -> 2 changes
        assert loop.ctl_calls - before <= 2 * 20
        assert loop.interest(a.fileno()) == {"read"}
        h.receiving = False
        loop.update_handler(h)
        assert loop.interest(a.fileno()) == set()
    finally:
        loop.remove_handler(h)
        a.close()
        b.close()


def test_idle_handlers_are_not_asked(loop):
    asked = []

    class Idle(fastnet.EventHandler):
        def __init__(self):
            self.a, self.b = socket.socketpair()

        def fileno(self):
            return self.a.fileno()

        def wants_to_receive(self):
            asked.append(self)
            return True

    idle = [Idle() for _ in range(50)]
    a, b = socket.socketpair()
    busy = Pair(a)
    try:
        for h in idle:
            loop.add_handler(h)
        loop.add_handler(busy)
        asked.clear()
        for i in range(30):
            b.sendall(b"y")
            loop.run_until(lambda: len(busy.received) > i, WAIT)
        assert asked == []   # the Cookbook's loop would have asked 50 handlers per iteration
    finally:
        for h in idle:
            loop.remove_handler(h)
            h.a.close()
            h.b.close()
        loop.remove_handler(busy)
        a.close()
        b.close()


def test_handler_removed_inside_its_own_callback(loop):
    a, b = socket.socketpair()

    class Once(Pair):
        def handle_receive(self):
            super().handle_receive()
            self.loop.remove_handler(self)

    h = Once(a)
    try:
        loop.add_handler(h)
        b.sendall(b"z")
        assert loop.run_until(lambda: h.received, WAIT)
        assert h not in loop.handlers
        assert loop.interest(a.fileno()) == set()
        assert not loop.remove_handler(h)
    finally:
        a.close()
        b.close()


def test_handler_errors_are_logged_and_the_handler_stays(loop, caplog):
    a, b = socket.socketpair()

    class Broken(Pair):
        def handle_receive(self):
            super().handle_receive()
            raise RuntimeError("handler bug")

    h = Broken(a)
    try:
        loop.add_handler(h)
        b.sendall(b"q")
        assert loop.run_until(lambda: h.received, WAIT)
        assert any(r.name == "fastnet.loop" for r in caplog.records)
        assert h in loop.handlers
    finally:
        loop.remove_handler(h)
        a.close()
        b.close()


def test_adding_a_handler_twice_is_refused(loop):
    a, b = socket.socketpair()
    h = Pair(a)
    try:
        loop.add_handler(h)
        with pytest.raises(ValueError):
            loop.add_handler(h)
    finally:
        loop.remove_handler(h)
        a.close()
        b.close()


def test_base_class_defaults():
    h = fastnet.EventHandler()
    assert not h.wants_to_receive() and not h.wants_to_send()
    h.handle_receive()
    h.handle_send()
    with pytest.raises(NotImplementedError):
        h.fileno()


# -- the examples, run as scripts ------------------------------------------------------

def _start(script, backend):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.Popen([sys.executable, os.path.join(EXAMPLES, script), "--port", "0",
                          "--backend", backend],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = p.stdout.readline()
    if not line:
        p.kill()
        raise AssertionError(f"{script} did not start: {p.stderr.read()}")
    port = int(line.rsplit(":", 1)[1])
    return p, port


def _stop(p):
    p.send_signal(signal.SIGTERM)
    try:
        out, err = p.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError("example did not stop on SIGTERM")
    assert p.returncode == 0, err
    assert "stopped" in out


@pytest.mark.parametrize("backend", BACKENDS)
def test_udp_time_example(backend):
    p, port = _start("eventhandler_udp_time.py", backend)
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(WAIT)
        for _ in range(3):
            s.sendto(b"", ("127.0.0.1", port))
            msg, addr = s.recvfrom(128)
            assert addr[1] == port
            # time.ctime(): 'Tue Sep 18 14:29:23 2012'
            parsed = time.strptime(msg.decode("ascii"))
            assert abs(time.mktime(parsed) - time.time()) < 120
        s.close()
    finally:
        if p.poll() is None:
            _stop(p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_udp_echo_example(backend):
    p, port = _start("eventhandler_udp_echo.py", backend)
    try:
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
        for k, s in enumerate(socks):
            s.settimeout(WAIT)
            for i in range(20):
                msg = b"hello %d %d " % (k, i) + bytes(i * 50)
                s.sendto(msg, ("127.0.0.1", port))
                assert s.recvfrom(65535) == (msg, ("127.0.0.1", port))
        for s in socks:
            s.close()
    finally:
        if p.poll() is None:
            _stop(p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tcp_echo_example(backend):
    p, port = _start("eventhandler_tcp_echo.py", backend)
    try:
        clients = [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(5)]
        for i in range(10):
            for k, c in enumerate(clients):
                c.sendall(b"line %d from %d\n" % (i, k))
            for k, c in enumerate(clients):
                want = b"line %d from %d\n" % (i, k)
                got = b""
                while len(got) < len(want):
                    got += c.recv(len(want) - len(got))
                assert got == want
        big = os.urandom(3 * 1024 * 1024)
        got = bytearray()

        def reader():
            while len(got) < len(big):
                chunk = clients[0].recv(1 << 20)
                if not chunk:
                    break
                got.extend(chunk)

        th = threading.Thread(target=reader)
        th.start()
        clients[0].sendall(big)
        th.join(WAIT)
        assert bytes(got) == big
        for c in clients:
            c.close()
    finally:
        if p.poll() is None:
            _stop(p)
