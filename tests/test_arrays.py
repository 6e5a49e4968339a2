"""send_array / recv_array, zero-copy receives, and fastnet.send_from / recv_into.

Large transfers run their sender in a thread (or a child process) that shuts
the socket down if it fails, so a receiver can never wait forever; a watchdog
catches anything else.
"""
import array
import os
import select
import socket
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import pytest

np = pytest.importorskip("numpy")

import fastnet
from fastnet import Client, Listener, Pipe, wait

T = 20.0
BIG = 64 << 20  # 64 MiB
REPO = os.path.dirname(os.path.dirname(os.path.abspath(fastnet.__file__)))


WATCHDOG_SECONDS = 120


@pytest.fixture
def pipe():
    a, b = Pipe()
    with a, b:
        yield a, b


def background(fn, *args, on_error=None):
    """Run fn in a thread; if it fails, shut on_error down so no reader waits forever."""
    ex = ThreadPoolExecutor(1)

    def run():
        try:
            return fn(*args)
        except BaseException:
            if on_error is not None:
                try:
                    on_error.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            raise
    fut = ex.submit(run)
    ex.shutdown(wait=False)
    return fut


def conn_socket(conn):
    """A socket object over the connection's descriptor (for shutdown from a failing sender)."""
    return socket.socket(fileno=os.dup(conn.fileno()))


def roundtrip(a, b, arr, **kw):
    a.send_array(arr)
    assert b.poll(T)
    return b.recv_array(**kw)


def assert_same_array(got, want):
    assert isinstance(got, np.ndarray)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    if want.dtype.kind == "f" or want.dtype.kind == "c":
        np.testing.assert_array_equal(got, want)  # NaN-aware
    else:
        assert got.tobytes() == np.ascontiguousarray(want).tobytes()


# -- dtypes and shapes ----------------------------------------------------------------

DTYPES = [
    "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", ">i4", ">u8",
    "f2", "f4", "f8", ">f8", "c8", "c16", "?",
    "M8[ns]", "M8[D]", "m8[s]", "S7", "U5", "V6",
]


def make(dtype, shape=(3, 5)):
    dt = np.dtype(dtype)
    n = int(np.prod(shape))
    raw = np.arange(n * dt.itemsize, dtype=np.uint64).astype(np.uint8)
    if dt.kind == "b":
        return (np.arange(n) % 3 == 0).reshape(shape)
    if dt.kind == "U":
        return np.array([f"s{i}é" for i in range(n)], dtype=dt).reshape(shape)
    if dt.kind in "fc":
        a = (np.arange(n, dtype=dt) * dt.type(1.5) - 4).reshape(shape)
        if n:
            a.flat[0] = np.nan
        return a
    return raw.view(dt).reshape(shape).copy()


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_roundtrip(pipe, dtype):
    a, b = pipe
    arr = make(dtype)
    assert_same_array(roundtrip(a, b, arr), arr)


STRUCTURED = [
    np.dtype([("a", "<i4"), ("b", "<f8", (3,)), ("c", "S3")]),
    np.dtype([("x", "u1"), ("y", ">i8")], align=True),  # padding inside
    np.dtype([("pos", [("x", "f4"), ("y", "f4")]), ("id", "u2")]),  # nested
    np.dtype({"names": ["lo", "hi"], "formats": ["u1", "u1"], "offsets": [0, 3], "itemsize": 6}),
]


@pytest.mark.parametrize("dt", STRUCTURED, ids=["subarray", "aligned", "nested", "offsets"])
def test_structured_dtypes_roundtrip(pipe, dt):
    a, b = pipe
    arr = np.zeros(7, dtype=dt)
    raw = arr.view(np.uint8)
    raw[...] = np.arange(raw.size) % 251
    got = roundtrip(a, b, arr)
    assert got.dtype == dt
    assert got.dtype.itemsize == dt.itemsize
    assert got.tobytes() == arr.tobytes()
    for name in dt.names:
        assert got[name].tobytes() == arr[name].tobytes()


def test_object_arrays_are_refused_and_nothing_is_sent(pipe):
    a, b = pipe
    with pytest.raises(TypeError):
        a.send_array(np.array([object(), 1], dtype=object))
    a.send_array(np.arange(3))
    assert b.poll(T)
    assert b.recv_array().tolist() == [0, 1, 2]


@pytest.mark.parametrize("shape", [(), (0,), (0, 4), (3, 0, 2), (17,), (4, 6), (2, 3, 4, 5), (1,) * 10])
def test_shapes(pipe, shape):
    a, b = pipe
    arr = make("f8", shape) if shape else np.array(2.5)
    got = roundtrip(a, b, arr)
    assert got.shape == shape
    assert_same_array(got, arr)


def test_zero_d_scalar_values(pipe):
    a, b = pipe
    for arr in [np.array(7, dtype="i8"), np.array(True), np.array(b"xyz", dtype="S3"),
                np.array("2024-01-02", dtype="M8[D]"), np.array(1 + 2j)]:
        got = roundtrip(a, b, arr)
        assert got.shape == () and got.dtype == arr.dtype and got[()] == arr[()]


@pytest.mark.parametrize("order", ["C", "F"])
def test_memory_order_is_preserved(pipe, order):
    a, b = pipe
    arr = np.asarray(make("i4", (4, 5, 6)), order=order)
    got = roundtrip(a, b, arr)
    assert_same_array(got, arr)
    assert got.flags.c_contiguous == (order == "C")
    assert got.flags.f_contiguous == (order == "F")
    assert got.tobytes(order="A") == arr.tobytes(order="A")


def _noncontiguous_views():
    base = np.arange(6 * 8 * 10, dtype=np.int32).reshape(6, 8, 10)
    return {
        "step": base[::2],
        "column": base[:, 3, :],
        "stride3": base[..., ::3],
        "reversed": base[::-1, :, ::-1],
        "transpose-mixed": base.transpose(1, 0, 2),
        "transpose-2d": base[0].T,  # F-contiguous
        "fortran-slice": np.asfortranarray(base)[1:4],
        "broadcast": np.broadcast_to(np.arange(10, dtype=np.int32), (5, 10)),
        "structured-field": np.zeros(5, dtype=[("a", "i4"), ("b", "f8")])["b"],
    }


@pytest.mark.parametrize("name", list(_noncontiguous_views()))
def test_noncontiguous_arrays_are_sent_correctly(pipe, name):
    a, b = pipe
    arr = _noncontiguous_views()[name]
    got = roundtrip(a, b, arr)
    assert got.shape == arr.shape and got.dtype == arr.dtype
    assert np.array_equal(got, arr)
    # and the received array is a real, writable, contiguous array
    assert got.flags.writeable and (got.flags.c_contiguous or got.flags.f_contiguous)


# -- recv_array(out=) ---------------------------------------------------------------------


@pytest.mark.parametrize("send_order", ["C", "F"])
@pytest.mark.parametrize("out_order", ["C", "F"])
def test_recv_array_into_preallocated(pipe, send_order, out_order):
    a, b = pipe
    arr = np.asarray(make("f8", (30, 40)), order=send_order)
    out = np.full((30, 40), -1.0, order=out_order)
    got = roundtrip(a, b, arr, out=out)
    assert got is out
    np.testing.assert_array_equal(out, arr)
    assert out.flags.f_contiguous == (out_order == "F")


def test_recv_array_into_a_noncontiguous_view(pipe):
    a, b = pipe
    big = np.zeros((10, 10), dtype="i8")
    arr = np.arange(25, dtype="i8").reshape(5, 5)
    got = roundtrip(a, b, arr, out=big[::2, ::2])
    assert np.array_equal(big[::2, ::2], arr)
    assert big[1::2].sum() == 0 and big[:, 1::2].sum() == 0
    assert got.base is big


@pytest.mark.parametrize("bad", [
    np.empty((30, 41)), np.empty((40, 30)), np.empty(1200), np.empty((30, 40), dtype="f4"),
    np.empty((30, 40), dtype=">f8"), np.empty((30, 40), dtype="i8"),
], ids=["shape", "transposed-shape", "flat", "f4", "big-endian", "i8"])
def test_recv_array_out_mismatch_raises_valueerror_and_connection_stays_usable(pipe, bad):
    a, b = pipe
    arr = make("f8", (30, 40))
    a.send_array(arr)
    a.send_bytes(b"next message")
    a.send_array(arr)
    assert b.poll(T)
    before = bad.copy()
    with pytest.raises(ValueError):
        b.recv_array(out=bad)
    assert not b.closed
    assert bad.tobytes() == before.tobytes()  # untouched
    assert b.recv_bytes() == b"next message"
    assert_same_array(b.recv_array(), arr)


def test_recv_array_out_read_only_raises_and_connection_stays_usable(pipe):
    a, b = pipe
    arr = np.arange(100_000, dtype="i4")  # payload above the copy threshold
    out = np.zeros_like(arr)
    out.flags.writeable = False
    fut = background(lambda: (a.send_array(arr), a.send(("still", "here"))), on_error=conn_socket(a))
    assert b.poll(T)
    with pytest.raises(ValueError):
        b.recv_array(out=out)
    assert not out.any()
    assert b.poll(T)
    assert b.recv() == ("still", "here")
    fut.result(T)


def test_recv_array_out_large_mismatch_while_sender_is_still_sending(pipe):
    a, b = pipe
    arr = np.arange(4 << 20, dtype="f8")  # 32 MiB: more than the socket buffers
    fut = background(lambda: (a.send_array(arr), a.send_bytes(b"after")), on_error=conn_socket(a))
    assert b.poll(T)
    with pytest.raises(ValueError):
        b.recv_array(out=np.empty(4 << 20, dtype="f4"))
    assert b.poll(T)
    assert b.recv_bytes() == b"after"
    fut.result(T)


# -- plain buffer-protocol objects ------------------------------------------------------------


def test_plain_buffers(pipe):
    a, b = pipe
    cases = [
        b"raw bytes",
        bytearray(b"a bytearray"),
        b"",
        memoryview(b"0123456789abcdef")[4:],
        memoryview(array.array("d", [1.5, 2.5, 3.5, 4.5, 5.5, 6.5])).cast("B").cast("d", (2, 3)),
        memoryview(bytes(range(24))).cast("i", (2, 3)),
        memoryview(bytes(range(16))).cast("Q"),
        array.array("i", [-1, 0, 1, 2**31 - 1]),
        array.array("f", [0.5] * 1000),
    ]
    for obj in cases:
        m = memoryview(obj)
        got = roundtrip(a, b, obj)
        assert tuple(got.shape) == m.shape
        assert memoryview(got).nbytes == m.nbytes
        assert bytes(memoryview(got).cast("B")) == m.tobytes()
        assert np.dtype(got.dtype).itemsize == m.itemsize
        if m.format in ("d", "i", "Q", "f"):
            assert got.tolist() == m.tolist()


def test_plain_buffer_into_preallocated_buffers(pipe):
    a, b = pipe
    src = array.array("i", range(50))
    out = array.array("i", [0] * 50)
    assert roundtrip(a, b, src, out=out) is out
    assert out == src
    raw = bytearray(10)
    assert roundtrip(a, b, b"0123456789", out=raw) is raw
    assert raw == b"0123456789"
    # a plain buffer of the wrong size
    a.send_array(b"0123456789")
    a.send_bytes(b"ok")
    assert b.poll(T)
    with pytest.raises(ValueError):
        b.recv_array(out=bytearray(9))
    assert b.recv_bytes() == b"ok"


def test_noncontiguous_plain_buffer_is_refused_without_sending(pipe):
    a, b = pipe
    with pytest.raises(BufferError):
        a.send_array(memoryview(b"abcdefgh")[::2])
    a.send_bytes(b"clean")
    assert b.poll(T)
    assert b.recv_bytes() == b"clean"


def test_a_stdlib_style_peer_sees_two_plain_frames(pipe):
    """An array is a header frame plus a raw payload frame (readable with recv_bytes)."""
    a, b = pipe
    arr = np.arange(12, dtype="<u2").reshape(3, 4)
    a.send_array(arr)
    assert b.poll(T)
    header = b.recv_bytes()
    payload = b.recv_bytes()
    assert header.startswith(b"\x93FNA")
    assert payload == arr.tobytes()


# -- large arrays over real transports ----------------------------------------------------------


def _tcp_pair():
    l = Listener(("127.0.0.1", 0))
    c = Client(l.address, timeout=T)
    assert wait([l], T)
    s = l.accept()
    l.close()
    return c, s


def _unix_pair():
    l = Listener(f"\0fastnet-arrays-{os.getpid()}-{id(object())}")
    c = Client(l.address, timeout=T)
    assert wait([l], T)
    s = l.accept()
    l.close()
    return c, s


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_large_array_with_sender_thread(transport):
    a, b = _tcp_pair() if transport == "tcp" else _unix_pair()
    arr = np.arange(BIG // 8, dtype=np.int64)
    with a, b:
        fut = background(lambda: (a.send_array(arr), a.send_array(arr[::-1])), on_error=conn_socket(a))
        assert b.poll(T)
        out = np.empty_like(arr)
        assert b.recv_array(out=out) is out
        assert b.poll(T)
        rev = b.recv_array()
        fut.result(T)
    assert np.array_equal(out, arr)
    assert rev.shape == arr.shape and rev[0] == arr[-1] and np.array_equal(rev[::-1], arr)


SENDER_CHILD = textwrap.dedent("""
    import ast, sys, numpy as np, fastnet
    address = ast.literal_eval(sys.argv[1])
    n = int(sys.argv[2])
    with fastnet.Client(address, authkey=b"arrays", timeout=20) as c:
        arr = np.arange(n, dtype=np.float64).reshape(-1, 1024)
        c.send_array(np.asfortranarray(arr))
        c.send_bytes(fastnet.backend.encode())
        assert c.poll(20) and c.recv() == "thanks"
""")


def test_large_array_from_a_child_process():
    n = BIG // 8
    with Listener(("127.0.0.1", 0), authkey=b"arrays") as l:
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen([sys.executable, "-c", SENDER_CHILD, repr(l.address), str(n)],
                                env=env, stderr=subprocess.PIPE)
        try:
            assert wait([l], T), "child did not connect"
            with l.accept() as s:
                assert s.poll(T)
                out = np.empty((n // 1024, 1024), order="F")
                s.recv_array(out=out)
                assert s.poll(T)
                assert s.recv_bytes() == fastnet.backend.encode()
                s.send("thanks")
                assert proc.wait(T) == 0, proc.stderr.read().decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(T)
            proc.stderr.close()
    assert np.array_equal(out.ravel(order="C"), np.arange(n, dtype=np.float64))


# -- zero-copy receive and send ----------------------------------------------------------------


def _frame(payload):
    n = memoryview(payload).nbytes
    return struct.pack("!i", n) if n <= 0x7fffffff else struct.pack("!iQ", -1, n)


def test_recv_bytes_into_numpy_memory_without_a_full_size_copy():
    a_sock, b_sock = socket.socketpair()
    src = np.arange((32 << 20) // 8, dtype=np.int64)
    dst = np.zeros(src.size + 16, dtype=np.int64)
    with b_sock, fastnet.Connection(a_sock) as conn:
        def raw_sender():  # plain sendall of a memoryview: no copies on the sending side
            b_sock.sendall(_frame(src))
            b_sock.sendall(memoryview(src).cast("B"))
        fut = background(raw_sender, on_error=b_sock)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            n = conn.recv_bytes_into(dst, 64)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        fut.result(T)
    assert n == src.nbytes
    assert np.array_equal(dst[8:8 + src.size], src)
    assert not dst[:8].any() and not dst[8 + src.size:].any()
    assert peak < src.nbytes // 8, f"recv_bytes_into allocated {peak} bytes for a {src.nbytes}-byte message"


def test_recv_array_out_without_a_full_size_copy():
    from fastnet.zerocopy import encode_array
    a_sock, b_sock = socket.socketpair()
    src = np.arange((32 << 20) // 8, dtype=np.float64).reshape(-1, 512)
    out = np.empty_like(src)
    header, payload = encode_array(src)
    with b_sock, fastnet.Connection(a_sock) as conn:
        def raw_sender():
            b_sock.sendall(_frame(header) + header + _frame(src))
            b_sock.sendall(memoryview(src).cast("B"))
        fut = background(raw_sender, on_error=b_sock)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            conn.recv_array(out=out)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        fut.result(T)
    assert np.array_equal(out, src)
    assert peak < src.nbytes // 8, f"recv_array(out=) allocated {peak} bytes for {src.nbytes}"


@pytest.mark.parametrize("order", ["C", "F"])
def test_send_array_without_a_full_size_copy(order):
    a_sock, b_sock = socket.socketpair()
    src = np.asarray(np.arange((32 << 20) // 8, dtype=np.float64).reshape(-1, 512), order=order)
    got = bytearray(src.nbytes + 4096)  # allocated before tracing starts
    with a_sock, fastnet.Connection(b_sock) as conn:
        def raw_receiver():  # socket.recv_into a preallocated buffer allocates nothing
            view = memoryview(got)
            n = 0
            while True:
                r = a_sock.recv_into(view[n:])
                if not r:
                    return n
                n += r
        fut = background(raw_receiver)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            conn.send_array(src)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            conn.close()
        n = fut.result(T)
    del got[n:]
    hlen = struct.unpack("!i", got[:4])[0]
    plen = struct.unpack("!i", got[4 + hlen:8 + hlen])[0]
    assert plen == src.nbytes
    assert got[8 + hlen:] == src.tobytes(order="A")
    assert peak < src.nbytes // 8, f"send_array allocated {peak} bytes for {src.nbytes}"


# -- fastnet.send_from / fastnet.recv_into on plain sockets -------------------------------------------


def _tcp_sockets():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        c = socket.create_connection(srv.getsockname(), timeout=T)
        c.settimeout(None)
        s, _ = srv.accept()
    return c, s


@pytest.mark.parametrize("transport", ["socketpair", "tcp"])
def test_send_from_recv_into_large(transport):
    a, b = socket.socketpair() if transport == "socketpair" else _tcp_sockets()
    src = np.arange(BIG // 8, dtype=np.int64)
    dst = np.zeros_like(src)
    with a, b:
        fut = background(fastnet.send_from, src, a, on_error=a)
        assert fastnet.recv_into(dst, b) == src.nbytes
        assert fut.result(T) == src.nbytes
    assert np.array_equal(dst, src)


def test_send_from_recv_into_fortran_and_descriptors():
    a, b = socket.socketpair()
    src = np.asfortranarray(np.arange(600, dtype=np.float32).reshape(20, 30))
    dst = np.zeros((20, 30), dtype=np.float32, order="F")
    with a, b:
        assert fastnet.send_from(src, a.fileno()) == src.nbytes  # a bare descriptor works too
        assert fastnet.recv_into(dst, b.fileno()) == src.nbytes
        assert np.array_equal(dst, src)
        assert fastnet.send_from(b"plain bytes", a) == 11
        buf = bytearray(11)
        assert fastnet.recv_into(memoryview(buf), b) == 11
        assert buf == b"plain bytes"
        assert fastnet.send_from(b"", a) == 0
        assert fastnet.recv_into(bytearray(0), b) == 0


def test_send_from_refuses_noncontiguous_and_recv_into_refuses_read_only():
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises((BufferError, TypeError, ValueError)):
            fastnet.send_from(np.arange(10)[::2], a)
        with pytest.raises((BufferError, TypeError, ValueError)):
            fastnet.recv_into(b"read-only", b)
        a.sendall(b"x")
        assert b.recv(1) == b"x"  # nothing else was sent or consumed


def test_recv_into_eof_mid_transfer_reports_missing_bytes():
    a, b = socket.socketpair()
    with b:
        a.sendall(bytes(range(250)) * 4)  # 1000 of 4096 bytes
        a.close()
        dst = bytearray(4096)
        with pytest.raises(fastnet.TruncatedFrameError) as info:
            fastnet.recv_into(dst, b)
    assert info.value.missing == 3096
    assert "3096" in str(info.value)
    assert isinstance(info.value, EOFError)
    assert dst[:1000] == bytes(range(250)) * 4


def test_recv_into_eof_at_start_is_a_plain_eoferror():
    a, b = socket.socketpair()
    a.close()
    with b:
        with pytest.raises(EOFError) as info:
            fastnet.recv_into(bytearray(10), b)
    assert not isinstance(info.value, fastnet.TruncatedFrameError)


def test_recv_into_honours_the_socket_timeout():
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(0.1)
        with pytest.raises(fastnet.TimeoutError):
            fastnet.recv_into(bytearray(10), b)
        # partial data, then silence: still a timeout, not a hang
        a.sendall(b"12345")
        with pytest.raises(TimeoutError):
            fastnet.recv_into(bytearray(10), b)


def test_send_from_honours_the_socket_timeout():
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(0.2)
        with pytest.raises(fastnet.TimeoutError):
            fastnet.send_from(np.zeros(BIG // 8), a)  # nobody reads: the buffers fill


def test_send_from_and_recv_into_interoperate_with_plain_socket_calls():
    a, b = socket.socketpair()
    src = os.urandom(3 << 20)
    with a, b:
        fut = background(fastnet.send_from, src, a, on_error=a)
        got = bytearray()
        while len(got) < len(src):
            r, _, _ = select.select([b], [], [], T)
            assert r
            got += b.recv(1 << 20)
        fut.result(T)
        assert got == src
        fut = background(a.sendall, src, on_error=a)
        dst = bytearray(len(src))
        fastnet.recv_into(dst, b)
        fut.result(T)
        assert dst == src
