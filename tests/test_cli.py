"""The fastnet command: serve-rpc and call as real subprocesses, and one-line errors."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 20


def _env(tmp_path, **extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), ROOT, env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _fastnet(args, tmp_path, **kw):
    env = kw.pop("env", None) or _env(tmp_path)
    kw.setdefault("timeout", WAIT)
    return subprocess.run([sys.executable, "-m", "fastnet", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, **kw)


@pytest.fixture
def calc_module(tmp_path):
    (tmp_path / "calcmod.py").write_text(textwrap.dedent('''
        import os as _os
        from math import sqrt            # imported: not exposed

        def add(x, y):
            "Add two numbers."
            return x + y

        def div(x, y):
            return x / y

        def blob(n):
            return b"\\x00" * n

        def _private():
            return "hidden"

        class Store:
            _rpc_methods_ = ["get", "set"]

            def __init__(self):
                self.d = {}

            def get(self, k):
                return self.d.get(k)

            def set(self, k, v):
                self.d[k] = v

            def wipe(self):
                self.d.clear()
    '''))
    return tmp_path


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def serve(calc_module):
    procs = []

    def start(*args, env=None):
        p = subprocess.Popen([sys.executable, "-m", "fastnet", "serve-rpc", *args], cwd=calc_module,
                             env=env or _env(calc_module), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        procs.append(p)
        line = p.stdout.readline()
        assert line.startswith("serving "), (line, p.stderr.read() if p.poll() is not None else "")
        return line

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(WAIT)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()


def test_serve_module_and_call_functions(serve, calc_module):
    port = _free_port()
    line = serve("calcmod", "--address", f"127.0.0.1:{port}")
    assert "add" in line and "div" in line and "sqrt" not in line and "_private" not in line
    r = _fastnet(["call", f"127.0.0.1:{port}", "add", "2", "3"], calc_module)
    assert r.returncode == 0 and json.loads(r.stdout) == 5
    r = _fastnet(["call", f"127.0.0.1:{port}", "add", "hello", '" world"'], calc_module)
    assert json.loads(r.stdout) == "hello world"
    r = _fastnet(["call", f"127.0.0.1:{port}", "add", '[1]', "--kwargs", '{"y": [2]}'], calc_module)
    assert json.loads(r.stdout) == [1, 2]
    r = _fastnet(["call", f"127.0.0.1:{port}", "blob", "3"], calc_module)
    assert json.loads(r.stdout) == {"bytes": "000000"}
    r = _fastnet(["call", f"127.0.0.1:{port}", "system.method_help", "add"], calc_module)
    assert json.loads(r.stdout) == "Add two numbers."


def test_serve_object_with_rpc_methods_over_unix_with_authkey(serve, calc_module):
    path = str(calc_module / "rpc.sock")
    env = _env(calc_module, RPC_KEY="s3cret")
    serve("calcmod:Store", "--address", path, "--authkey-env", "RPC_KEY", env=env)
    r = _fastnet(["call", path, "set", "a", "[1, 2]", "--authkey-env", "RPC_KEY"], calc_module, env=env)
    assert r.returncode == 0, r.stderr
    r = _fastnet(["call", path, "get", "a", "--authkey-env", "RPC_KEY"], calc_module, env=env)
    assert json.loads(r.stdout) == [1, 2]
    r = _fastnet(["call", path, "wipe", "--authkey-env", "RPC_KEY"], calc_module, env=env)
    assert r.returncode == 1 and "MethodNotFound" in r.stderr
    bad = _env(calc_module, RPC_KEY="wrong")
    r = _fastnet(["call", path, "get", "a", "--authkey-env", "RPC_KEY"], calc_module, env=bad)
    assert r.returncode == 1 and "AuthenticationError" in r.stderr


@pytest.mark.parametrize("argv, rc, needle", [
    (["call", "127.0.0.1:1", "add", "1", "2", "--timeout", "2"], 1, "cannot connect"),
    (["call", "nohostport", "add"], 2, "bad address"),
    (["call", "127.0.0.1:1", "add", "--kwargs", "[1]"], 2, "--kwargs must be a JSON object"),
    (["serve-rpc", "no_such_module_x", "--address", "127.0.0.1:0"], 2, "cannot import"),
    (["serve-rpc", "calcmod:Nope", "--address", "127.0.0.1:0"], 2, "has no attribute"),
    (["serve-rpc", "calcmod", "--address", "127.0.0.1:0", "--codec", "pickle"], 2, "authenticated"),
    (["serve-rpc", "calcmod", "--address", "127.0.0.1:0", "--authkey-env", "UNSET_VAR_X"], 2,
     "UNSET_VAR_X"),
    (["serve-rpc", "calcmod", "--address", "127.0.0.1:0", "--tls-cert", "missing.pem"], 2,
     "--tls-key"),
])
def test_user_mistakes_are_one_line_and_a_status(calc_module, argv, rc, needle):
    r = _fastnet(argv, calc_module)
    assert r.returncode == rc, (r.stdout, r.stderr)
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_remote_exception_is_one_line(serve, calc_module):
    port = _free_port()
    serve("calcmod", "--address", f"127.0.0.1:{port}")
    r = _fastnet(["call", f"127.0.0.1:{port}", "div", "1", "0"], calc_module)
    assert r.returncode == 1
    assert r.stderr.strip() == "fastnet call: remote ZeroDivisionError: division by zero"


def test_info_lists_kernels_and_backends(calc_module):
    r = _fastnet(["info"], calc_module)
    assert r.returncode == 0
    assert "kernels:" in r.stdout and "epoll" in r.stdout


def test_no_command_prints_help(calc_module):
    r = _fastnet([], calc_module)
    assert r.returncode == 2 and "serve-rpc" in r.stdout and "call" in r.stdout


def test_bench_writes_json_and_plots_the_speedups(tmp_path):
    pytest.importorskip("matplotlib")
    png, out = tmp_path / "r.png", tmp_path / "r.json"
    r = _fastnet(["bench", "--only", "pingpong", "--family", "unix", "--rounds", "1", "--repeat", "1",
                  "--sample", "0.05", "--warmup", "0.05", "--json", str(out), "--plot", str(png)],
                 tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pingpong" in r.stdout
    report = json.loads(out.read_text())
    rows = report["results"]["pingpong"]["unix"]
    assert rows["fastnet"]["median"] > 0 and rows["mp"]["median"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from fastnet.bench import speedups
    (label, ratio, peer), = speedups(report)
    assert label == "pingpong AF_UNIX" and peer != "C floor (write+read)"
    best = min(rows[k]["median"] for k in ("mp", "zmq") if rows[k]["median"])
    # fastnet's best compiled row, opt-in features (read-ahead) included
    mine = min(r["median"] for k, r in rows.items()
               if k.startswith("fastnet") and not k.endswith("pure") and r["median"])
    assert ratio == pytest.approx(best / mine)
