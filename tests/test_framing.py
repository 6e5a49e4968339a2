"""The framing kernel, compiled and pure, tested side by side.

Both ``fastnet._c.framing`` and ``fastnet._pure.framing`` are imported
directly (whatever FASTNET_PURE says) and every test runs against each; a
differential test feeds both decoders the same bytes and compares everything
they say. Channel tests use real socketpairs and TCP loopback connections.
"""
import array
import multiprocessing.connection as mpc
import os
import signal
import socket
import struct
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

import fastnet._c.framing as cframing
import fastnet._pure.framing as pframing
from fastnet.errors import (BufferTooShort, FastnetError, MessageTooLarge, ProtocolError,
                            TimeoutError as FastnetTimeout, TruncatedFrameError)

MiB = 1 << 20


@pytest.fixture(scope="module")
def fr(kernels):
    """The framing module under test: conftest's kernels fixture runs each test on both sets."""
    return kernels.framing


WATCHDOG_SECONDS = 120   # conftest.watchdog; socket tests also shut their sockets down, below


STUCK = 15.0    # seconds after which a test's sockets are shut down, failing a blocked receive


def _guard(*socks):
    """Shut the sockets down after STUCK seconds, so a blocked receive ends in EOF."""
    def shut():
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    t = threading.Timer(STUCK, shut)
    t.daemon = True
    t.start()
    return t


def frame(payload):
    return struct.pack("!i", len(payload)) + payload


def frame12(payload):
    """The 12-byte header form, which readers accept for any length."""
    return struct.pack("!i", -1) + struct.pack("!Q", len(payload)) + payload


def pattern(n, seed=0):
    """n bytes that differ from any shifted copy, so misplaced bytes show."""
    block = bytes((i * 131 + seed * 7 + (i >> 8)) & 0xFF for i in range(65536 + 256))
    reps = n // 65536 + 1
    return b"".join(block[(k * 97) % 256:(k * 97) % 256 + 65536] for k in range(reps))[:n]


def chunked(data, cuts):
    cuts = sorted({c for c in cuts if 0 < c < len(data)})
    out, prev = [], 0
    for c in cuts + [len(data)]:
        out.append(data[prev:c])
        prev = c
    return out


# -- headers -------------------------------------------------------------


class _CapturingConnection(mpc.Connection):
    """CPython's own writer, with what it would write captured."""

    def __init__(self):
        r, w = os.pipe()
        os.close(r)
        super().__init__(w)
        self.written = []

    def _send(self, buf, write=None):
        self.written.append(buf)


class _Sized:
    """Pretends to be a payload of n bytes (CPython only asks its len() for big ones)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize("n", [0, 1, 255, 256, 16384, 65536, 0x7FFFFFFF, 0x80000000, 2**40, 2**63 - 1])
def test_header_matches_cpython_byte_for_byte(fr, n):
    expect = struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!i", -1) + struct.pack("!Q", n)
    assert fr.encode_header(n) == expect
    payload = b"p" * n if n <= 16384 else _Sized(n)
    conn = _CapturingConnection()
    try:
        conn._send_bytes(payload)
    finally:
        conn.close()
    wire = b"".join(w for w in conn.written if isinstance(w, bytes))
    assert wire == expect + (payload if isinstance(payload, bytes) else b"")


def test_header_literals(fr):
    assert fr.encode_header(0) == b"\x00\x00\x00\x00"
    assert fr.encode_header(1) == b"\x00\x00\x00\x01"
    assert fr.encode_header(0x7FFFFFFF) == b"\x7f\xff\xff\xff"
    assert fr.encode_header(0x80000000) == b"\xff\xff\xff\xff\x00\x00\x00\x00\x80\x00\x00\x00"
    assert len(fr.encode_header(0x80000000)) == fr.LARGE_HEADER_SIZE == 12
    assert len(fr.encode_header(5)) == fr.HEADER_SIZE == 4


def test_header_errors(fr):
    with pytest.raises(ValueError, match="negative payload length"):
        fr.encode_header(-1)
    with pytest.raises(TypeError):
        fr.encode_header(1.5)
    with pytest.raises(OverflowError):
        fr.encode_header(2**63)


def test_constants_agree():
    for name in ("HEADER_SIZE", "LARGE_HEADER_SIZE", "LARGE_FRAME", "DEFAULT_BUFSIZE", "COPY_THRESHOLD"):
        assert getattr(cframing, name) == getattr(pframing, name), name
    assert (cframing.LARGE_FRAME, cframing.DEFAULT_BUFSIZE, cframing.COPY_THRESHOLD) == (65536, 262144, 65536)
    public = lambda m: {n for n in dir(m) if not n.startswith("_")}
    assert public(pframing) >= public(cframing)
    for cls in ("FrameDecoder", "Channel"):
        assert public(getattr(pframing, cls)) == public(getattr(cframing, cls)), cls


# -- decoder: round trips ------------------------------------------------

payloads = st.lists(
    st.one_of(st.binary(max_size=40), st.binary(min_size=60, max_size=300)),
    max_size=12)


def _stream(frames, long_forms):
    return b"".join((frame12 if lf else frame)(f) for f, lf in zip(frames, long_forms))


@settings(max_examples=150, deadline=None)
@given(frames=payloads, data=st.data())
def test_decoder_round_trip_feed(fr, frames, data):
    long_forms = data.draw(st.lists(st.booleans(), min_size=len(frames), max_size=len(frames)))
    stream = _stream(frames, long_forms)
    cuts = data.draw(st.lists(st.integers(0, max(len(stream), 1)), max_size=20))
    threshold = data.draw(st.sampled_from([16, 50, 65536]))
    bufsize = data.draw(st.sampled_from([64, 100, 4096]))
    d = fr.FrameDecoder(bufsize=bufsize, large_threshold=threshold)
    assert d.large_threshold == threshold
    got = []
    for chunk in chunked(stream, cuts):
        d.feed(data.draw(st.sampled_from([bytes, bytearray, memoryview]))(chunk))
        how = data.draw(st.sampled_from(["frames", "next", "iter", "none"]))
        if how == "frames":
            got.extend(d.frames())
        elif how == "next":
            while d.has_frame():
                got.append(d.next_frame())
            assert d.next_frame() is None
        elif how == "iter":
            got.extend(d)
    got.extend(d.frames())
    assert got == frames
    assert all(type(f) is bytes for f in got)
    assert d.received == len(stream)
    assert d.buffered == 0 and d.needed == 0
    assert not d.has_frame()
    d.eof()
    if frames:
        assert d.frame_start == len(stream) - len(frames[-1]) - (12 if long_forms[-1] else 4)


@settings(max_examples=150, deadline=None)
@given(frames=payloads, data=st.data())
def test_decoder_round_trip_get_buffer(fr, frames, data):
    long_forms = data.draw(st.lists(st.booleans(), min_size=len(frames), max_size=len(frames)))
    stream = _stream(frames, long_forms)
    threshold = data.draw(st.sampled_from([16, 64, 65536]))
    d = fr.FrameDecoder(bufsize=64, large_threshold=threshold)
    got, pos = [], 0
    while pos < len(stream):
        if data.draw(st.booleans()):
            k = data.draw(st.integers(1, 50))
            d.feed(stream[pos:pos + k])
            pos += min(k, len(stream) - pos)
        else:
            region = d.get_buffer(data.draw(st.sampled_from([-1, 1, 100, 10000])))
            assert len(region) > 0 and not region.readonly
            k = min(len(region), len(stream) - pos, data.draw(st.integers(1, 80)))
            region[:k] = stream[pos:pos + k]
            region.release()
            d.buffer_updated(k)
            pos += k
        if data.draw(st.booleans()):
            got.extend(d.frames())
    got.extend(d.frames())
    assert got == frames
    assert d.received == len(stream)
    assert d.buffered == 0 and d.needed == 0
    d.eof()


def test_get_buffer_region_and_buffer_updated_bounds(fr):
    d = fr.FrameDecoder(bufsize=64, large_threshold=16)
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        d.buffer_updated(-1)
    region = d.get_buffer()
    assert len(region) >= 4096   # grown to the default hint
    with pytest.raises(ValueError, match="beyond the region"):
        d.buffer_updated(len(region) + 1)
    # a large frame: the region is exactly the rest of its payload
    data = frame(pattern(1000))
    d.feed(data[:104])
    region = d.get_buffer(1)
    assert len(region) == 1000 - 100
    with pytest.raises(ValueError, match="beyond the region"):
        d.buffer_updated(901)
    region[:] = data[104:]
    d.buffer_updated(900)
    assert d.frames() == [pattern(1000)]


def test_get_buffer_after_a_completed_large_frame(fr):
    # the large frame is complete but not taken: the next region is the
    # receive buffer, and buffer_updated must account it there
    d = fr.FrameDecoder(large_threshold=16)
    big = pattern(5000)
    d.feed(frame(big))
    assert d.has_frame()
    region = d.get_buffer()
    nxt = frame(b"next")
    region[:len(nxt)] = nxt
    d.buffer_updated(len(nxt))
    assert d.buffered == len(big) + len(nxt)
    assert d.frames() == [big, b"next"]
    assert d.received == len(big) + 4 + len(nxt)


@pytest.mark.parametrize("step", [1, 7, 4096, 65536, 65540, 10 * MiB])
def test_large_frames_cross_the_threshold(fr, step):
    sizes = [65535, 65536, 65537, 3 * MiB + 5, 0, 10]
    if step == 7:
        del sizes[3]    # small steps through 3 MiB only cost time
    frames = [pattern(n, seed=i) for i, n in enumerate(sizes)]
    stream = b"".join(frame(f) for f in frames)
    d = fr.FrameDecoder()
    got = []
    view = memoryview(stream)
    if step == 1:   # byte by byte around every header, in one piece between
        starts, pos = [], 0
        for f in frames:
            starts.append(pos)
            pos += 4 + len(f)
        cuts = [c for p in starts + [len(stream)] for c in range(p - 20, p + 20)]
        pieces = chunked(view, cuts)
    else:
        pieces = [view[i:i + step] for i in range(0, len(stream), step)]
    for piece in pieces:
        d.feed(piece)
        got.extend(d.frames())
    assert [len(f) for f in got] == [len(f) for f in frames]
    assert got == frames


def test_frame_start_and_received(fr):
    d = fr.FrameDecoder()
    s = frame(b"a") + frame(b"bb") + frame(b"ccc")
    d.feed(s)
    assert d.received == len(s)
    assert d.next_frame() == b"a"
    assert d.frame_start == 0
    assert d.next_frame() == b"bb"
    assert d.frame_start == 5
    assert d.frames() == [b"ccc"]
    assert d.frame_start == 11


def test_frame_start_of_header_parsed_inside_feed(fr):
    d = fr.FrameDecoder()
    d.feed(frame(b"x" * 20) + frame(b"y"))
    assert d.frame_start == 0     # the first header was parsed while feeding
    assert d.frames() == [b"x" * 20, b"y"]
    assert d.frame_start == 24


def test_decoder_attributes_are_read_only(fr):
    d = fr.FrameDecoder(max_size=10)
    assert d.max_size == 10
    assert fr.FrameDecoder().max_size == -1
    for name in ("max_size", "large_threshold", "received", "frame_start", "buffered", "needed"):
        with pytest.raises(AttributeError):
            setattr(d, name, 1)


def test_decoder_init_arguments(fr):
    with pytest.raises(ValueError, match="max_size must be None or >= 0"):
        fr.FrameDecoder(max_size=-2)
    assert fr.FrameDecoder(large_threshold=1).large_threshold == 16
    with pytest.raises(TypeError):
        fr.FrameDecoder(bufsize=1.5)
    d = fr.FrameDecoder(bufsize=0)   # clamped, still works
    d.feed(frame(pattern(1000)))
    assert d.frames() == [pattern(1000)]


# -- decoder: limits and bad bytes ----------------------------------------


@pytest.mark.parametrize("claim", [2**62, 2**63 - 1])
def test_huge_claim_without_max_size_is_message_too_large(fr, claim):
    d = fr.FrameDecoder(max_size=None)
    d.feed(fr.encode_header(claim))
    with pytest.raises(MessageTooLarge) as ei:
        d.next_frame()
    assert not isinstance(ei.value, MemoryError)
    assert str(claim) in str(ei.value)
    with pytest.raises(MessageTooLarge):   # the stream stays broken
        d.next_frame()


def test_huge_claim_through_feed_and_get_buffer(fr):
    d = fr.FrameDecoder()
    with pytest.raises(MessageTooLarge):
        d.feed(fr.encode_header(2**62) + b"payload")
    d = fr.FrameDecoder()
    d.feed(fr.encode_header(2**62))
    with pytest.raises(MessageTooLarge):
        d.get_buffer()


def test_claim_beyond_signed_64_bits(fr):
    d = fr.FrameDecoder()
    with pytest.raises(MessageTooLarge, match=str(2**64 - 1)):
        d.feed(b"\xff" * 12)


def test_max_size_checked_at_the_header(fr):
    d = fr.FrameDecoder(max_size=100)
    d.feed(frame(b"a" * 100))
    assert d.frames() == [b"a" * 100]
    with pytest.raises(MessageTooLarge, match="frame of 101 bytes exceeds max_message_size=100"):
        d.feed(fr.encode_header(101))     # nothing of the payload has arrived yet
    assert isinstance(MessageTooLarge("x"), OSError)
    with pytest.raises(MessageTooLarge):
        d.feed(b"more")
    d = fr.FrameDecoder(max_size=100)
    with pytest.raises(MessageTooLarge):
        d.feed(fr.encode_header(2**40))


@pytest.mark.parametrize("n", [-2, -3, -0x80000000])
def test_negative_length_is_protocol_error(fr, n):
    d = fr.FrameDecoder()
    with pytest.raises(ProtocolError, match=f"invalid frame length {n}"):
        d.feed(struct.pack("!i", n) + b"zz")
    with pytest.raises(ProtocolError):
        d.next_frame()
    assert isinstance(ProtocolError("x"), OSError)


def test_minus_one_needs_the_long_header(fr):
    d = fr.FrameDecoder()
    d.feed(b"\xff\xff\xff\xff\x00\x00")
    assert d.next_frame() is None
    assert d.needed == 6
    d.feed(b"\x00\x00\x00\x00\x00\x03ab")
    assert d.needed == 1
    d.feed(b"c")
    assert d.frames() == [b"abc"]


@pytest.mark.parametrize("prefix, missing", [
    (b"\x00\x00", 2),
    (b"\x00\x00\x00\x0aabc", 7),
    (b"\xff\xff\xff\xff\x00", 7),
    (b"\xff\xff\xff\xff\x00\x00\x00\x00\x00\x00\x00\x10", 16),
    (frame(b"whole") + b"\x00\x00\x00\x0axy", 8),
])
def test_eof_mid_frame(fr, prefix, missing):
    d = fr.FrameDecoder(large_threshold=16)
    d.feed(prefix)
    d.frames()
    assert d.needed == missing
    with pytest.raises(TruncatedFrameError) as ei:
        d.eof()
    assert ei.value.missing == missing
    assert isinstance(ei.value, EOFError)
    assert f"{missing} bytes missing" in str(ei.value)
    with pytest.raises(TruncatedFrameError):
        d.next_frame()


def test_eof_sees_a_truncated_frame_behind_unread_ones(fr):
    d = fr.FrameDecoder()
    d.feed(frame(b"a") + frame(b"b") + b"\x00\x00\x00\x0axy")
    assert d.next_frame() == b"a"       # the next header is not parsed yet
    assert d.needed == 8
    with pytest.raises(TruncatedFrameError) as ei:
        d.eof()
    assert ei.value.missing == 8


def test_eof_after_a_large_frame_and_a_partial_header(fr):
    d = fr.FrameDecoder(large_threshold=16)
    big = pattern(500)
    d.feed(frame(big) + b"\x00\x00")
    assert d.buffered == len(big) + 2
    assert d.needed == 2
    with pytest.raises(TruncatedFrameError) as ei:
        d.eof()
    assert ei.value.missing == 2


def test_eof_on_a_frame_boundary(fr):
    d = fr.FrameDecoder()
    d.eof()
    d.feed(frame(b"a") + frame(b""))
    assert d.needed == 0
    d.eof()
    assert d.frames() == [b"a", b""]


# -- decoder: differential ------------------------------------------------

tokens = st.one_of(
    st.binary(max_size=30).map(frame),
    st.binary(min_size=20, max_size=200).map(frame),
    st.binary(max_size=30).map(frame12),
    st.integers(-2**31, 2**31 - 1).map(lambda n: struct.pack("!i", n)),
    st.integers(0, 2**64 - 1).map(lambda n: b"\xff\xff\xff\xff" + struct.pack("!Q", n)),
    st.binary(max_size=16),
)


def _outcome(fn):
    try:
        r = fn()
    except BaseException as e:  # noqa: B902 - any difference counts
        return ("raise", type(e), str(e), getattr(e, "missing", None))
    return ("ok", r)


def _state(d):
    return (d.buffered, d.needed, d.received, d.frame_start, d.frame_hdr)


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(tokens, max_size=12), data=st.data())
def test_differential_decoders_agree(parts, data):
    stream = b"".join(parts)
    cuts = data.draw(st.lists(st.integers(0, max(len(stream), 1)), max_size=12))
    max_size = data.draw(st.sampled_from([None, 0, 25, 4096]))
    threshold = data.draw(st.sampled_from([16, 40, 65536]))
    decs = [m.FrameDecoder(max_size=max_size, bufsize=64, large_threshold=threshold)
            for m in (cframing, pframing)]
    if max_size is None:
        stream = _only_small_claims(stream)
    for chunk in chunked(stream, cuts):
        how = data.draw(st.sampled_from(["feed", "get_buffer"]))
        if how == "feed":
            res = [_outcome(lambda d=d: d.feed(chunk)) for d in decs]
        else:
            res = [_outcome(lambda d=d: _write_via_get_buffer(d, chunk)) for d in decs]
        assert res[0] == res[1]
        assert _state(decs[0]) == _state(decs[1])
        take = data.draw(st.sampled_from(["frames", "next", "has"]))
        if take == "frames":
            res = [_outcome(d.frames) for d in decs]
        elif take == "next":
            res = [_outcome(d.next_frame) for d in decs]
        else:
            res = [_outcome(d.has_frame) for d in decs]
        assert res[0] == res[1]
        assert _state(decs[0]) == _state(decs[1])
    res = [_outcome(lambda d=d: (d.frames(), d.eof())) for d in decs]
    assert res[0] == res[1]
    assert _state(decs[0]) == _state(decs[1])


def _write_via_get_buffer(d, chunk):
    pos = 0
    while pos < len(chunk):
        region = d.get_buffer(len(chunk) - pos)
        k = min(len(region), len(chunk) - pos)
        region[:k] = chunk[pos:pos + k]
        region.release()
        d.buffer_updated(k)
        pos += k


def _only_small_claims(stream, limit=MiB):
    """Cut the stream before the first header claiming more than limit (not worth allocating)."""
    pos = 0
    while pos + 4 <= len(stream):
        n, h = struct.unpack_from("!i", stream, pos)[0], 4
        if n == -1:
            if pos + 12 > len(stream):
                break
            n, h = struct.unpack_from("!Q", stream, pos + 4)[0], 12
        elif n < 0:
            break
        if n > limit:
            return stream[:pos]
        pos += h + n
    return stream


# -- channels -------------------------------------------------------------


def tcp_pair():
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


@pytest.fixture(params=["unix", "tcp"])
def socks(request):
    a, b = socket.socketpair() if request.param == "unix" else tcp_pair()
    guard = _guard(a, b)
    yield a, b
    guard.cancel()
    a.close()
    b.close()


@pytest.fixture
def chans(fr, socks):
    a, b = socks
    return fr.Channel(a), fr.Channel(b)


@pytest.fixture
def raw(socks):
    """Write raw bytes on the sending socket of `chans`."""
    return socks[0].sendall


class Sender(threading.Thread):
    """Runs fn in a thread so a large send does not fill the socket buffer and block the test."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.error = fn, args, None

    def run(self):
        try:
            self.fn(*self.args)
        except BaseException as e:
            self.error = e

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.join(20)
        assert not self.is_alive(), "sender hung"
        if self.error is not None and exc[0] is None:
            raise self.error


def test_send_recv_small(chans):
    a, b = chans
    for p in (b"", b"x", b"hello world", pattern(1000)):
        a.send_frame(p)
        assert b.recv_frame() == p
    a.send_frame(bytearray(b"ba"))
    a.send_frame(memoryview(b"xmvx")[1:3])
    a.send_frame(array.array("i", [1, 2, 3]))
    assert b.recv_frame() == b"ba"
    assert b.recv_frame() == b"mv"
    assert b.recv_frame() == array.array("i", [1, 2, 3]).tobytes()
    assert b.buffered() == 0 and not b.has_frame()


@pytest.mark.parametrize("n", [65535, 65536, 65537, 5 * MiB + 3])
def test_send_recv_around_copy_threshold(chans, n):
    a, b = chans
    p = pattern(n, seed=n & 7)
    with Sender(a.send_frame, p):
        got = b.recv_frame()
    assert len(got) == n and got == p
    assert type(got) is bytes


def test_send_frame_offset_and_size(chans):
    a, b = chans
    a.send_frame(b"0123456789", 2, 5)
    a.send_frame(b"0123456789", 7)
    a.send_frame(b"0123456789", 10)
    a.send_frame(bytearray(b"0123456789"), size=3)
    assert [b.recv_frame() for _ in range(4)] == [b"23456", b"789", b"", b"012"]
    big = pattern(300000)
    with Sender(a.send_frame, big, 1000, 200000):
        assert b.recv_frame() == big[1000:201000]
    for args, msg in [((11,), "offset is out of range"), ((-1,), "offset is out of range"),
                      ((0, -1), "size is negative"), ((5, 6), r"buffer length < offset \+ size")]:
        with pytest.raises(ValueError, match=msg):
            a.send_frame(b"0123456789", *args)
    with pytest.raises(TypeError):
        a.send_frame("text")
    with pytest.raises(BufferError):
        a.send_frame(memoryview(b"abcdef")[::2])
    a.send_frame(b"still in sync")
    assert b.recv_frame() == b"still in sync"


def test_send_fortran_ordered_array(chans):
    np = pytest.importorskip("numpy")
    a, b = chans
    arr = np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4))
    a.send_frame(arr)
    assert b.recv_frame() == arr.tobytes(order="A")
    a.send_frames([arr, np.zeros((0, 3))])
    assert b.recv_frames() == [arr.tobytes(order="A"), b""]


def test_send_frames_mixed_sizes(chans):
    a, b = chans
    frames = [b"a", pattern(3 * MiB, 1), b"", pattern(70000, 2), *[bytes([i]) * i for i in range(100)],
              bytearray(pattern(2 * MiB + 1, 3)), memoryview(pattern(65536, 4)), b"end"]
    with Sender(a.send_frames, iter(frames)):
        got = []
        while len(got) < len(frames):
            got.extend(b.recv_frames())
    assert got == [bytes(f) for f in frames]
    a.send_frames([])
    a.send_frame(b"after")
    assert b.recv_frame() == b"after"


def test_send_frames_many_large_buffers(chans):
    # more iovecs than one sendmsg takes (the kernels batch them)
    a, b = chans
    big = memoryview(pattern(65537))
    frames = [big] * 300 + [b"tail"]
    with Sender(a.send_frames, frames):
        for i in range(300):
            assert b.recv_frame() == big, i
        assert b.recv_frame() == b"tail"


def test_send_frames_resumes_after_partial_sends(fr, socks):
    # SO_SNDTIMEO makes a blocking sendmsg return early with a partial count
    a_sock, b_sock = socks
    a_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 2000))
    a_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    a, b = fr.Channel(a_sock), fr.Channel(b_sock)
    frames = [b"s1", pattern(4 * MiB, 5), b"s2" * 100, pattern(3 * MiB, 6), b"s3"]

    def slow_reader(out):
        while len(out) < len(frames):
            time.sleep(0.001)
            out.extend(b.recv_frames(timeout=10))

    got = []
    with Sender(slow_reader, got):
        a.send_frames(frames)
    assert got == frames


def test_send_frames_bad_buffer_sends_nothing(chans):
    a, b = chans
    with pytest.raises(TypeError):
        a.send_frames([b"ok", "not bytes"])
    a.send_frame(b"next")
    assert b.recv_frame() == b"next"


def test_recv_frames_batches(chans):
    a, b = chans
    frames = [b"m%d" % i for i in range(100)]
    a.send_frames(frames)      # one send of about 600 bytes
    assert b.poll(5)
    time.sleep(0.02)
    got = b.recv_frames()
    assert len(got) > 1
    while len(got) < 100:
        got.extend(b.recv_frames())
    assert got == frames


def test_recv_frames_returns_everything_buffered(chans):
    a, b = chans
    a.send_frames([b"x" * 10] * 50)
    got = b.recv_frames(timeout=5)
    while len(got) < 50:
        got += b.recv_frames(timeout=5)
    assert got == [b"x" * 10] * 50
    a.send_frames([b"1", b"2", b"3"])
    time.sleep(0.05)
    assert b.recv_frames() == [b"1", b"2", b"3"]


def test_recv_frame_peeking_takes_at_most_the_frames_asked_for(chans, socks, raw):
    # three whole frames and the start of a fourth: asked for two, the
    # channel takes exactly two; the rest stays in the socket for another reader
    a, b = chans
    raw(frame(b"one") + frame(b"two") + frame(b"three") + frame(b"four")[:5])
    time.sleep(0.02)
    assert b.recv_frame_peeking(2, 100, 5.0) == b"one"
    assert b.has_frame()
    rest = socks[1].recv(64, socket.MSG_PEEK)
    assert rest == frame(b"three") + frame(b"four")[:5]
    assert b.recv_frame_peeking(3) == b"two"     # buffered: nothing more is taken
    assert socks[1].recv(64, socket.MSG_PEEK) == rest
    assert b.recv_frame_peeking(2) == b"three"
    raw(frame(b"four")[5:])
    assert b.recv_frame_peeking(2, None, 5.0) == b"four"


def test_recv_frame_peeking_leaves_a_frame_over_maxlength_in_the_socket(chans, raw):
    a, b = chans
    raw(frame(b"ok") + frame(b"x" * 300))
    time.sleep(0.02)
    assert b.recv_frame_peeking(2, 256, 5.0) == b"ok"
    assert not b.has_frame()
    with pytest.raises(MessageTooLarge):     # refused by its header, its payload never read
        b.recv_frame_peeking(1, 256, 5.0)


def test_recv_frame_into(chans):
    a, b = chans
    a.send_frame(b"payload")
    buf = bytearray(20)
    assert b.recv_frame_into(buf, 5) == 7
    assert buf == b"\0" * 5 + b"payload" + b"\0" * 8
    a.send_frame(b"exact")
    buf = bytearray(5)
    assert b.recv_frame_into(buf) == 5 and buf == b"exact"
    arr = array.array("d", [0.0] * 4)
    a.send_frame(array.array("d", [1.5, 2.5]))
    assert b.recv_frame_into(arr, 8) == 16
    assert list(arr) == [0.0, 1.5, 2.5, 0.0]


@pytest.mark.parametrize("prebuffered", [False, True])
def test_recv_frame_into_large(chans, prebuffered):
    a, b = chans
    big = pattern(3 * MiB + 17, 9)
    buf = bytearray(len(big) + 100)
    with Sender(a.send_frames, [b"small", big, b"after"]):
        if prebuffered:     # part of the large frame sits in the decoder's buffer
            assert b.recv_frame() == b"small"
        else:
            assert b.recv_frame_into(bytearray(5)) == 5
        assert b.recv_frame_into(buf, 50) == len(big)
        assert b.recv_frame() == b"after"
    assert buf[50:50 + len(big)] == big
    assert buf[:50] == b"\0" * 50 and buf[-50:] == b"\0" * 50


@pytest.mark.parametrize("n", [100, 200000])
def test_recv_frame_into_too_short(chans, n):
    a, b = chans
    p = pattern(n)
    with Sender(a.send_frames, [p, b"next"]):
        buf = bytearray(60)
        with pytest.raises(BufferTooShort) as ei:
            b.recv_frame_into(buf, 10)
        assert ei.value.args[0] == p
        assert buf == bytearray(60)
        assert b.recv_frame() == b"next"


def test_recv_frame_into_bad_target(chans):
    a, b = chans
    a.send_frame(b"abc")
    with pytest.raises(ValueError, match="offset out of bounds"):
        b.recv_frame_into(bytearray(4), 5)
    with pytest.raises(BufferError):
        b.recv_frame_into(b"read-only")
    assert b.recv_frame() == b"abc"   # the frame was left in place


def test_discard_frame(chans):
    a, b = chans
    with Sender(a.send_frames, [pattern(5 * MiB), b"small", b"keep", pattern(70000), b"last"]):
        b.discard_frame()
        b.discard_frame()
        assert b.recv_frame() == b"keep"
        b.discard_frame()
        assert b.recv_frame() == b"last"


def test_timeout_keeps_buffered_bytes(chans, raw):
    a, b = chans
    t0 = time.monotonic()
    with pytest.raises(FastnetTimeout) as ei:
        b.recv_frame(timeout=0.05)
    assert time.monotonic() - t0 >= 0.045
    assert isinstance(ei.value, TimeoutError) and isinstance(ei.value, FastnetError)
    whole = frame(b"0123456789")
    raw(whole[:7])
    with pytest.raises(FastnetTimeout):
        b.recv_frame(timeout=0.05)
    assert b.buffered() > 0
    assert b.poll()
    with pytest.raises(FastnetTimeout):
        b.recv_frames(timeout=0)
    raw(whole[7:])
    assert b.recv_frame(timeout=1) == b"0123456789"
    with pytest.raises(ValueError, match="timeout must be >= 0 or None"):
        b.recv_frame(timeout=-1)


def test_timeout_mid_large_frame(chans, raw):
    a, b = chans
    big = pattern(2 * MiB, 3)
    whole = frame(big)
    raw(whole[:100000])
    with pytest.raises(FastnetTimeout):
        while True:
            b.recv_frame(timeout=0.05)
    assert b.buffered() > 0
    with Sender(raw, whole[100000:] + frame(b"after")):
        buf = bytearray(len(big))
        got = b.recv_frame_into(buf)
        assert b.recv_frame() == b"after"
    assert got == len(big) and buf == big


def test_eof_and_truncation(fr, socks):
    a_sock, b_sock = socks
    a, b = fr.Channel(a_sock), fr.Channel(b_sock)
    a.send_frame(b"last words")
    a_sock.close()
    assert b.poll(1)
    assert b.recv_frame() == b"last words"
    with pytest.raises(EOFError) as ei:
        b.recv_frame()
    assert type(ei.value) is EOFError


@pytest.mark.parametrize("method", ["recv_frame", "recv_frames", "recv_frame_into", "discard_frame"])
@pytest.mark.parametrize("sent, missing", [
    (b"\x00\x00", 2),
    (b"\xff\xff\xff\xff\x00\x00", 6),
    (struct.pack("!i", 100) + b"x" * 50, 50),
    (struct.pack("!i", 3 * MiB) + b"y" * 300000, 3 * MiB - 300000),
])
def test_close_mid_frame(fr, socks, method, sent, missing):
    a_sock, b_sock = socks
    b = fr.Channel(b_sock)
    with Sender(_raw_send_all_and_close, a_sock, sent):
        with pytest.raises(TruncatedFrameError) as ei:
            if method == "recv_frame_into":
                b.recv_frame_into(bytearray(4 * MiB))
            else:
                getattr(b, method)()
    assert ei.value.missing == missing
    assert isinstance(ei.value, EOFError) and isinstance(ei.value, ProtocolError)
    with pytest.raises(TruncatedFrameError):
        b.recv_frame()


@pytest.fixture
def ahead_chans(fr, socks):
    """Channels that read ahead (``readahead=True``)."""
    a, b = socks
    return fr.Channel(a, readahead=True), fr.Channel(b, readahead=True)


def test_poll(ahead_chans):
    a, b = ahead_chans
    assert b.readahead is True
    assert b.poll() is False
    t0 = time.monotonic()
    assert b.poll(0.05) is False
    assert time.monotonic() - t0 >= 0.045
    a.send_frames([b"x", b"y"])
    assert b.poll(1) is True
    assert b.recv_frame() == b"x"
    assert b.buffered() > 0 and b.has_frame()
    assert b.poll(-5) is True   # a frame is buffered: the timeout is not even looked at
    assert b.recv_frame() == b"y"
    assert b.poll(0) is False
    with pytest.raises(ValueError):
        b.poll(-1)
    with Sender(lambda: (time.sleep(0.05), a.send_frame(b"later"))):
        assert b.poll(None) is True
    assert b.recv_frame() == b"later"


def test_max_size_and_maxlength(fr, socks):
    a_sock, b_sock = socks
    a, b = fr.Channel(a_sock), fr.Channel(b_sock, max_size=100)
    assert b.max_size == 100 and a.max_size is None
    a.send_frame(b"y" * 100)
    assert b.recv_frame() == b"y" * 100
    a.send_frame(b"z" * 20)
    with pytest.raises(MessageTooLarge, match="bad message length: 20 bytes exceeds maxlength=10"):
        b.recv_frame(maxlength=10)
    with pytest.raises(MessageTooLarge):   # the stream is desynchronised now
        b.recv_frame()
    b.send_frame(b"x" * 101)
    with pytest.raises(MessageTooLarge, match="frame of 101 bytes exceeds max_message_size=100"):
        fr.Channel(a_sock, max_size=100).recv_frame()


def test_maxlength_applies_to_a_header_already_parsed(ahead_chans):
    a, b = ahead_chans
    a.send_frames([b"first", b"q" * 20])
    assert b.recv_frame() == b"first"
    assert b.has_frame()     # this parses the next header
    with pytest.raises(MessageTooLarge, match="maxlength=10"):
        b.recv_frame(maxlength=10)


def test_maxlength_applies_after_a_timeout_mid_frame(chans, raw):
    a, b = chans
    whole = frame(pattern(500000))
    raw(whole[:100000])
    with pytest.raises(FastnetTimeout):
        while True:
            b.recv_frame(timeout=0.02)
    with pytest.raises(MessageTooLarge):
        b.recv_frame(maxlength=1000, timeout=1)


def test_huge_claim_over_a_socket(chans, raw):
    a, b = chans
    raw(cframing.encode_header(2**62))
    with pytest.raises(MessageTooLarge):
        b.recv_frame()


def test_release_and_closed_sockets(fr, socks):
    a_sock, b_sock = socks
    a = fr.Channel(a_sock)
    a.release()
    for call in (lambda: a.send_frame(b"x"), lambda: a.send_frames([b"x"]), a.recv_frame,
                 a.recv_frames, a.discard_frame, a.poll, lambda: a.recv_frame_into(bytearray(1))):
        with pytest.raises(OSError) as ei:
            call()
        assert ei.value.errno == 9
    s = socket.socket()
    s.close()
    with pytest.raises(ValueError, match="socket is closed"):
        fr.Channel(s)
    assert isinstance(a.decoder, fr.FrameDecoder)
    with pytest.raises(AttributeError):
        a.decoder = None


def test_peer_gone_while_sending(fr, socks):
    a_sock, b_sock = socks
    a = fr.Channel(a_sock)
    b_sock.close()
    with pytest.raises(OSError):
        for _ in range(100):
            a.send_frame(pattern(100000))


# -- compiled and pure on the same wire --------------------------------------


@pytest.mark.parametrize("kind", ["unix", "tcp"])
@pytest.mark.parametrize("sender, receiver", [(cframing, pframing), (pframing, cframing)])
def test_cross_implementation(kind, sender, receiver):
    a_sock, b_sock = socket.socketpair() if kind == "unix" else tcp_pair()
    guard = _guard(a_sock, b_sock)
    with a_sock, b_sock:
        tx, rx = sender.Channel(a_sock), receiver.Channel(b_sock)
        frames = [b"", b"a", pattern(65536), pattern(65537, 1), pattern(2 * MiB, 2), b"z" * 1000]

        batch_taken = threading.Event()

        def send():
            for f in frames:
                tx.send_frame(f)
            tx.send_frames(frames)
            assert batch_taken.wait(10)
            tx.send_frame(b"bye")

        with Sender(send):
            got = [rx.recv_frame() for _ in frames]
            while len(got) < 2 * len(frames):
                got.extend(rx.recv_frames())
            batch_taken.set()
            buf = bytearray(10)
            assert rx.recv_frame_into(buf, 2) == 3 and buf[2:5] == b"bye"
        assert got == frames + frames
        a_sock.close()
        with pytest.raises(EOFError):
            rx.recv_frame()
    guard.cancel()


def test_stdlib_peer(fr):
    a_sock, b_sock = socket.socketpair()
    guard = _guard(a_sock, b_sock)
    mp = mpc.Connection(b_sock.detach())
    with a_sock:
        ch = fr.Channel(a_sock)
        big = pattern(300000)
        with Sender(lambda: (mp.send_bytes(b"from stdlib"), mp.send_bytes(big))):
            assert ch.recv_frame() == b"from stdlib"
            assert ch.recv_frame() == big
        with Sender(ch.send_frames, [b"to stdlib", big]):
            assert mp.recv_bytes() == b"to stdlib"
            assert mp.recv_bytes() == big
        mp.close()
    guard.cancel()


# -- signals ---------------------------------------------------------------


class _Interrupt(Exception):
    pass


@pytest.fixture
def alarm():
    """Start a repeating SIGALRM with a handler; restore everything afterwards."""
    old = signal.getsignal(signal.SIGALRM)
    calls = []

    def start(interval, handler=None):
        def h(signum, frm):
            calls.append(signum)
            if handler is not None:
                handler()
        signal.signal(signal.SIGALRM, h)
        signal.setitimer(signal.ITIMER_REAL, interval, interval)
        return calls

    yield start
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    signal.signal(signal.SIGALRM, old)


def _interrupt():
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    raise _Interrupt


def test_signals_during_blocking_io_are_transparent(chans, raw, alarm):
    a, b = chans
    big = pattern(4 * MiB, 4)

    def trickle():
        whole = frame(big) + frame(b"small")
        for i in range(0, len(whole), 1 << 19):
            raw(whole[i:i + (1 << 19)])
            time.sleep(0.01)

    calls = alarm(0.002)
    with Sender(trickle):
        assert b.recv_frame() == big
        assert b.recv_frame() == b"small"
    with Sender(lambda: (time.sleep(0.05), a.send_frame(big))):
        buf = bytearray(len(big))
        assert b.recv_frame_into(buf) == len(big)
        assert buf == big
    with Sender(lambda: (time.sleep(0.05), a.send_frame(b"polled"))):
        assert b.poll(5)
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    assert b.recv_frame() == b"polled"
    assert calls, "no signal arrived during the blocking receives"


def test_interrupt_mid_large_frame_is_resumable_in_recv_frame(chans, raw, alarm):
    a, b = chans
    big = pattern(MiB, 5)
    whole = frame(big)
    raw(whole[:100000])
    alarm(0.05, _interrupt)
    with pytest.raises(_Interrupt):
        b.recv_frame()
    with Sender(raw, whole[100000:]):
        assert b.recv_frame(timeout=5) == big


def test_interrupt_mid_recv_frame_into_breaks_the_stream(chans, socks, raw, alarm):
    a, b = chans
    big = pattern(MiB, 6)
    whole = frame(big)
    raw(whole[:100000])
    alarm(0.05, _interrupt)
    with pytest.raises(_Interrupt):
        b.recv_frame_into(bytearray(len(big)))
    with Sender(_send_until_closed, socks[0], whole[100000:]):
        with pytest.raises(ProtocolError, match="interrupted mid-frame"):
            b.recv_frame(timeout=2)
        socks[1].close()   # unblocks the sender


def test_interrupt_mid_discard_breaks_the_stream(chans, socks, raw, alarm):
    a, b = chans
    whole = frame(pattern(MiB, 7)) + frame(b"next")
    raw(whole[:100000])
    alarm(0.05, _interrupt)
    with pytest.raises(_Interrupt):
        b.discard_frame()
    with Sender(_send_until_closed, socks[0], whole[100000:]):
        # the rest of the discarded frame must never come back as frames
        with pytest.raises(ProtocolError, match="interrupted mid-frame"):
            b.recv_frame(timeout=2)
        socks[1].close()   # unblocks the sender


# -- raw bytes ----------------------------------------------------------------


def _send_until_closed(sock, data):
    try:
        sock.sendall(data)
    except OSError:
        pass


def _raw_send_all_and_close(sock, data):
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


# -- next_frame_into: a frame straight into the caller's buffer -------------

def _fill_through_get_buffer(d, data, pos, step):
    b = d.get_buffer()
    k = min(len(b), step, len(data) - pos)
    b[:k] = data[pos:pos + k]
    d.buffer_updated(k)
    return pos + k


def test_next_frame_into_receives_into_the_callers_buffer(fr):
    d = fr.FrameDecoder(None, 64, 1024)
    payload = pattern(40000)
    data = frame(payload) + frame(b"abc")
    out = bytearray(40010)
    d.feed(data[:100])
    assert d.next_frame_into(out, 5) is None
    pos = 100
    while True:
        region = d.get_buffer()
        # the payload's region is the caller's buffer itself
        assert len(region) == len(payload) - (pos - 4)
        pos = _fill_through_get_buffer(d, data, pos, 3000)
        n = d.next_frame_into(out, 5)
        if n is not None:
            break
    assert n == len(payload) and out[5:5 + n] == payload
    d.feed(data[pos:])
    assert d.next_frame() == b"abc"


def test_next_frame_into_small_and_buffered_frames(fr):
    d = fr.FrameDecoder()
    d.feed(frame(b"one") + frame(b"two"))
    out = bytearray(8)
    assert d.next_frame_into(out, 2) == 3 and out[2:5] == b"one"
    assert d.next_frame_into(memoryview(out)[4:]) == 3 and out[4:7] == b"two"
    assert d.next_frame_into(out) is None


def test_next_frame_into_detach_keeps_the_frame_whole(fr):
    d = fr.FrameDecoder(None, 64, 1024)
    payload = pattern(20000, 3)
    data = frame(payload) + frame(b"next")
    out = bytearray(len(payload))
    d.feed(data[:5000])
    assert d.next_frame_into(out) is None
    d.detach()
    out[:] = bytes(len(out))       # the caller reuses its buffer: the frame is not in it any more
    d.feed(data[5000:])
    assert d.next_frame() == payload
    assert d.next_frame() == b"next"


def test_next_frame_into_another_buffer_moves_the_partial_frame(fr):
    d = fr.FrameDecoder(None, 64, 1024)
    payload = pattern(20000, 4)
    data = frame(payload)
    first, second = bytearray(len(payload)), bytearray(len(payload))
    d.feed(data[:3000])
    assert d.next_frame_into(first) is None
    d.feed(data[3000:])
    assert d.next_frame_into(second) == len(payload) and second == payload


def test_next_frame_into_too_short_raises_with_the_whole_frame(fr):
    d = fr.FrameDecoder(None, 64, 1024)
    payload = pattern(5000, 5)
    d.feed(frame(payload) + frame(b"xy"))
    with pytest.raises(BufferTooShort) as info:
        d.next_frame_into(bytearray(100))
    assert info.value.args[0] == payload
    assert d.next_frame_into(bytearray(2)) == 2


def test_next_frame_into_refuses_read_only_and_bad_offsets(fr):
    d = fr.FrameDecoder()
    d.feed(frame(b"abc"))
    with pytest.raises((BufferError, TypeError)):
        d.next_frame_into(b"xxxxxx")
    with pytest.raises(ValueError):
        d.next_frame_into(bytearray(4), 5)
    assert d.next_frame() == b"abc"
