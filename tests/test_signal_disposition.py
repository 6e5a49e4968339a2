"""Stop signals and the disposition a process inherits.

A shell's background job and ``nohup`` start a program with SIGINT (or
SIGHUP) ignored. ``serve_forever()`` leaves a stop signal that was ignored at
start ignored, and still stops on the others. The children here are real
server processes on the kernel set of this run (FASTNET_PURE passes through).
"""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 30.0

SERVER = textwrap.dedent(r"""
    import signal
    import sys

    import fastnet

    class Echo(fastnet.StreamRequestHandler):
        def handle(self):
            for line in self.rfile:
                if line == b"sigint?\n":    # the serving process's SIGINT disposition
                    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
                    line = b"ignored\n" if ignored else b"handled\n"
                self.wfile.write(line)

    with fastnet.TCPServer(("127.0.0.1", 0), Echo, concurrency=sys.argv[1]) as srv:
        print(srv.server_address[1], flush=True)
        srv.serve_forever()
    print("stopped", flush=True)
""")


@contextlib.contextmanager
def _server(concurrency, sigint):
    """The server process, started with the given SIGINT disposition; yields (proc, port)."""
    def disposition():
        signal.signal(signal.SIGINT, sigint)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", SERVER, concurrency], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=disposition)
    try:
        yield proc, int(proc.stdout.readline())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _echo(port, line=b"still here\n"):
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        s.sendall(line)
        return s.makefile("rb").readline()


def _finish(proc):
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err[-3000:]
    assert out.splitlines()[-1] == "stopped"


@pytest.mark.parametrize("concurrency", ["loop", "thread"])
def test_sigint_ignored_at_start_stays_ignored(concurrency):
    with _server(concurrency, signal.SIG_IGN) as (proc, port):
        assert _echo(port, b"sigint?\n") == b"ignored\n"
        # an ignored signal is discarded as it is sent: nothing is pending after kill()
        proc.send_signal(signal.SIGINT)
        assert _echo(port) == b"still here\n"
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        _finish(proc)


@pytest.mark.parametrize("concurrency", ["loop", "thread"])
def test_sigint_stops_the_server_when_not_ignored(concurrency):
    with _server(concurrency, signal.SIG_DFL) as (proc, port):
        assert _echo(port, b"sigint?\n") == b"handled\n"
        proc.send_signal(signal.SIGINT)
        _finish(proc)


def test_suite_signal_tests_pass_with_sigint_ignored():
    # the tests that send SIGINT set the disposition they need themselves
    tests = ["tests/test_loop.py::test_sigint_handler_replaces_keyboardinterrupt",
             "tests/test_examples.py::test_pass_socket"]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
