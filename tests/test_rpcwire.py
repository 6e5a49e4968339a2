"""The rpcwire kernel, compiled and pure, in one process: the RPC messages byte for byte.

Every test takes conftest's ``kernels`` fixture and runs once per kernel set.
The bytes a set writes are compared with the other set's and with the codec's
own encoding of the whole message (the wire format the asyncio proxy and
server still write), for the msgpack, json and pickle codecs.
"""
import importlib
import socket
import threading

import numpy as np
import pytest

from fastnet.codecs import get_codec
from fastnet.errors import ProtocolError

WATCHDOG_SECONDS = 60
WAIT = 20
OTHER = {"c": "fastnet._pure", "pure": "fastnet._c"}
CODECS = ["msgpack", "json", "pickle"]

MSGIDS = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1]
METHODS = ["add", "m" * 31, "m" * 32, "kv.get", "\u00e9" * 200, "n" * 70000]
ARGS = [((2, 3), None), ([1, "two", 3.5, None, True], {"k": 1, "z": [1, 2]}), ((), {}), ([], None)]


def twin(kernels):
    return importlib.import_module(f"{OTHER[kernels.name]}.rpcwire")


def framed(framing, frames):
    """What the codec's frames are on the wire: one frame framed, else the marker frame first."""
    if len(frames) == 1:
        return framing.encode_header(len(frames[0])) + bytes(frames[0])
    return [b"\xc1" + (len(frames) - 1).to_bytes(4, "big")] + list(frames)


def flat(msg):
    return msg if isinstance(msg, bytes) else [bytes(f) for f in msg]


@pytest.mark.parametrize("codec", CODECS)
def test_requests_and_notifications_are_the_codecs_bytes_framed(kernels, codec):
    c = get_codec(codec)
    mine, theirs = kernels.rpcwire.Wire(c), twin(kernels).Wire(c)
    for msgid in MSGIDS:
        for method in METHODS:
            for args, kwargs in ARGS:
                want = framed(kernels.framing, c.dumps([0, msgid, method, list(args), kwargs or None]))
                got = mine.request(msgid, method, args, kwargs)
                assert got == want, (msgid, method, args, kwargs)
                assert theirs.request(msgid, method, args, kwargs) == got
                reply = c.dumps([1, msgid, None, [method, args]])
                assert flat(mine.reply(msgid, [method, args])) == flat(reply)
                assert flat(theirs.reply(msgid, [method, args])) == flat(reply)
        want = framed(kernels.framing, c.dumps([2, method, list(args), kwargs or None]))
        assert mine.notification(method, args, kwargs) == want
        assert theirs.notification(method, args, kwargs) == want


@pytest.mark.parametrize("codec", CODECS)
def test_ids_outside_the_hand_written_range_take_the_codecs_path(kernels, codec):
    c = get_codec(codec)
    w = kernels.rpcwire.Wire(c)
    for msgid in (-1, -200, 2**64, True):
        if codec == "msgpack" and msgid == 2**64:
            with pytest.raises(TypeError):         # as the codec refuses it
                w.reply(msgid, 5)
            continue
        assert flat(w.reply(msgid, 5)) == flat(c.dumps([1, msgid, None, 5]))
    assert w.request(3, "add", range(3), None) == framed(kernels.framing, c.dumps([0, 3, "add", [0, 1, 2], None]))
    error = ["ValueError", "bad", "Traceback ..."]
    assert flat(w.error_reply(9, error)) == flat(c.dumps([1, 9, error, None]))


def test_pickle_out_of_band_buffers_stay_frames_of_their_own(kernels):
    c = get_codec("pickle")
    w = kernels.rpcwire.Wire(c)
    a = np.arange(1 << 17, dtype=np.float64)
    msg = w.request(5, "echo", (a,), None)
    assert isinstance(msg, list) and len(msg) == 3
    assert msg[0] == b"\xc1" + (1).to_bytes(4, "big")
    assert memoryview(msg[2]).nbytes == a.nbytes
    assert flat(msg) == flat(twin(kernels).Wire(c).request(5, "echo", (a,), None))
    kind, msgid, method, args, kwargs = c.loads(msg[1:])
    assert (kind, msgid, method, kwargs) == (0, 5, "echo", None)
    np.testing.assert_array_equal(args[0], a)
    reply = w.reply(5, a)
    assert reply[0] == msg[0] and len(reply) == 3
    assert w.read_reply(reply[1:])[0] == 5
    np.testing.assert_array_equal(w.read_reply(reply[1:])[2], a)


def test_unencodable_arguments_raise_as_the_codec_does(kernels):
    for codec, bad in (("msgpack", object()), ("json", b"bytes"), ("pickle", lambda: 0)):
        c = get_codec(codec)
        for w in (kernels.rpcwire.Wire(c), twin(kernels).Wire(c)):
            with pytest.raises(Exception) as mine:
                w.request(1, "f", (bad,), None)
            with pytest.raises(Exception) as codecs_own:
                c.dumps([0, 1, "f", [bad], None])
            assert type(mine.value) is type(codecs_own.value)
    with pytest.raises(UnicodeEncodeError):
        kernels.rpcwire.Wire(get_codec("msgpack")).request(1, "\ud800", (), None)


@pytest.mark.parametrize("codec", CODECS)
def test_read_reply_returns_the_fields_or_a_protocol_error(kernels, codec):
    c = get_codec(codec)
    w, t = kernels.rpcwire.Wire(c), twin(kernels).Wire(c)
    ok = c.dumps([1, 77, None, {"a": [1, 2]}])
    assert w.read_reply(ok) == t.read_reply(ok) == (77, None, {"a": [1, 2]})
    err = c.dumps([1, 78, ["KeyError", "k", ""], None])
    assert w.read_reply(err) == (78, ["KeyError", "k", ""], None)
    for bad in (c.dumps([0, 1, "add", [], None]), c.dumps([1, 2, None]), c.dumps([5, 1, None, 0]),
                c.dumps("text"), [b"\xff\xfe not a payload"]):
        with pytest.raises(ProtocolError) as mine:
            w.read_reply(bad)
        with pytest.raises(ProtocolError) as other:
            t.read_reply(bad)
        assert "malformed reply from the server" in str(mine.value)
        assert str(mine.value) == str(other.value)


class Method:
    def __init__(self, func, blocking=False):
        self.func = func
        self.blocking = blocking
        self.records = []

    def record(self, seconds, failed):
        assert seconds >= 0
        self.records.append(failed)


class Handler:
    """Records what ``Wire.serve`` hands back."""

    def __init__(self):
        self.seen = []

    def _queue(self, frames):
        self.seen.append(("queue", [bytes(f) for f in frames]))

    def _send_exc(self, msgid, exc):
        self.seen.append(("exc", msgid, type(exc).__name__, str(exc)))

    def _unencodable(self, msgid, exc):
        self.seen.append(("unencodable", msgid, type(exc).__name__))

    def _message(self, msg):
        self.seen.append(("message", msg))

    def _undecodable(self, exc):
        self.seen.append(("undecodable", type(exc).__name__))


def _methods():
    def fail(x):
        raise ValueError(f"no {x}")

    def leave():
        raise SystemExit(3)

    return {"add": Method(lambda x, y=0: x + y), "fail": Method(fail), "leave": Method(leave),
            "slow": Method(lambda: 1, blocking=True), "odd": Method(lambda: {1, 2})}


@pytest.mark.parametrize("codec", CODECS)
def test_serve_answers_loop_calls_and_hands_back_the_rest(kernels, codec):
    c = get_codec(codec)
    requests = [
        [0, 1, "add", [2, 3], None],
        [0, 2, "add", [2], {"y": 40}],
        [0, 3, "fail", ["way"], None],
        [0, 4, "leave", [], None],
        [0, 5, "slow", [], None],              # blocking: the handler offloads it
        [0, 6, "missing", [], None],           # unknown: the handler answers MethodNotFound
        [0, "7", "add", [1, 1], None],         # a bad id: the handler refuses it
        [2, "add", [1, 2], None],              # a notification
    ]
    if codec != "json":
        requests.append([0, 8, "odd", [], None])  # a set: pickle encodes it, msgpack cannot
    outcomes = []
    for wire in (kernels.rpcwire.Wire(c), twin(kernels).Wire(c)):
        h = Handler()
        methods = _methods()
        for req in requests:
            wire.serve(h, c.dumps(req), methods)
        wire.serve(h, [b"\x00\x01garbage"], methods)
        outcomes.append((h.seen, {k: m.records for k, m in methods.items()}))
        assert h.seen[0] == ("queue", [bytes(f) for f in c.dumps([1, 1, None, 5])])
        assert h.seen[1] == ("queue", [bytes(f) for f in c.dumps([1, 2, None, 42])])
        assert h.seen[2] == ("exc", 3, "ValueError", "no way")
        assert h.seen[3] == ("exc", 4, "SystemExit", "3")
        assert [s[0] for s in h.seen[4:8]] == ["message"] * 4
        if codec == "msgpack":
            assert h.seen[8] == ("unencodable", 8, "TypeError")
        elif codec == "pickle":
            assert h.seen[8] == ("queue", [bytes(f) for f in c.dumps([1, 8, None, {1, 2}])])
        assert h.seen[-1] == ("undecodable", h.seen[-1][1])
        assert methods["add"].records == [False, False]
        assert methods["fail"].records == [True] and methods["leave"].records == [True]
        assert methods["slow"].records == []
    assert outcomes[0] == outcomes[1]


def test_send_framed_puts_a_request_on_the_wire_whole(kernels):
    a, b = socket.socketpair()
    with a, b:
        w = kernels.rpcwire.Wire(get_codec("msgpack"))
        big = "x" * (4 << 20)                 # more than the socket buffer: partial sends resume
        got = []
        reader = threading.Thread(target=lambda: got.extend(
            kernels.framing.Channel(b).recv_frame(timeout=WAIT) for _ in range(4)))
        reader.start()
        for msg in (w.request(1, "add", (2, 3), None), w.request(2, "echo", (big,), None)):
            twin(kernels).send_framed(a, msg)
            kernels.rpcwire.send_framed(a, msg)
        reader.join(WAIT)
        assert len(got) == 4
        assert got[0] == got[1] == get_codec("msgpack").dumps([0, 1, "add", [2, 3], None])[0]
        assert get_codec("msgpack").loads([got[2]]) == [0, 2, "echo", [big], None]
        assert got[3] == got[2]
        a.close()
        with pytest.raises(OSError):
            kernels.rpcwire.send_framed(a, w.request(3, "add", (1, 1), None))
