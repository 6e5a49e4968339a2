"""File-descriptor passing: fastnet.send_fd/recv_fd/send_fds/recv_fds and
Connection.send_fds/recv_fds, over real AF_UNIX sockets and between processes.

A passed descriptor is proved by use: bytes written through it come out of the
other end of its pipe or socket, a passed listening socket accepts, a passed
file reads back its content. Leaks are counted in /proc/self/fd.

Every blocking call is bounded: sockets of the module functions carry a
timeout (which the kernels turn into fastnet.TimeoutError), Connections are
polled before each receive, children are waited for with a timeout, and a
watchdog dumps the stacks and exits if a test still hangs.
"""
import array
import fcntl
import multiprocessing.connection as mpc
import os
import pickle
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from multiprocessing import reduction

import pytest

import fastnet
from fastnet import Client, Listener, Pipe, ProtocolError

T = 10.0  # bound on anything that should happen "at once"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(fastnet.__file__)))


WATCHDOG_SECONDS = 60


@pytest.fixture
def tmpdir_short():
    # AF_UNIX paths are limited to 107 bytes: pytest's tmp_path can be longer
    d = tempfile.mkdtemp(prefix="fnfd-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def children():
    procs = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(T)
    b.settimeout(T)
    yield a, b
    a.close()
    b.close()


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def same_file(fd1, fd2):
    s1, s2 = os.fstat(fd1), os.fstat(fd2)
    return (s1.st_dev, s1.st_ino) == (s2.st_dev, s2.st_ino)


def cloexec(fd):
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def read_exactly(fd, n):
    """n bytes from a descriptor, without blocking past T."""
    out = b""
    while len(out) < n:
        r, _, _ = select.select([fd], [], [], T)
        assert r, f"nothing to read after {T}s (got {out!r})"
        chunk = os.read(fd, n - len(out))
        assert chunk, f"EOF after {out!r}"
        out += chunk
    return out


def rx_fds(conn, *args):
    assert conn.poll(T), "nothing arrived"
    return conn.recv_fds(*args)


def rx_bytes(conn):
    assert conn.poll(T), "nothing arrived"
    return conn.recv_bytes()


def inheritable_pipe():
    """A pipe whose ends are *not* close-on-exec, so a received copy's flag is the receiver's doing."""
    r, w = os.pipe()
    os.set_inheritable(r, True)
    os.set_inheritable(w, True)
    return r, w


def spawn(children, code, *args, pass_fds=()):
    env = dict(os.environ)  # keeps FASTNET_PURE: the child runs the same kernels
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                         env=env, pass_fds=pass_fds, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    children.append(p)
    return p


def finish(p):
    try:
        out, err = p.communicate(timeout=T)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"child did not finish in {T}s: {err.decode()}")
    assert p.returncode == 0, f"child failed ({p.returncode}): {err.decode()}"
    return out.decode()


# -- module functions ---------------------------------------------------------


def test_send_fd_recv_fd_over_socketpair_pipe_end_and_socket(pair):
    a, b = pair
    r, w = os.pipe()
    x, y = socket.socketpair()
    y.settimeout(T)
    try:
        assert fastnet.send_fd(a, w) is None
        with pytest.raises(TypeError):
            fastnet.send_fd(a, x)  # a descriptor is an int, as for reduction.send_handle
        fastnet.send_fd(a, x.fileno())
        gw = fastnet.recv_fd(b)
        gx = fastnet.recv_fd(b)
        assert isinstance(gw, int) and isinstance(gx, int)
        assert gw not in (w, x.fileno()) and gx not in (w, x.fileno())
        assert same_file(gw, w) and same_file(gx, x.fileno())
        os.write(gw, b"through the received pipe end")
        assert read_exactly(r, 29) == b"through the received pipe end"
        with socket.socket(fileno=gx) as s:
            s.sendall(b"through the received socket")
        assert y.recv(100) == b"through the received socket"
        os.close(gw)
    finally:
        for f in (r, w):
            os.close(f)
        x.close()
        y.close()


def test_descriptor_arguments_may_be_ints(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        fastnet.send_fd(a.fileno(), w)
        g = fastnet.recv_fd(b.fileno())
        fastnet.send_fds(a.fileno(), [r], b"int")
        data, fds = fastnet.recv_fds(b.fileno(), 1)
        assert data == b"int" and len(fds) == 1 and same_file(fds[0], r)
        os.write(g, b"ok")
        assert os.read(fds[0], 2) == b"ok"
        os.close(g)
        os.close(fds[0])
    finally:
        os.close(r)
        os.close(w)


def test_module_functions_over_unix_path_socket_to_a_child_process(children, tmpdir_short):
    path = os.path.join(tmpdir_short, "fd.sock")
    r, w = os.pipe()
    x, y = socket.socketpair()
    y.settimeout(T)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.settimeout(T)
    try:
        srv.bind(path)
        srv.listen(1)
        p = spawn(children, """
            import os, socket, sys, fastnet
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(sys.argv[1])
            pw = fastnet.recv_fd(s)
            data, fds = fastnet.recv_fds(s, 2)
            assert data == b"the socket", data
            assert len(fds) == 1, fds
            os.write(pw, b"child %d wrote this" % os.getpid())
            with socket.socket(fileno=fds[0]) as peer:
                peer.sendall(b"ping from the child")
            print(fastnet.backend)
        """, path)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(T)
            fastnet.send_fd(conn, w)
            assert fastnet.send_fds(conn, [x.fileno()], b"the socket") == 10
            out = finish(p)
        assert out.strip() == fastnet.backend
        msg = b"child %d wrote this" % p.pid
        assert read_exactly(r, len(msg)) == msg
        assert y.recv(100) == b"ping from the child"
    finally:
        srv.close()
        x.close()
        y.close()
        os.close(r)
        os.close(w)


def test_several_descriptors_with_data(pair):
    a, b = pair
    r, w = os.pipe()
    x, y = socket.socketpair()
    try:
        assert fastnet.send_fds(a, [r, w, x.fileno()], data=b"three descriptors") == 17
        data, fds = fastnet.recv_fds(b, 3)
        assert data == b"three descriptors"
        assert len(fds) == 3
        assert same_file(fds[0], r) and same_file(fds[1], w) and same_file(fds[2], x.fileno())
        os.write(fds[1], b"abc")
        assert os.read(fds[0], 3) == b"abc"
        for f in fds:
            os.close(f)
        # the default data is multiprocessing's: one byte, the count
        assert fastnet.send_fds(a, (w, r)) == 1
        data, fds = fastnet.recv_fds(b, 253)
        assert data == b"\x02" and len(fds) == 2
        assert same_file(fds[0], w) and same_file(fds[1], r)
        for f in fds:
            os.close(f)
        # data of any buffer, larger than one read of recv_fds' default
        payload = bytes(range(256)) * 40
        assert fastnet.send_fds(a, [w], memoryview(payload)) == len(payload)
        data, fds = fastnet.recv_fds(b, 1, 65536)
        assert len(fds) == 1 and same_file(fds[0], w)
        while len(data) < len(payload):
            data += b.recv(len(payload) - len(data))
        assert data == payload
        os.close(fds[0])
    finally:
        for f in (r, w):
            os.close(f)
        x.close()
        y.close()


def test_the_same_descriptor_many_times_in_one_message(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        fastnet.send_fds(a, [w] * fastnet.fdpass.MAX_FDS, b"many")
        data, fds = fastnet.recv_fds(b, fastnet.fdpass.MAX_FDS)
        assert data == b"many" and len(fds) == 253 and len(set(fds)) == 253
        assert all(same_file(f, w) for f in fds)
        for f in fds:
            os.close(f)
    finally:
        os.close(r)
        os.close(w)


def test_received_descriptors_are_close_on_exec(pair):
    a, b = pair
    r, w = inheritable_pipe()
    try:
        assert not cloexec(w) and not cloexec(r)
        fastnet.send_fd(a, w)
        g = fastnet.recv_fd(b)
        fastnet.send_fds(a, [r, w], b"two")
        _, fds = fastnet.recv_fds(b, 2)
        for f in [g] + fds:
            assert cloexec(f)
            os.close(f)
        assert not cloexec(w)  # the sender's copy is untouched
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("nsent,maxfds", [(5, 1), (2, 1), (10, 3), (4, 3), (253, 1), (253, 252)])
def test_more_descriptors_than_maxfds_raise_and_close_all(pair, nsent, maxfds):
    # CMSG_SPACE's alignment leaves room for an extra descriptor when maxfds is
    # odd: that one must not slip through either
    a, b = pair
    r, w = os.pipe()
    try:
        before = open_fds()
        fastnet.send_fds(a, [w] * nsent, b"x")
        with pytest.raises(ProtocolError):
            fastnet.recv_fds(b, maxfds)
        assert open_fds() == before
        fastnet.send_fds(a, [w] * nsent)
        with pytest.raises(ProtocolError):
            fastnet.recv_fd(b) if maxfds == 1 else fastnet.recv_fds(b, maxfds, 1)
        assert open_fds() == before
        # the socket is still in step: the next message comes through whole
        fastnet.send_fd(a, w)
        g = fastnet.recv_fd(b)
        assert same_file(g, w)
        os.close(g)
        assert open_fds() == before
    finally:
        os.close(r)
        os.close(w)


def test_recv_fd_of_a_message_without_descriptor_is_a_protocol_error(pair):
    a, b = pair
    a.sendall(b"?")
    with pytest.raises(ProtocolError):
        fastnet.recv_fd(b)
    a.sendall(b"plain")
    assert fastnet.recv_fds(b, 4) == (b"plain", [])


def test_eof_raises_eoferror(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        fastnet.send_fd(a, w)
        a.close()
        g = fastnet.recv_fd(b)  # what was sent before the close still arrives
        os.close(g)
        with pytest.raises(EOFError):
            fastnet.recv_fd(b)
        with pytest.raises(EOFError):
            fastnet.recv_fds(b, 3)
        with pytest.raises(EOFError):
            fastnet.recv_fds(b.fileno(), 3)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("timeout", [0.0, 0.05])
def test_receive_timeout_is_fastnet_timeouterror(pair, timeout):
    a, b = pair
    r, w = os.pipe()
    try:
        b.settimeout(timeout)
        with pytest.raises(fastnet.TimeoutError) as info:
            fastnet.recv_fd(b)
        assert isinstance(info.value, TimeoutError)
        with pytest.raises(fastnet.TimeoutError):
            fastnet.recv_fds(b, 2)
        # nothing was lost: the socket works afterwards
        b.settimeout(T)
        fastnet.send_fd(a, w)
        g = fastnet.recv_fd(b)
        assert same_file(g, w)
        os.close(g)
    finally:
        os.close(r)
        os.close(w)


def test_send_timeout_when_the_peer_does_not_read(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        a.settimeout(0.05)
        sent = 0
        with pytest.raises(fastnet.TimeoutError):
            for _ in range(100000):
                fastnet.send_fd(a, w)
                sent += 1
        assert sent > 0
        before = open_fds()
        for _ in range(sent):
            os.close(fastnet.recv_fd(b))
        assert open_fds() == before
        b.settimeout(0.0)
        with pytest.raises(fastnet.TimeoutError):
            fastnet.recv_fd(b)
    finally:
        os.close(r)
        os.close(w)


def test_bad_arguments(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError):
            fastnet.send_fds(a, [])
        with pytest.raises(ValueError):
            fastnet.send_fds(a, [w] * 254)
        with pytest.raises(ValueError):
            fastnet.send_fds(a, [w], b"")
        with pytest.raises(ValueError):
            fastnet.recv_fds(b, 0)
        with pytest.raises(ValueError):
            fastnet.recv_fds(b, 254)
        with pytest.raises(ValueError):
            fastnet.recv_fds(b, 1, 0)
        with pytest.raises(OSError):
            fastnet.send_fd(a, 10 ** 6)  # not an open descriptor: EBADF
        c, d = socket.socketpair()
        c.close()
        with pytest.raises(OSError):
            fastnet.send_fd(c, w)
        with pytest.raises(OSError):
            fastnet.recv_fd(c)
        d.close()
        # none of it put anything on the wire
        a.sendall(b"!")
        assert fastnet.recv_fds(b, 1) == (b"!", [])
    finally:
        os.close(r)
        os.close(w)


# -- interoperability with multiprocessing.reduction --------------------------


def test_fastnet_send_fd_to_reduction_recv_handle_in_process(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        fastnet.send_fd(a, w)
        g = reduction.recv_handle(b)
        assert same_file(g, w)
        os.close(g)
        fastnet.send_fds(a, [r, w])  # the default count byte is what recvfds checks
        fds = reduction.recvfds(b, 2)
        assert len(fds) == 2 and same_file(fds[0], r) and same_file(fds[1], w)
        for f in fds:
            os.close(f)
    finally:
        os.close(r)
        os.close(w)


def test_reduction_send_handle_to_fastnet_recv_fd_in_process(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        reduction.send_handle(a, w, os.getpid())
        g = fastnet.recv_fd(b)
        assert same_file(g, w) and cloexec(g)
        os.close(g)
        reduction.sendfds(a, [w, r])
        data, fds = fastnet.recv_fds(b, 2)
        assert data == b"\x02" and same_file(fds[0], w) and same_file(fds[1], r)
        for f in fds:
            os.close(f)
    finally:
        os.close(r)
        os.close(w)


def test_fastnet_send_fd_to_reduction_recv_handle_in_a_child(children, pair):
    a, b = pair
    r, w = os.pipe()
    try:
        p = spawn(children, """
            import os, socket, sys
            from multiprocessing import reduction
            s = socket.socket(fileno=int(sys.argv[1]))
            s.settimeout(10)
            fd = reduction.recv_handle(s)
            os.write(fd, b"written by a multiprocessing child")
        """, b.fileno(), pass_fds=[b.fileno()])
        fastnet.send_fd(a, w)
        finish(p)
        assert read_exactly(r, 34) == b"written by a multiprocessing child"
    finally:
        os.close(r)
        os.close(w)


def test_reduction_send_handle_in_a_child_to_fastnet_recv_fd(children, pair, tmpdir_short):
    a, b = pair
    p = spawn(children, """
        import os, socket, sys, tempfile
        from multiprocessing import reduction
        s = socket.socket(fileno=int(sys.argv[1]))
        fd, name = tempfile.mkstemp(dir=sys.argv[2])
        os.write(fd, b"a file opened by the child")
        reduction.send_handle(s, fd, os.getppid())
        os.close(fd)
    """, a.fileno(), tmpdir_short, pass_fds=[a.fileno()])
    g = fastnet.recv_fd(b)
    finish(p)
    try:
        assert cloexec(g)
        assert os.pread(g, 100, 0) == b"a file opened by the child"
    finally:
        os.close(g)


# -- Connection.send_fds / recv_fds -----------------------------------------


def test_connection_pipe_send_fds_recv_fds():
    r, w = os.pipe()
    x, y = socket.socketpair()
    y.settimeout(T)
    a, b = Pipe()
    try:
        assert a.send_fds([w, x.fileno()]) is None
        a.send_fds([w], b"with data")
        a.send_fds((r,), bytearray(b"a bytearray"))
        data, fds = rx_fds(b)
        assert data == b"" and len(fds) == 2
        assert same_file(fds[0], w) and same_file(fds[1], x.fileno())
        assert all(cloexec(f) for f in fds)
        os.write(fds[0], b"pipe")
        assert read_exactly(r, 4) == b"pipe"
        with socket.socket(fileno=fds[1]) as s:
            s.sendall(b"sock")
        assert y.recv(4) == b"sock"
        data, fds2 = rx_fds(b, 1)
        assert data == b"with data" and len(fds2) == 1 and same_file(fds2[0], w)
        data, fds3 = rx_fds(b)
        assert data == b"a bytearray" and same_file(fds3[0], r)
        # the descriptors are the caller's: traffic and close() leave them alone
        b.send_bytes(b"back")
        assert rx_bytes(a) == b"back"
        a.close()
        b.close()
        assert is_open(fds[0]) and is_open(fds2[0]) and is_open(fds3[0])
        for f in (fds[0], fds2[0], fds3[0]):
            os.close(f)
    finally:
        a.close()
        b.close()
        for f in (r, w):
            os.close(f)
        x.close()
        y.close()


def test_connection_listener_client_child_sends_listening_socket_and_file(children, tmpdir_short):
    path = os.path.join(tmpdir_short, "conn.sock")
    with Listener(path) as l:
        p = spawn(children, """
            import os, socket, sys, tempfile
            import fastnet
            c = fastnet.Client(sys.argv[1], timeout=10)
            lsock = socket.socket()
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(4)
            c.send_fds([lsock.fileno()], str(lsock.getsockname()[1]).encode())
            fd, name = tempfile.mkstemp(dir=sys.argv[2])
            os.write(fd, b"content of the child's file")
            c.send_fds([fd], b"file")
            os.close(fd)
            os.unlink(name)
            lsock.close()
            assert c.poll(10)
            assert c.recv() == "done"
            c.close()
        """, path, tmpdir_short)
        assert fastnet.wait([l], T) == [l], "the child did not connect"
        with l.accept() as conn:
            data, fds = rx_fds(conn)
            port = int(data)
            assert len(fds) == 1 and cloexec(fds[0])
            with socket.socket(fileno=fds[0]) as lsock:
                lsock.settimeout(T)
                assert lsock.getsockname() == ("127.0.0.1", port)
                with socket.create_connection(("127.0.0.1", port), T) as cli:
                    srv, _ = lsock.accept()
                    with srv:
                        srv.settimeout(T)
                        cli.sendall(b"hello listener")
                        assert srv.recv(100) == b"hello listener"
            data, fds = rx_fds(conn)
            assert data == b"file" and len(fds) == 1
            try:
                assert os.pread(fds[0], 100, 0) == b"content of the child's file"
            finally:
                os.close(fds[0])
            conn.send("done")
            finish(p)


SENDER = """
    import os, socket, sys, fastnet
    size = int(sys.argv[2])
    c = fastnet.Connection(socket.socket(fileno=int(sys.argv[1])))
    files = [os.open(name, os.O_RDONLY) for name in sys.argv[3:6]]
    c.send_bytes(b"p" * size)
    c.send_fds([files[0]], b"1" * size)
    c.send_bytes(b"q" * size)
    c.send_fds([files[1], files[2]], b"2" * size)
    c.send_bytes(b"r" * size)
    c.close()
"""


@pytest.fixture
def three_files(tmpdir_short):
    names = []
    for word in ("one", "two", "three"):
        name = os.path.join(tmpdir_short, word)
        with open(name, "wb") as f:
            f.write(word.encode())
        names.append(name)
    return names


def contents(fds):
    out = [os.pread(f, 100, 0).decode() for f in fds]
    for f in fds:
        os.close(f)
    return out


@pytest.mark.parametrize("size", [1, 3000, 20000, 300000])
def test_read_ahead_keeps_descriptors_with_their_frame(children, three_files, size):
    baseline = open_fds()
    s1, s2 = socket.socketpair()  # s1 goes to the child
    p = spawn(children, SENDER, s1.fileno(), size, *three_files, pass_fds=[s1.fileno()])
    s1.close()
    if size * 5 < 150000:
        finish(p)  # everything was sent before the receiver reads anything
    with fastnet.Connection(s2) as conn:
        got = []
        for _ in range(5):
            data, fds = rx_fds(conn)
            got.append((data[:1], len(data), contents(fds)))
        assert got == [(b"p", size, []), (b"1", size, ["one"]), (b"q", size, []),
                       (b"2", size, ["two", "three"]), (b"r", size, [])]
        with pytest.raises(EOFError):
            conn.poll(T)
            conn.recv_fds()
    finish(p)
    assert open_fds() == baseline


@pytest.mark.parametrize("size", [1, 20000])
def test_read_ahead_unclaimed_descriptors_do_not_move_to_the_next_frame(children, three_files, size):
    baseline = open_fds()
    s1, s2 = socket.socketpair()
    p = spawn(children, SENDER, s1.fileno(), size, *three_files, pass_fds=[s1.fileno()])
    s1.close()
    finish(p)
    with fastnet.Connection(s2) as conn:
        assert rx_fds(conn) == (b"p" * size, [])
        assert rx_bytes(conn) == b"1" * size  # its descriptor is never claimed
        assert rx_fds(conn) == (b"q" * size, [])
        data, fds = rx_fds(conn)
        assert data == b"2" * size and contents(fds) == ["two", "three"]
        assert rx_fds(conn) == (b"r" * size, [])
        assert open_fds() <= baseline + 1
    assert open_fds() == baseline


def test_read_ahead_in_process_with_pipe():
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    a, b = Pipe()
    try:
        a.send_bytes(b"plain 1")
        a.send_fds([w1], b"fd frame 1")
        a.send_bytes(b"plain 2")
        a.send_fds([w2, r1], b"fd frame 2")
        a.send(["plain", 3])
        assert rx_fds(b) == (b"plain 1", [])
        data, fds1 = rx_fds(b)
        assert data == b"fd frame 1" and len(fds1) == 1 and same_file(fds1[0], w1)
        assert rx_fds(b) == (b"plain 2", [])
        data, fds2 = rx_fds(b)
        assert data == b"fd frame 2" and len(fds2) == 2
        assert same_file(fds2[0], w2) and same_file(fds2[1], r1)
        data, fds3 = rx_fds(b)
        assert pickle.loads(data) == ["plain", 3] and fds3 == []
        for f in fds1 + fds2:
            os.close(f)
    finally:
        a.close()
        b.close()
        for f in (r1, w1, r2, w2):
            os.close(f)


@pytest.mark.parametrize("how", ["recv_bytes", "recv", "recv_bytes_into"])
def test_unclaimed_descriptors_are_closed(how):
    r, w = os.pipe()
    try:
        baseline = open_fds()
        a, b = Pipe()
        highest = open_fds()
        buf = bytearray(100)
        for i in range(100):
            msg = pickle.dumps(("message", i))
            a.send_fds([w, r] if i % 2 else [w], msg)
            assert b.poll(T)
            if how == "recv_bytes":
                assert b.recv_bytes() == msg
            elif how == "recv":
                assert b.recv() == ("message", i)
            else:
                n = b.recv_bytes_into(buf)
                assert bytes(buf[:n]) == msg
            highest = max(highest, open_fds())
        assert highest <= baseline + 2 + 4, f"{highest - baseline - 2} descriptors held"
        a.send_fds([w, r], b"never received")
        a.send_fds([r], b"nor this")
        assert b.poll(T)
        a.close()
        b.close()
        assert open_fds() == baseline
    finally:
        os.close(r)
        os.close(w)


def test_connection_more_descriptors_than_maxfds_raise_and_leak_nothing():
    r, w = os.pipe()
    try:
        baseline = open_fds()
        a, b = Pipe()
        a.send_fds([w, r, w], b"three")
        assert b.poll(T)
        with pytest.raises(ProtocolError):
            b.recv_fds(maxfds=2)
        assert b.closed  # the stream cannot be trusted any more
        assert open_fds() == baseline + 1
        a.close()
        assert open_fds() == baseline
    finally:
        os.close(r)
        os.close(w)


def test_stdlib_peer_receives_fd_frames_as_ordinary_bytes():
    r, w = os.pipe()
    s1, s2 = socket.socketpair()
    try:
        baseline = open_fds()
        a = fastnet.Connection(s1)
        std = mpc.Connection(s2.detach())
        with a, std:
            a.send_bytes(b"before")
            a.send_fds([w], b"with a descriptor")
            a.send_fds([w, r], b"")
            a.send_fds([r], pickle.dumps({"obj": [1, 2]}))
            a.send_fds([w], b"x" * 100000)
            a.send_bytes(b"after")
            got = []
            for _ in range(6):
                assert std.poll(T)
                got.append(std.recv_bytes())
            assert got[:3] == [b"before", b"with a descriptor", b""]
            assert pickle.loads(got[3]) == {"obj": [1, 2]}
            assert got[4:] == [b"x" * 100000, b"after"]
            assert open_fds() == baseline  # the kernel dropped what plain reads did not take
    finally:
        os.close(r)
        os.close(w)


def test_stdlib_client_in_a_child_receives_fd_frames_as_bytes(children, tmpdir_short):
    path = os.path.join(tmpdir_short, "std.sock")
    r, w = os.pipe()
    try:
        with Listener(path) as l:
            p = spawn(children, """
                import sys
                from multiprocessing.connection import Client
                c = Client(sys.argv[1])
                for _ in range(3):
                    print(repr(c.recv_bytes()))
                print(c.recv())
            """, path)
            assert fastnet.wait([l], T) == [l]
            with l.accept() as conn:
                conn.send_bytes(b"plain")
                conn.send_fds([w], b"descriptor frame")
                conn.send_fds([w, r], b"")
                conn.send({"still": "in step"})
                out = finish(p)
        assert out.splitlines() == ["b'plain'", "b'descriptor frame'", "b''", "{'still': 'in step'}"]
    finally:
        os.close(r)
        os.close(w)


def test_send_fds_on_a_tcp_connection_is_a_valueerror():
    r, w = os.pipe()
    try:
        with Listener(("127.0.0.1", 0)) as l:
            with Client(l.address, timeout=T) as c:
                assert fastnet.wait([l], T) == [l]
                with l.accept() as s:
                    with pytest.raises(ValueError):
                        c.send_fds([w], b"x")
                    with pytest.raises(ValueError):
                        s.send_fds([w])
                    # nothing went out: the connection is still usable
                    c.send_bytes(b"still fine")
                    assert rx_bytes(s) == b"still fine"
    finally:
        os.close(r)
        os.close(w)


def test_connection_send_fds_bad_counts():
    r, w = os.pipe()
    a, b = Pipe()
    try:
        with pytest.raises(ValueError):
            a.send_fds([])
        with pytest.raises(ValueError):
            a.send_fds([w] * 254)
        a.send_bytes(b"in step")
        assert rx_fds(b) == (b"in step", [])
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)


def test_kernel_in_use():
    pure = os.environ.get("FASTNET_PURE", "").strip().lower() not in ("", "0", "false", "no")
    assert fastnet.backend == ("python" if pure else "cython")
    mod = fastnet.fdpass._fdpass
    assert mod.__name__ == ("fastnet._pure.fdpass" if pure else "fastnet._c.fdpass")
    assert fastnet.send_fd is mod.send_fd and fastnet.recv_fds is mod.recv_fds
    assert array.array("i").itemsize == 4
