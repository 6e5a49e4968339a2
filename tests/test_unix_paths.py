"""AF_UNIX paths: a dead server's socket file is replaced, a live server's never."""
import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

import fastnet
from fastnet.loop import EventLoop


def killed_server(path, kind="stream"):
    """A child that binds path, says so and is SIGKILLed: its socket file stays behind."""
    code = textwrap.dedent(f"""
        import socket, sys, time
        s = socket.socket(socket.AF_UNIX, socket.SOCK_{'STREAM' if kind == 'stream' else 'DGRAM'})
        s.bind({path!r})
        {'s.listen(1)' if kind == 'stream' else ''}
        print("up", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert p.stdout.readline() == b"up\n"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert os.path.exists(path)


def round_trip(path):
    with fastnet.Client(path, timeout=5) as c:
        c.send_bytes(b"ping")
        assert c.recv_bytes() == b"ping"


def test_listener_replaces_a_dead_servers_socket(tmp_path):
    path = str(tmp_path / "s")
    killed_server(path)
    with fastnet.Listener(path) as ln:
        c = fastnet.Client(path)
        with ln.accept() as a:
            c.send_bytes(b"x")
            assert a.recv_bytes() == b"x"
        c.close()
    assert not os.path.exists(path)


class Echo(fastnet.BaseRequestHandler):
    def handle(self):
        data = self.request.recv(65536)
        self.request.sendall(data)


def echo_message(path):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b"hello")
        assert s.recv(100) == b"hello"


def test_unix_server_replaces_a_dead_servers_socket(tmp_path):
    path = str(tmp_path / "s")
    killed_server(path)
    with fastnet.UnixServer(path, Echo) as srv:
        srv.start()
        echo_message(path)
    assert not os.path.exists(path)


def test_unix_datagram_server_replaces_a_dead_servers_socket(tmp_path):
    path = str(tmp_path / "d")
    killed_server(path, kind="dgram")
    with fastnet.UnixDatagramServer(path, fastnet.DatagramRequestHandler) as srv:
        assert srv.address == path


def test_event_loop_server_replaces_a_dead_servers_socket(tmp_path):
    path = str(tmp_path / "s")
    killed_server(path)
    loop = EventLoop()
    try:
        server = loop.create_server(path, lambda: None)
        assert server is not None
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)         # the listening socket accepts connections on the path
    finally:
        loop.close()


def test_a_live_servers_path_is_never_taken(tmp_path):
    path = str(tmp_path / "s")
    with fastnet.Listener(path) as live:
        with pytest.raises(OSError) as ei:
            fastnet.Listener(path)
        assert ei.value.errno == errno.EADDRINUSE
        with pytest.raises(OSError) as ei:
            fastnet.UnixServer(path, Echo)
        assert ei.value.errno == errno.EADDRINUSE
        # the live one still serves
        c = fastnet.Client(path)
        with live.accept() as a:
            c.send_bytes(b"still here")
            assert a.recv_bytes() == b"still here"
        c.close()


def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"precious")
    with pytest.raises(OSError) as ei:
        fastnet.Listener(str(path))
    assert ei.value.errno == errno.EADDRINUSE
    assert path.read_bytes() == b"precious"
