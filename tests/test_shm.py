"""Same-host arrays through shared memory (fastnet.shm): real AF_UNIX
sockets, real processes, real memfd segments.

The receiver's array lives over the mapping and outlives a SIGKILLed sender;
a SIGKILLed receiver gives its segment back to the sender's pool; the pool
never overwrites a segment a receiver still maps; nothing appears in
/dev/shm; a peer that sends a descriptor that is not a sealed memfd, or a
size beyond the limit, gets a clear error, the connection that received it is
closed and no descriptor leaks; a TCP or stdlib peer gets ordinary frames.
"""
import fcntl
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import socket
import threading

import pytest

np = pytest.importorskip("numpy")

import fastnet  # noqa: E402
from fastnet import Client, Listener, MessageTooLarge, Pipe, ProtocolError, shm, zerocopy  # noqa: E402
from rpcutil import segment_mappings, wait_for  # noqa: E402

pytestmark = pytest.mark.skipif(not shm.available(), reason="memfd_create with sealing is Linux-only")

T = 10.0
WATCHDOG_SECONDS = 120
CTX = mp.get_context("fork")


def _fds():
    return len(os.listdir("/proc/self/fd"))


def _dev_shm():
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.fixture(autouse=True)
def fresh_pool():
    shm.pool.clear()
    yield
    shm.pool.clear()


@pytest.mark.parametrize("arr", [
    np.arange(300_000, dtype=np.float64),
    np.arange(60_000, dtype=np.int32).reshape(200, 300),
    np.asfortranarray(np.arange(60_000, dtype=np.float32).reshape(300, 200)),
    np.arange(100, dtype=np.uint8)[::3],            # non-contiguous: copied in C order
    np.zeros((0, 4)),
    np.array([(1, 2.5)], dtype=[("a", "i4"), ("b", "f8")]),
], ids=["f8", "i4-2d", "f4-fortran", "strided", "empty", "structured"])
def test_round_trip(arr):
    a, b = Pipe()
    with a, b:
        a.send_array(arr, shm=True)
        got = b.recv_array()
        assert got.dtype == arr.dtype and got.shape == arr.shape
        assert np.array_equal(got, arr)
        if arr.nbytes:
            assert got.flags.writeable
            assert shm._is_mapping(got)   # over the mapping, not a copy
        a.send_array(arr, shm=True)
        out = np.empty_like(arr)
        assert b.recv_array(out=out) is out
        assert np.array_equal(out, arr)


def _send_n(path, n):
    with Client(path) as c:
        arr = np.arange(shm.THRESHOLD // 8, dtype=np.float64)
        for i in range(n):
            c.send_array(arr + i, shm=True)
        c.recv_bytes()


def test_received_arrays_hold_no_descriptor(tmp_path):
    # a process may keep any number of received arrays (a Dask worker's chunks)
    with Listener(str(tmp_path / "s.sock")) as lst:
        p = CTX.Process(target=_send_n, args=(lst.address, 40))
        p.start()
        with lst.accept() as c:
            before = _fds()
            kept = [c.recv_array() for _ in range(40)]
            assert _fds() == before
            c.send_bytes(b"done")
        p.join(T)
    assert all(shm._is_mapping(k) and k[0] == i for i, k in enumerate(kept))
    kept[3][0] = -1.0       # writeable, and each its own mapping
    assert kept[3][0] == -1.0 and kept[4][0] == 4.0


def test_plain_buffers_without_numpy_types():
    a, b = Pipe()
    with a, b:
        a.send_array(memoryview(bytearray(b"0123456789" * 1000)).cast("B", (100, 100)), shm=True)
        got = b.recv_array()
        assert got.shape == (100, 100)
        assert bytes(got[0]) == b"0123456789" * 10


def test_connection_option_uses_the_threshold():
    a, b = Pipe(shm=True)
    with a, b:
        small = np.arange(10.0)
        big = np.arange(shm.THRESHOLD // 8 + 1, dtype=np.float64)
        a.send_array(small)
        got = b.recv_array()
        assert not shm._is_mapping(got) and np.array_equal(got, small)   # ordinary frames
        a.send_array(big)
        got = b.recv_array()
        assert shm._is_mapping(got)
        assert np.array_equal(got, big)
        # too large for the socket's buffer: sent from a thread while this one receives
        t = threading.Thread(target=a.send_array, args=(big,), kwargs={"shm": False})
        t.start()
        got = b.recv_array()
        t.join(T)
        assert not shm._is_mapping(got) and np.array_equal(got, big)


def test_pool_reuses_only_segments_the_receiver_dropped():
    a, b = Pipe()
    with a, b:
        first = np.full(1 << 18, 1.0)
        a.send_array(first, shm=True)
        held = b.recv_array()
        assert shm.pool.segments == 1 and shm.pool.idle() == 0
        # the receiver still maps the first segment: the next send takes another
        a.send_array(np.full(1 << 18, 2.0), shm=True)
        second = b.recv_array()
        assert shm.pool.segments == 2
        assert (held == 1.0).all() and (second == 2.0).all()
        del second                     # its mapping is gone: that segment is free again
        assert shm.pool.idle() == 1
        a.send_array(np.full(1 << 18, 3.0), shm=True)
        third = b.recv_array()
        assert shm.pool.segments == 2  # reused, not a third one
        assert (held == 1.0).all() and (third == 3.0).all()
        # out= copies and lets go of the segment at once
        out = np.empty(1 << 18)
        del third
        a.send_array(np.full(1 << 18, 4.0), shm=True)
        b.recv_array(out=out)
        assert (out == 4.0).all() and shm.pool.idle() == 1


def _unmapping_thread():
    return "fastnet-shm-unmap" in [t.name for t in threading.enumerate()]


def test_large_mapping_is_unmapped_for_the_thread_that_drops_it():
    big = np.arange(shm.UNMAP_IN_BACKGROUND // 8, dtype=np.float64)
    a, b = Pipe()
    with a, b:
        a.send_array(big, shm=True)
        got = b.recv_array()
        assert shm._is_mapping(got) and np.array_equal(got, big)
        assert shm.pool.idle() == 0 and _unmapping_thread()
        del got
        # unmapped on the module's own thread: the segment comes back a moment later
        assert wait_for(lambda: shm.pool.idle() == 1)
        # and with no large mapping left, the thread ends (no thread left behind)
        assert wait_for(lambda: not _unmapping_thread())
        # out= lets go of it before returning, however large
        out = np.empty_like(big)
        a.send_array(big, shm=True)
        assert b.recv_array(out=out) is out and np.array_equal(out, big)
        assert shm.pool.segments == 1 and shm.pool.idle() == 1


def test_forked_child_unmaps_without_the_parents_thread():
    big = np.arange(shm.UNMAP_IN_BACKGROUND // 8, dtype=np.float64)
    a, b = Pipe()
    with a, b:
        a.send_array(big, shm=True)
        del big
        b.recv_array()                 # starts the unmapping thread here
        assert wait_for(lambda: shm.pool.idle() == 1)
        pid = os.fork()
        if pid == 0:
            # the thread did not come along: what the child drops is still unmapped
            before = segment_mappings()
            got = b.recv_array()
            ok = got[-1] == got.size - 1 and segment_mappings() == before + 1
            del got
            os._exit(0 if ok and wait_for(lambda: segment_mappings() == before) else 1)
        a.send_array(np.arange(shm.UNMAP_IN_BACKGROUND // 8, dtype=np.float64), shm=True)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert wait_for(lambda: shm.pool.idle() == 1)


def _send_then_die(path, nelem):
    with Client(path) as c:
        c.send_array(np.arange(nelem, dtype=np.float64), shm=True)
        assert c.recv_bytes() == b"sent"
        os.kill(os.getpid(), signal.SIGKILL)


def test_array_outlives_a_sigkilled_sender(tmp_path):
    before = _dev_shm()
    nelem = 1 << 20
    with Listener(str(tmp_path / "s.sock")) as lst:
        p = CTX.Process(target=_send_then_die, args=(lst.address, nelem))
        p.start()
        with lst.accept() as c:
            c.send_bytes(b"sent")
            p.join(T)
            assert p.exitcode == -signal.SIGKILL
            got = c.recv_array()         # the sender is dead; its segment is not
            assert np.array_equal(got, np.arange(nelem, dtype=np.float64))
            got[:] = 7.0                  # and it is the receiver's to use
            assert (got == 7.0).all()
    del got
    assert _dev_shm() == before


def _receive_then_wait(path):
    with Client(path) as c:
        got = c.recv_array()
        c.send_bytes(b"mapped %d" % int(got[-1]))
        c.recv_bytes()                   # never comes: killed while mapping


def test_sigkilled_receiver_gives_the_segment_back(tmp_path):
    before = _dev_shm()
    with Listener(str(tmp_path / "r.sock")) as lst:
        p = CTX.Process(target=_receive_then_wait, args=(lst.address,))
        p.start()
        with lst.accept() as c:
            c.send_array(np.arange(1 << 18, dtype=np.float64), shm=True)
            assert c.poll(T) and c.recv_bytes() == b"mapped %d" % ((1 << 18) - 1)
            assert shm.pool.idle() == 0    # the receiver holds it
            os.kill(p.pid, signal.SIGKILL)
            p.join(T)
            assert shm.pool.idle() == 1    # its mapping died with it
    assert _dev_shm() == before


def _raw_channel(conn):
    return conn._ch


def _bad_segment_case(kind):
    """A header frame claiming 1 MiB of float64 and the bad descriptor ``kind`` riding on it."""
    header, _ = zerocopy.encode_array(np.empty(1 << 17))
    header = shm.shm_header(header)
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return header, r
    if kind == "file":
        fd = os.open("/etc/hostname" if os.path.exists("/etc/hostname") else "/proc/self/stat", os.O_RDONLY)
        return header, fd
    fd = os.memfd_create("t", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    if kind == "unsealed":
        os.ftruncate(fd, 1 << 20)
    elif kind == "small":
        os.ftruncate(fd, 4096)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return header, fd


@pytest.mark.parametrize("kind,message", [
    ("pipe", "not a memfd"), ("file", "not a memfd"),
    ("unsealed", "not sealed"), ("small", "holds 4096 bytes"),
])
def test_bad_descriptors_are_refused(kind, message):
    a, b = Pipe()
    with a:
        header, fd = _bad_segment_case(kind)
        try:
            _raw_channel(a).send_frame_fds(header, [fd])
        finally:
            os.close(fd)
        before = _fds()
        with pytest.raises(ProtocolError, match=message):
            b.recv_array()
        assert b.closed                  # only this connection goes
        assert _fds() == before - 1      # its socket; the received descriptor was closed too
        assert not a.closed              # the other end is not this end's to close


def test_size_beyond_the_limit_is_refused():
    a, b = Pipe(max_message_size=1 << 20)
    with a:
        a.send_array(np.empty(1 << 18), shm=True)   # 2 MiB
        before = _fds()
        with pytest.raises(MessageTooLarge, match="exceeds max_message_size"):
            b.recv_array()
        assert b.closed
        assert _fds() == before - 1


def test_descriptor_on_an_ordinary_header_is_refused():
    a, b = Pipe()
    with a:
        header, payload = zerocopy.encode_array(np.arange(4.0))
        r, w = os.pipe()
        try:
            _raw_channel(a).send_frame_fds(header, [r])
            a.send_bytes(payload)
        finally:
            os.close(r)
            os.close(w)
        before = _fds()
        with pytest.raises(ProtocolError, match="descriptor came with an array header"):
            b.recv_array()
        assert b.closed and _fds() == before - 1


def test_old_peer_rejects_the_shm_header_cleanly():
    header, _ = zerocopy.encode_array(np.arange(4.0))
    with pytest.raises(ProtocolError, match="unsupported array header version 2"):
        zerocopy.decode_array_header(shm.shm_header(header))


def _stdlib_tcp_peer(address_q, result_q):
    with mpc.Listener(("127.0.0.1", 0)) as lst:
        address_q.put(lst.address)
        with lst.accept() as c:
            result_q.put([c.recv_bytes(), c.recv_bytes()])


def test_tcp_peer_gets_ordinary_frames():
    aq, rq = CTX.Queue(), CTX.Queue()
    p = CTX.Process(target=_stdlib_tcp_peer, args=(aq, rq))
    p.start()
    arr = np.arange(shm.THRESHOLD // 8 * 2, dtype=np.float64)
    with Client(aq.get(timeout=T), shm=True) as c:
        c.send_array(arr, shm=True)
        header, payload = rq.get(timeout=T)
    p.join(T)
    assert header[4] == zerocopy.VERSION
    assert payload == arr.tobytes()


def test_unix_connection_without_shm_sends_ordinary_frames_to_a_stdlib_peer():
    a, b = socket.socketpair()
    fa = fastnet.Connection(a)
    sb = mpc.Connection(b.detach())
    with fa, sb:
        t = threading.Thread(target=fa.send_array, args=(np.arange(shm.THRESHOLD // 8 * 2, dtype=np.float64),))
        t.start()
        assert sb.recv_bytes()[4] == zerocopy.VERSION
        assert len(sb.recv_bytes()) == shm.THRESHOLD * 2
        t.join(T)


def test_empty_array_is_sent_without_a_copy_and_shared():
    a, b = Pipe()
    with a, b:
        arr = shm.empty((1000, 100))
        arr[...] = 5.0
        a.send_array(arr, shm=True)
        got = b.recv_array()
        assert (got == 5.0).all()
        # the documented sharing: one segment, seen by both sides
        arr[0, 0] = 6.0
        assert got[0, 0] == 6.0
        assert shm.pool.segments == 0      # lent to the array, not in the pool
        del arr
        assert shm.pool.segments == 1 and shm.pool.idle() == 0   # back, but the receiver maps it
        del got
        assert shm.pool.idle() == 1
        again = shm.empty((1000, 100))
        assert shm.pool.segments == 0      # the same segment, reused
        del again


def test_forked_child_does_not_reuse_the_parents_segments():
    a, b = Pipe()
    with a, b:
        a.send_array(np.arange(1000.0), shm=True)
        b.recv_array(out=np.empty(1000))
        assert shm.pool.segments == 1
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, b"%d" % shm.pool.segments)
            os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(r, 10) == b"0"
        os.close(r)
        os.close(w)


_WITHOUT_PROC = r"""
import os, sys
import numpy as np
from fastnet import Pipe, shm
assert not os.path.exists("/proc/self/fd")
a, b = Pipe()
with a, b:
    a.send_array(np.full(1 << 18, 1.0), shm=True)
    held = b.recv_array()
    a.send_array(np.full(1 << 18, 2.0), shm=True)
    second = b.recv_array()
    del second
    a.send_array(np.full(1 << 18, 3.0), shm=True)
    third = b.recv_array()
    # without /proc the sender cannot tell when a receiver is done with a
    # segment, so it never reuses one: what a receiver holds is never overwritten
    assert (held == 1.0).all() and (third == 3.0).all()
    assert shm.pool.segments == 0
print("ok")
"""


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/unshare"),
                    reason="needs root and unshare(1) to hide /proc in a mount namespace")
def test_without_proc_segments_work_and_are_never_reused():
    import subprocess
    import sys
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'umount -l /proc && exec "$0" -c "$1"', sys.executable, _WITHOUT_PROC],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
