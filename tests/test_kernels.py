"""The zerocopy, fdpass and reactor kernels, compiled and pure, in one process.

Every test takes conftest's ``kernels`` fixture and runs once per kernel set
with the same inputs, expecting the same results and the same errors (type and
the attributes a caller reads); the cross tests pass bytes and descriptors from
one set to the other. Real socketpairs, real descriptors.
"""
import array
import importlib
import os
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from fastnet.errors import ProtocolError, MessageTooLarge, TimeoutError as FastnetTimeout, TruncatedFrameError

WATCHDOG_SECONDS = 60
OTHER = {"c": "fastnet._pure", "pure": "fastnet._c"}


def other(kernels, name):
    """Kernel ``name`` of the other set."""
    return importlib.import_module(f"{OTHER[kernels.name]}.{name}")


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    with a, b:
        yield a, b


def pattern(n):
    return bytes((i * 7 + (i >> 8)) & 0xFF for i in range(n))


# -- zerocopy --------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda d: d,
    lambda d: bytearray(d),
    lambda d: memoryview(d)[3:],
    lambda d: array.array("d", d[:len(d) // 8 * 8]),
], ids=["bytes", "bytearray", "memoryview-slice", "array-d"])
@pytest.mark.parametrize("n", [1, 4096, 300_000])
def test_zerocopy_round_trip(kernels, pair, make, n):
    """Socket objects and bare descriptors; the large case outgrows the socket buffers."""
    a, b = pair
    src = make(pattern(n + 8))
    nbytes = memoryview(src).nbytes
    out = bytearray(nbytes)
    with ThreadPoolExecutor(1) as ex:
        sent = ex.submit(kernels.zerocopy.send_from, src, a if n % 2 else a.fileno())
        assert kernels.zerocopy.recv_into(out, b.fileno() if n % 2 else b) == nbytes
        assert sent.result(timeout=30) == nbytes
    assert out == memoryview(src).cast("B").tobytes()


def test_zerocopy_fortran_ordered_numpy(kernels, pair):
    np = pytest.importorskip("numpy")
    a, b = pair
    src = np.asfortranarray(np.arange(600, dtype=np.float64).reshape(20, 30))
    dst = np.zeros((20, 30), dtype=np.float64, order="F")
    assert kernels.zerocopy.send_from(src, a) == src.nbytes
    assert kernels.zerocopy.recv_into(dst, b) == src.nbytes
    assert (dst == src).all()


def test_zerocopy_refuses_what_it_cannot_use(kernels, pair):
    zc = kernels.zerocopy
    a, b = pair
    with pytest.raises(BufferError):
        zc.recv_into(b"read-only", b)
    with pytest.raises(BufferError):
        zc.send_from(memoryview(bytearray(10))[::2], a)
    with pytest.raises(TypeError):
        zc.send_from("text", a)
    closed = socket.socket()
    closed.close()
    with pytest.raises(OSError) as ei:
        zc.send_from(b"x", closed)
    assert ei.value.errno == 9


def test_zerocopy_eof_truncation_and_timeout(kernels, pair):
    zc = kernels.zerocopy
    a, b = pair
    b.settimeout(0.2)
    with pytest.raises(FastnetTimeout):
        zc.recv_into(bytearray(10), b)
    a.sendall(b"abc")
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(TruncatedFrameError) as ei:
        zc.recv_into(bytearray(10), b)
    assert ei.value.missing == 7
    with pytest.raises(EOFError):
        zc.recv_into(bytearray(10), b)
    assert zc.recv_into(bytearray(0), b) == 0


def test_zerocopy_across_the_sets(kernels, pair):
    a, b = pair
    data = pattern(5000)
    out = bytearray(len(data))
    kernels.zerocopy.send_from(data, a)
    other(kernels, "zerocopy").recv_into(out, b)
    assert out == data


# -- fdpass ----------------------------------------------------------------------------

@pytest.fixture
def files():
    """Three open files with distinct contents; closed afterwards."""
    made = []
    for i in range(3):
        f = tempfile.TemporaryFile()
        f.write(b"file %d" % i)
        f.flush()
        made.append(f)
    yield made
    for f in made:
        f.close()


def same_file(fd, f):
    a, b = os.fstat(fd), os.fstat(f.fileno())
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def test_fdpass_constants_agree(kernels):
    assert kernels.fdpass.MAX_FDS == other(kernels, "fdpass").MAX_FDS


@pytest.mark.parametrize("receiver", ["same", "other"])
def test_fdpass_round_trip(kernels, pair, files, receiver):
    a, b = pair
    recv = kernels.fdpass if receiver == "same" else other(kernels, "fdpass")
    assert kernels.fdpass.send_fds(a, [f.fileno() for f in files], b"payload") == 7
    data, fds = recv.recv_fds(b, 8)
    try:
        assert data == b"payload"
        assert len(fds) == 3 and all(same_file(fd, f) for fd, f in zip(fds, files))
    finally:
        for fd in fds:
            os.close(fd)
    kernels.fdpass.send_fd(a.fileno(), files[1].fileno())
    fd = recv.recv_fd(b.fileno())
    try:
        assert same_file(fd, files[1])
    finally:
        os.close(fd)


def test_fdpass_refuses_bad_arguments(kernels, pair, files):
    fp = kernels.fdpass
    a, b = pair
    fd = files[0].fileno()
    for call in (lambda: fp.send_fds(a, []),
                 lambda: fp.send_fds(a, [fd] * (fp.MAX_FDS + 1)),
                 lambda: fp.send_fds(a, [fd], b""),
                 lambda: fp.recv_fds(b, 0),
                 lambda: fp.recv_fds(b, fp.MAX_FDS + 1),
                 lambda: fp.recv_fds(b, 1, 0)):
        with pytest.raises(ValueError):
            call()
    closed = socket.socket(socket.AF_UNIX)
    closed.close()
    with pytest.raises(OSError) as ei:
        fp.send_fd(closed, fd)
    assert ei.value.errno == 9


def test_fdpass_peer_errors(kernels, pair):
    fp = kernels.fdpass
    a, b = pair
    a.sendall(b"x")
    with pytest.raises(ProtocolError):
        fp.recv_fd(b)                   # data without a descriptor
    b.settimeout(0.2)
    with pytest.raises(FastnetTimeout):
        fp.recv_fds(b, 1)
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(EOFError):
        fp.recv_fds(b, 1)


# -- reactor ---------------------------------------------------------------------------

@pytest.fixture
def reactors(kernels):
    """reactors(backend="auto") -> a Reactor of the set under test, closed afterwards."""
    made = []

    def make(backend="auto"):
        r = kernels.reactor.Reactor(backend)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def test_reactor_constants_agree(kernels):
    r, o = kernels.reactor, other(kernels, "reactor")
    for name in ("BACKENDS", "SELECT_FD_LIMIT", "COPY_THRESHOLD", "DEFAULT_HIGH_WATER", "RECV_BUFSIZE"):
        assert getattr(r, name) == getattr(o, name), name
    assert r.default_backend() == o.default_backend()


@pytest.mark.parametrize("backend", ["epoll", "poll", "select"])
def test_reactor_attributes_are_read_only(kernels, reactors, backend):
    r = reactors(backend)
    twin = other(kernels, "reactor").Reactor(backend)
    try:
        assert r.backend == twin.backend == backend
        fresh = (r.ctl_calls, r.iterations, r.registered, r.timers, r.transports)
        assert fresh == (twin.ctl_calls, twin.iterations, twin.registered, twin.timers, twin.transports)
    finally:
        twin.close()
    assert r.iterations == 0 and r.timers == 0 and r.transports == []
    for name in ("backend", "ctl_calls", "iterations", "registered", "timers", "transports"):
        with pytest.raises(AttributeError):
            setattr(r, name, 1)
    with pytest.raises(ValueError):
        kernels.reactor.Reactor("kqueue")
    with pytest.raises(TypeError):
        kernels.reactor.TimerHandle()
    with pytest.raises(TypeError):
        kernels.reactor.FramedTransport()


@pytest.mark.parametrize("backend", ["epoll", "poll", "select"])
def test_reactor_callbacks_timers_and_readers(reactors, pair, backend):
    r = reactors(backend)
    a, b = pair
    seen = []
    r.call_later(0.02, seen.append, "later")
    r.call_soon(seen.append, "soon")
    dropped = r.call_soon(seen.append, "cancelled")
    dropped.cancel()
    assert dropped.cancelled() and dropped.callback is None and dropped.args is None
    r.add_reader(b, lambda s: seen.append(s.recv(10)), b)
    assert r.interest(b) == {"read"}
    a.sendall(b"ping")
    calls = r.ctl_calls
    assert r.run_until(lambda: len(seen) == 3, timeout=10)
    # one iteration polls (the reader is ready), then runs the ready queue; the timer is due later
    assert seen == [b"ping", "soon", "later"]
    assert r.remove_reader(b) is True and r.remove_reader(b) is False
    assert r.interest(b) == set()
    assert r.ctl_calls > calls and r.iterations >= 2


class Collect:
    """A framed protocol that records what the transport tells it."""

    def __init__(self):
        self.messages, self.lost, self.transport = [], [], None

    def connection_made(self, transport):
        self.transport = transport

    def message_received(self, data):
        self.messages.append(bytes(data))

    def connection_lost(self, exc):
        self.lost.append(exc)


@pytest.mark.parametrize("backend", ["epoll", "poll", "select"])
def test_reactor_framed_transport(kernels, reactors, backend):
    r = reactors(backend)
    a, b = socket.socketpair()
    with a:
        p = Collect()
        t = r.add_stream(b, p)
        assert p.transport is t and t.protocol is p and t.loop is r
        payloads = [b"", b"x", pattern(70_000)]
        for m in payloads:
            a.sendall(kernels.framing.encode_header(len(m)) + m)
        t.send_many([b"one", b"two"])
        assert r.run_until(lambda: len(p.messages) == 3, timeout=10)
        assert p.messages == payloads
        assert (t.messages_received, t.bytes_received) == (3, sum(len(m) + 4 for m in payloads))
        assert (t.messages_sent, t.bytes_sent) == (2, 14)
        for name in ("protocol", "messages_received", "messages_sent", "bytes_received", "bytes_sent",
                     "pauses", "closed", "socket", "loop"):
            with pytest.raises(AttributeError):
                setattr(t, name, 1)
        got = b""
        while len(got) < 14:
            got += a.recv(14)
        assert got == b"\0\0\0\x03one\0\0\0\x03two"
        t.close()
        assert r.run_until(lambda: p.lost, timeout=10)
        assert p.lost == [None] and t.closed and t.fileno() == -1


@pytest.mark.parametrize("bad, error", [(b"\xff\xff\xff\xfe", ProtocolError),
                                        (b"\x00\x01\x00\x00", MessageTooLarge)])
def test_reactor_bad_frame_closes_that_transport(reactors, bad, error):
    r = reactors()
    a, b = socket.socketpair()
    with a:
        p = Collect()
        t = r.add_stream(b, p, max_message_size=1000)
        a.sendall(b"\0\0\0\x02ok" + bad)
        assert r.run_until(lambda: p.lost, timeout=10)
        assert p.messages == [b"ok"]
        assert len(p.lost) == 1 and isinstance(p.lost[0], error)
        assert t.closed and r.transports == []


# -- the fixture itself ----------------------------------------------------------------

HIDE_AND_LOAD = """
import importlib.abc, sys
import pytest

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fastnet._c.zerocopy":
            raise ImportError("hidden by the test")

sys.meta_path.insert(0, Hide())
sys.path.insert(0, sys.argv[1])
import conftest
try:
    conftest.load_kernel_set("c")
except ImportError:
    print("FAILED")
except pytest.skip.Exception:
    print("SKIPPED")
else:
    print("LOADED")
"""


@pytest.mark.parametrize("env, outcome", [({"FASTNET_PURE": None, "CI": None}, "FAILED"),
                                          ({"FASTNET_PURE": None, "CI": "1"}, "FAILED"),
                                          ({"FASTNET_PURE": "1", "CI": "1"}, "FAILED"),
                                          ({"FASTNET_PURE": "1", "CI": None}, "SKIPPED")])
def test_a_missing_compiled_kernel_fails_the_kernels_fixture(env, outcome):
    """Where the compiled set is expected (no FASTNET_PURE, or CI), a missing kernel is an error, never a skip."""
    tests = os.path.dirname(os.path.abspath(__file__))
    child = dict(os.environ)
    child["PYTHONPATH"] = os.path.dirname(tests) + os.pathsep + child.get("PYTHONPATH", "")
    for k, v in env.items():
        if v is None:
            child.pop(k, None)
        else:
            child[k] = v
    r = subprocess.run([sys.executable, "-c", HIDE_AND_LOAD, tests], env=child, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [outcome]
