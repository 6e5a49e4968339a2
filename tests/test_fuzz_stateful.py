"""Stateful differential fuzzing: every compiled kernel step against its pure twin.

hypothesis drives the framing decoder, both sides of the authkey handshake
and the blocking Channel with arbitrary bytes, chunkings and call orders. On
every step the compiled kernel (``fastnet._c``) and the pure twin
(``fastnet._pure``) must return the same values, raise the same exceptions
and be left in the same state. A small reference parser, written from the
wire format alone, checks what both of them return.

The compiled modules are imported directly whatever FASTNET_PURE says (as in
test_framing.py), so the pure-kernel run compares them too; a missing build
fails here rather than passing on one implementation. FASTNET_FUZZ_SCALE
multiplies every example count (tools/sanitize.sh lowers it under valgrind;
raise it for a longer search).
"""
import array
import hashlib
import hmac
import importlib.util
import os
import socket
import struct
import sys
import threading
import tracemalloc

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, initialize, invariant,
                                 multiple, precondition, rule)

import fastnet._c.auth as cauth
import fastnet._c.framing as cframing
import fastnet._pure.auth as pauth
import fastnet._pure.framing as pframing
from fastnet.errors import (AuthenticationError, BufferTooShort, FastnetError, MessageTooLarge,
                            ProtocolError, TruncatedFrameError)


def _reference():
    """fuzz/fuzz_reference.py: the reference parser the fuzz program checks against too."""
    mod = sys.modules.get("fuzz_reference")
    if mod is None:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "fuzz", "fuzz_reference.py")
        spec = importlib.util.spec_from_file_location("fuzz_reference", path)
        mod = sys.modules["fuzz_reference"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod


ref_parse, ref_claims, hmac_ok = _reference().ref_parse, _reference().ref_claims, _reference().hmac_ok

KiB = 1 << 10
LLONG_MAX = 2**63 - 1
# A claim this large cannot be allocated on any machine the tests run on;
# claims between it and a few MiB would really be allocated and are not drawn
# where nothing limits them.
UNALLOCATABLE = 2**56
SCALE = float(os.environ.get("FASTNET_FUZZ_SCALE", "1"))


def examples(n):
    return max(1, int(n * SCALE))


WATCHDOG_SECONDS = 300 * max(SCALE, 1)


def frame(payload):
    return struct.pack("!i", len(payload)) + payload


def frame12(payload):
    return b"\xff\xff\xff\xff" + struct.pack("!Q", len(payload)) + payload


def header(n):
    return struct.pack("!i", n) if 0 <= n <= 0x7FFFFFFF else b"\xff\xff\xff\xff" + struct.pack("!Q", n)


_BLOCK = bytes((i * 131 + (i >> 8) * 7) & 0xFF for i in range(70000 + 256))


def pattern(n, seed):
    """n bytes in which a misplaced byte shows."""
    return _BLOCK[seed % 256:seed % 256 + n]


# Compared with their messages: what the kernels themselves decide. Errors of
# the interpreter's own argument handling (TypeError, BufferError) word the same
# refusal differently in compiled and interpreted code, so only their type counts.
_WORDED = (FastnetError, EOFError, ValueError, MemoryError, AuthenticationError)


def outcome(fn, *args):
    try:
        r = fn(*args)
    except BaseException as e:  # noqa: B902 - any difference counts
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        detail = (str(e), getattr(e, "missing", None)) if isinstance(e, _WORDED) else None
        return ("raise", type(e), detail), e
    return ("ok", r), None


def same(fns, *args):
    """Run the twin calls; assert the same result or exception; return (results, exceptions)."""
    got = [outcome(fn, *args) for fn in fns]
    assert got[0][0] == got[1][0], f"compiled {got[0][0]!r} != pure {got[1][0]!r}"
    return got[0][0], [g[1] for g in got]


# -- what a peer may send -------------------------------------------------------------------------

small_payload = st.one_of(st.binary(max_size=40), st.integers(41, 300).map(lambda n: pattern(n, n)))
good_tokens = st.one_of(
    small_payload.map(frame),
    small_payload.map(frame12),
    st.integers(65530, 66000).map(lambda n: frame(pattern(n, 3))),         # around LARGE_FRAME
)
bad_tokens = st.one_of(
    st.integers(0, 300).map(header),                                     # a header alone: the payload may follow
    st.integers(65536, 70000).map(header),
    st.integers(UNALLOCATABLE, LLONG_MAX).map(header),                   # more than can be allocated
    st.integers(LLONG_MAX + 1, 2**64 - 1).map(header),                   # beyond signed 64 bits
    st.integers(0, 0x7FFFFFFF).map(lambda n: b"\xff\xff\xff\xff" + struct.pack("!Q", n)),
    st.integers(-2**31, -2).map(lambda n: struct.pack("!i", n)),        # negative, not -1
    st.binary(min_size=1, max_size=16),                                  # anything
    st.sampled_from([b"\xff", b"\xff\xff\xff\xff", b"\x00\x00\x00", b"\x80\x00\x00\x00"]),
)


def fingerprint(frame):
    """What the tests keep of a returned frame: not the object, which a kept region may still point into."""
    return len(frame), hashlib.blake2b(frame, digest_size=16).digest()


def _is_safe(stream, max_size):
    """No header claims a size that would really be allocated without a limit stopping it."""
    # a limit refuses a claim before allocating; without one, only small and impossible claims
    return max_size is not None or all(n <= 1 << 20 or n >= UNALLOCATABLE for n in ref_claims(stream))


# -- the framing decoder ---------------------------------------------------------------------------


class DecoderMachine(RuleBasedStateMachine):
    """One compiled and one pure FrameDecoder, fed the same bytes the same way."""

    def __init__(self):
        super().__init__()
        self.decs = None
        self.held = []

    @initialize(max_size=st.sampled_from([None, None, 70000, 70000, 4096, 300, 25, 1, 0]),
                bufsize=st.sampled_from([0, 64, 100, 4096]),
                threshold=st.sampled_from([0, 16, 40, 65536, 2**62 + 1]))
    def create(self, max_size, bufsize, threshold):
        self.max_size = max_size
        self.decs = [m.FrameDecoder(max_size=max_size, bufsize=bufsize, large_threshold=threshold)
                     for m in (cframing, pframing)]
        self.pending = bytearray()   # what the peer has sent and the decoders not yet taken
        self.stream = bytearray()    # what the decoders have taken
        self.returned = []           # fingerprints of the frames returned, in order
        self.complete = False        # the last call returned every complete frame
        self.error = None            # each decoder's stream-breaking exception, once raised
        self.tainted = False         # a late write through a kept region changed the stream
        self.unchecked = None
        self.ref_cache = {}          # the stream only grows: its parse is keyed by its length

    def _run(self, fn, checks=True):
        """fn(decoder) on both; once the stream broke, a checking call must re-raise that very exception."""
        res, excs = same([lambda d=d: fn(d) for d in self.decs])
        if self.error is not None and checks:
            assert res[0] == "raise" and excs[0] is self.error[0] and excs[1] is self.error[1], res
        elif res[0] == "raise" and isinstance(excs[0], (FastnetError, EOFError)):
            self.error = excs
            self.unchecked = excs[0]    # once the rule has recorded what the decoders took
        return res

    def _check_error(self, e):
        if self.tainted:
            return
        frames, err, _ = self._ref(self.max_size)
        if isinstance(e, TruncatedFrameError):
            # the last frame begun, limits aside: a later header may still be unparsed
            _, err0, missing = self._ref(None)
            assert err0 is None and missing == e.missing, (e, missing)
        elif isinstance(e, ProtocolError):
            assert err is ProtocolError, e
        elif isinstance(e, MessageTooLarge):
            # the limit, a claim beyond 64 signed bits, or an unlimited claim nothing can hold
            assert err is MessageTooLarge or (
                self.max_size is None
                and any(n >= UNALLOCATABLE for n in ref_claims(self.stream)[len(self.returned):])), e
        else:
            raise AssertionError(f"unexpected {e!r}")

    def _ref(self, max_size):
        key = (len(self.stream), max_size)
        if key not in self.ref_cache:
            self.ref_cache[key] = ref_parse(self.stream, max_size)
        return self.ref_cache[key]

    def _took(self, before, chunk):
        took = self.decs[0].received - before
        assert 0 <= took <= len(chunk)
        self.stream += chunk[:took]
        del self.pending[:took]
        if took:
            self.complete = False

    def _peer_sends(self, data):
        if not self.pending or data.draw(st.booleans(), label="more"):
            # good frames, and now and then something bad behind them: a stream
            # lives long enough to reach deep states before it breaks
            parts = data.draw(st.lists(good_tokens, min_size=1, max_size=4), label="sent")
            if self.max_size is not None:
                # frames over the limit are the bad tokens' business
                parts = [p for p in parts if len(p) - (12 if p[:4] == b"\xff" * 4 else 4) <= self.max_size]
            if data.draw(st.sampled_from([False, False, False, True]), label="bad"):
                parts.append(data.draw(bad_tokens, label="bad token"))
            sent = b"".join(parts)
            if _is_safe(self.stream + self.pending + sent, self.max_size):
                self.pending += sent

    def _draw_count(self, data, most):
        """How many pending bytes to take: often all of them, else any number (a cut anywhere)."""
        most = min(most, len(self.pending))
        return data.draw(st.one_of(st.just(most), st.integers(0, most)), label="n")

    def _feed(self, data, kind):
        n = self._draw_count(data, len(self.pending))
        chunk = bytes(self.pending[:n])
        if kind == "array":
            buf = array.array("B", chunk)
        elif kind == "slice":
            buf = memoryview(b"<" + chunk + b">")[1:-1]
        else:
            buf = kind(chunk)
        before = self.decs[0].received
        self._run(lambda d: d.feed(buf))
        self._took(before, chunk)

    def _write_via_get_buffer(self, data):
        sizehint = data.draw(st.sampled_from([-1, 0, 1, 100, 10000, 2**40, 2**62, LLONG_MAX]),
                             label="sizehint")
        twins = []

        def get(d):
            twins.append(d.get_buffer(sizehint))
            return len(twins[-1]), twins[-1].readonly   # never its bytes: uninitialised memory

        res = self._run(get)
        if res[0] != "ok":
            return
        assert res[1][0] > 0 and not res[1][1]
        n = self._draw_count(data, res[1][0])
        chunk = bytes(self.pending[:n])
        for r in twins:
            r[:n] = chunk
        before = self.decs[0].received
        over = data.draw(st.sampled_from([0, 0, 0, res[1][0] - n + 1, -n - 1]), label="miscount")
        res = self._run(lambda d: d.buffer_updated(n + over), checks=False)
        if res[0] == "ok":
            self._took(before, chunk)
        else:
            assert res[1] is ValueError
        if data.draw(st.booleans(), label="keep the region"):
            self.held.append(twins)
        else:
            for r in twins:
                r.release()

    def _take(self, how):
        if how == "next":
            res = self._run(lambda d: d.next_frame())
            if res[0] == "ok":
                if res[1] is None:
                    self.complete = True
                else:
                    self.returned.append(fingerprint(res[1]))
        elif how in ("frames", "iter"):
            res = self._run((lambda d: d.frames()) if how == "frames" else (lambda d: list(d)))
            if res[0] == "ok":
                assert all(type(f) is bytes for f in res[1])
                self.returned.extend(fingerprint(f) for f in res[1])
                self.complete = True
        elif how == "has":
            self._run(lambda d: d.has_frame())

    # Few rules that each do a whole step: hypothesis switches random subsets
    # of rules off per example (swarm testing), and any one left on still
    # moves bytes through the decoders.
    @rule(data=st.data(), via=st.sampled_from([bytes, bytearray, memoryview, "array", "slice", "get_buffer"]),
          then=st.sampled_from([None, "next", "frames", "iter", "has"]))
    def receive(self, data, via, then):
        """The peer sends; the decoders take some of it by feed() or get_buffer(); maybe frames are taken."""
        self._peer_sends(data)
        if via == "get_buffer":
            self._write_via_get_buffer(data)
        else:
            self._feed(data, via)
        self._take(then)

    @rule(how=st.sampled_from(["next", "frames", "iter", "has"]))
    def take(self, how):
        self._take(how)

    @precondition(lambda self: not self.pending)     # the peer closed after what it sent
    @rule()
    def eof(self):
        res = self._run(lambda d: d.eof())
        if res[0] == "ok" and not self.tainted:
            assert self._ref(None)[2] == 0

    # A late write may make any header, so only where a limit bounds what it can claim.
    @precondition(lambda self: self.held and self.max_size is not None)
    @rule(data=st.data())
    def late_write(self, data):
        """Write through a region after buffer_updated() and more calls: misuse, but never memory corruption."""
        twins = data.draw(st.sampled_from(self.held), label="region")
        size = len(twins[0])
        assert len(twins[1]) == size
        at = data.draw(st.integers(0, size), label="at")
        junk = data.draw(st.binary(max_size=min(size - at, 64)), label="junk")
        for r in twins:
            r[at:at + len(junk)] = junk
        self.tainted = self.tainted or bool(junk)

    @rule()
    def drop_regions(self):
        for twins in self.held:
            for r in twins:
                r.release()
        self.held = []

    @invariant()
    def same_state(self):
        if self.decs is None:
            return
        c, p = self.decs
        for attr in ("buffered", "needed", "received", "frame_start", "frame_hdr", "max_size",
                     "large_threshold"):
            assert getattr(c, attr) == getattr(p, attr), attr
        assert c.received == len(self.stream)
        if self.unchecked is not None:
            self._check_error(self.unchecked)
            self.unchecked = None
        if self.tainted:
            return
        frames, err, _ = self._ref(self.max_size)
        assert self.returned == [fingerprint(f) for f in frames[:len(self.returned)]]
        if self.complete and self.error is None:
            assert len(self.returned) == len(frames)
        _, err0, missing = self._ref(None)
        if self.error is None and err0 is None:
            assert c.needed == missing

    def teardown(self):
        if self.decs is not None:
            # what the run reached, for --hypothesis-show-statistics
            event(f"frames returned: {min(len(self.returned), 5)}+")
            event(f"stream broken by: {type(self.error[0]).__name__ if self.error else None}")
            event(f"late writes: {self.tainted}")
            event(f"large frame taken: {any(n >= 65530 for n, _ in self.returned)}")
        self.drop_regions()


DecoderMachine.TestCase.settings = settings(
    max_examples=examples(400), stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
test_decoder_machine = DecoderMachine.TestCase


# -- the handshake, both sides ----------------------------------------------------------------------

DIGESTS = [None, "md5", "sha256", "sha384", "sha3_256", "sha3_384"]
keys = st.one_of(st.sampled_from([b"", b"key", b"the right key" * 10]), st.binary(max_size=80))


class HandshakeMachine(RuleBasedStateMachine):
    """Both roles of the challenge/response, on the compiled and the pure kernel at once.

    Server: make_challenge -> verify_response. Client: parse_challenge ->
    create_response. What each side is handed is a right answer, or one that
    was mutated, truncated, padded, replayed to a later challenge, reflected
    back to its sender, or anything at all.
    """

    challenges = Bundle("challenges")    # (message, nonce, digest): what a server sent
    responses = Bundle("responses")      # (response, nonce, key): what a client answered

    def __init__(self):
        super().__init__()
        self.answered = set()            # (nonce, response) pairs that verified

    def _both(self, name, *args):
        return same([getattr(cauth, name), getattr(pauth, name)], *args)[0]

    @rule(target=challenges, digest=st.sampled_from(DIGESTS))
    def server_challenges(self, digest):
        """Random nonces differ; shape, prefix and length must not."""
        (mc, nc), (mp, np_) = cauth.make_challenge(digest), pauth.make_challenge(digest)
        for m, n in ((mc, nc), (mp, np_)):
            assert m == cauth.CHALLENGE + n
            if digest is None:
                assert len(n) == 20
            else:
                head = b"{%s}" % digest.encode()
                assert n.startswith(head) and len(n) == len(head) + 40
        assert len(mc) == len(mp) and nc != np_
        return multiple((mc, nc, digest), (mp, np_, digest))

    @rule(name=st.one_of(st.text(max_size=12), st.sampled_from(["SHA256", "sha1", "blake2b", "md5 "])))
    def server_challenges_with_a_bad_digest(self, name):
        res = self._both("make_challenge", name)
        assert res[0] == "raise" and res[1] in (ValueError, UnicodeEncodeError), res

    @rule(target=responses, chal=challenges, key=keys, strict=st.booleans())
    def client_answers(self, chal, key, strict):
        message, nonce, digest = chal
        res = self._both("parse_challenge", message)
        assert res == ("ok", nonce)
        res = self._both("create_response", key, nonce, strict)
        if strict and digest in (None, "md5"):
            assert res[0] == "raise" and res[1] is AuthenticationError, res
            return multiple()
        assert res[0] == "ok"
        return (res[1], nonce, key)

    @rule(resp=responses, strict=st.booleans())
    def server_verifies_a_right_answer(self, resp, strict):
        response, nonce, key = resp
        res = self._both("verify_response", key, nonce, response, strict)
        md5 = len(response) in (16, 20) or response.startswith(b"{md5}")
        assert (res[0] == "ok") == (not (strict and md5)), res
        if res[0] == "ok":
            self.answered.add((nonce, response))

    @rule(resp=responses, key=keys)
    def server_verifies_with_another_key(self, resp, key):
        response, nonce, right = resp
        res = self._both("verify_response", key, nonce, response, False)
        assert (res[0] == "ok") == hmac_ok(key, nonce, response, False)

    @rule(resp=responses, data=st.data())
    def single_byte_mutation_fails(self, resp, data):
        response, nonce, key = resp
        at = data.draw(st.integers(0, len(response) - 1), label="at")
        flip = data.draw(st.integers(1, 255), label="xor")
        bad = bytearray(response)
        bad[at] ^= flip
        res = self._both("verify_response", key, nonce, bytes(bad), False)
        assert res[0] == "raise" and res[1] is AuthenticationError, res
        # the nonce, too: the MAC covers all of it, digest prefix included
        at = data.draw(st.integers(0, len(nonce) - 1), label="nonce at")
        bad = bytearray(nonce)
        bad[at] ^= flip
        res = self._both("verify_response", key, bytes(bad), response, False)
        assert res[0] == "raise" and res[1] is AuthenticationError, res

    @rule(resp=responses, cut=st.integers(0, 200), pad=st.binary(min_size=1, max_size=300))
    def truncated_or_oversized_fails(self, resp, cut, pad):
        response, nonce, key = resp
        for bad in (response[:cut % len(response)], response + pad, pad + response):
            res = self._both("verify_response", key, nonce, bad, False)
            assert res[0] == "raise" and res[1] is AuthenticationError, (bad, res)

    @rule(resp=responses, chal=challenges)
    def replayed_to_another_challenge_fails(self, resp, chal):
        response, nonce, key = resp
        if chal[1] == nonce:
            return
        res = self._both("verify_response", key, chal[1], response, False)
        assert res[0] == "raise" and res[1] is AuthenticationError, res

    @rule(chal=challenges, key=keys)
    def reflected_challenge_fails(self, chal, key):
        """A server handed back its own challenge, or nonce, as the answer."""
        message, nonce, _ = chal
        for bad in (message, nonce):
            res = self._both("verify_response", key, nonce, bad, False)
            assert res[0] == "raise" and res[1] is AuthenticationError, res
            assert not hmac_ok(key, nonce, bad, False)
        # and a client handed an answer where a challenge belongs
        res = self._both("parse_challenge", cauth.create_response(key, nonce))
        assert res[0] == "raise" and res[1] is AuthenticationError

    @rule(resp=responses)
    def strict_refuses_md5_even_when_right(self, resp):
        response, nonce, key = resp
        md5 = [hmac.digest(key, nonce, "md5"), b"{md5}" + hmac.digest(key, nonce, "md5")]
        for answer in md5:
            assert self._both("verify_response", key, nonce, answer, False) == ("ok", None)
            res = self._both("verify_response", key, nonce, answer, True)
            assert res[0] == "raise" and res[1] is AuthenticationError, res

    @rule(message=st.one_of(st.binary(max_size=300),
                            st.binary(max_size=80).map(lambda b: cauth.CHALLENGE + b),
                            st.tuples(st.sampled_from([b"{md5}", b"{sha256}", b"{sha3_384}", b"{sha1}",
                                                       b"{", b"}", b"{}", b"{sha256"]),
                                      st.binary(max_size=80)).map(b"".join)),
          key=keys, strict=st.booleans(), chal=challenges)
    def anything_at_all(self, message, key, strict, chal):
        """Whatever a hostile peer sends, on either side: the same answer from both kernels."""
        self._both("digest_name_and_payload", message)
        nonce = self._both("parse_challenge", message)
        if nonce[0] == "ok":
            self._both("create_response", key, nonce[1], strict)
        self._both("create_response", key, message, strict)
        res = self._both("verify_response", key, chal[1], message, strict)
        assert (res[0] == "ok") == hmac_ok(key, chal[1], message, strict), res
        if res[0] == "raise":
            assert res[1] is AuthenticationError, res

    @rule(value=st.one_of(st.none(), st.integers(), st.text(max_size=8), st.just(bytearray(b"{sha256}" + b"x" * 32)),
                          st.just(memoryview(b"x" * 20))),
          which=st.sampled_from(["digest_name_and_payload", "parse_challenge", "verify", "create"]))
    def wrong_types(self, value, which):
        """Not bytes at all: refused the same way (type only: the interpreter words it)."""
        if which == "verify":
            self._both("verify_response", b"k", b"n" * 20, value, False)
            self._both("verify_response", value, b"n" * 20, b"r" * 16, False)
        elif which == "create":
            self._both("create_response", value, b"{sha256}" + b"n" * 40, False)
        else:
            self._both(which, value)


HandshakeMachine.TestCase.settings = settings(
    max_examples=examples(300), stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
test_handshake_machine = HandshakeMachine.TestCase


# -- the blocking Channel, fed hostile bytes over real sockets ------------------------------------------


def _socket_pair(family):
    if family == "unix":
        return socket.socketpair()
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return a, b


class _Peer(threading.Thread):
    """Sends the bytes and closes its sending side, like a peer that said its piece and left."""

    def __init__(self, sock, data):
        super().__init__(daemon=True)
        self.sock, self.data = sock, data

    def run(self):
        try:
            self.sock.sendall(self.data)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass    # the receiving side gave up on a broken stream and closed


truncated = st.integers(1, 70000).flatmap(
    lambda n: st.integers(0, n - 1).map(lambda k: header(n) + pattern(k, n)))
# mostly good frames, so that a stream is read for a while before it breaks
hostile = st.lists(st.sampled_from([good_tokens, good_tokens, good_tokens, bad_tokens, truncated]).flatmap(lambda s: s),
                   min_size=1, max_size=6).map(b"".join)

CHANNEL_OPS = ["recv_frame", "recv_frame maxlength", "recv_frames", "recv_frame_into", "discard_frame",
               "recv_frame_fds", "has_frame", "poll", "buffered"]


def _channel_op(ch, op, arg):
    if op == "recv_frame":
        return ch.recv_frame()
    if op == "recv_frame maxlength":
        return ch.recv_frame(maxlength=arg)
    if op == "recv_frames":
        return ch.recv_frames()
    if op == "recv_frame_into":
        buf = bytearray(arg + 3)
        n = ch.recv_frame_into(buf, 3)
        return n, bytes(buf[3:3 + n])
    if op == "discard_frame":
        return ch.discard_frame()
    if op == "recv_frame_fds":
        return ch.recv_frame_fds()
    if op == "has_frame":
        return ch.has_frame()
    if op == "poll":
        return ch.poll(10)      # data or EOF always comes: True, unless a kernel hangs or errs
    return ch.buffered()


@pytest.mark.parametrize("family", ["unix", "tcp"])
@settings(max_examples=examples(200), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(stream=hostile, data=st.data(),
       max_size=st.sampled_from([None, 0, 25, 300, 70000]),
       ops=st.lists(st.tuples(st.sampled_from(CHANNEL_OPS), st.sampled_from([0, 10, 300, 70000])),
                    min_size=1, max_size=12))
def test_channels_agree_on_hostile_bytes(family, stream, data, max_size, ops):
    """Both kernels' Channels, each behind its own socket, read the same hostile stream."""
    if not _is_safe(stream, max_size):
        stream = stream[:0]
    pairs = [_socket_pair(family) for _ in range(2)]
    peers = [_Peer(a, stream) for a, _ in pairs]
    try:
        chans = [m.Channel(b, max_size=max_size) for m, (_, b) in zip((cframing, pframing), pairs)]
        for p in peers:
            p.start()
        broken = None
        got = []
        for op, arg in ops + [("recv_frame", 0)] * 4:
            res, excs = same([lambda ch=ch: _channel_op(ch, op, arg) for ch in chans])
            if broken is not None and op not in ("has_frame", "poll", "buffered"):
                # a desynchronised stream stays so: the very same exception again
                assert excs[0] is broken[0] and excs[1] is broken[1], (op, res)
            elif res[0] == "raise" and isinstance(excs[0], FastnetError) and not isinstance(excs[0], BufferTooShort):
                broken = excs
            elif res[0] == "ok" and op in ("recv_frame", "recv_frame maxlength"):
                got.append(res[1])
            elif res[0] == "ok" and op == "recv_frames":
                got.extend(res[1])
        event(f"channel stream broken by: {type(broken[0]).__name__ if broken else None}")
        event(f"channel frames received: {min(len(got), 3)}+")
        frames, err, _ = ref_parse(stream, max_size)
        # frames taken by receives are the stream's own, in order (others were discarded or copied out)
        assert all(f in frames for f in got)
    finally:
        for a, b in pairs:
            b.close()
        for p in peers:
            p.join(10)
        for a, b in pairs:
            a.close()
    assert not any(p.is_alive() for p in peers)


@settings(max_examples=examples(200), deadline=None)
@given(claim=st.one_of(st.integers(0, 200000), st.integers(UNALLOCATABLE, 2**64 - 1),
                       st.integers(-2**31, -2)),
       limit=st.sampled_from([0, 100, 5000, 70000]),
       sent=st.integers(0, 2000),
       how=st.sampled_from(["max_size", "maxlength", "recv_frames", "recv_frame_into", "discard_frame"]),
       kernel=st.sampled_from(["c", "pure"]))
def test_channel_allocates_nothing_that_a_refused_header_claims(claim, limit, sent, how, kernel):
    """A header over the limit is refused before anything is allocated for it, whatever the call."""
    m = cframing if kernel == "c" else pframing
    a, b = socket.socketpair()
    with a, b:
        a.sendall(header(claim) if claim >= 0 else struct.pack("!i", claim))
        a.sendall(pattern(min(sent, claim) if claim >= 0 else sent, 5))    # one frame at most
        a.shutdown(socket.SHUT_WR)
        ch = m.Channel(b, max_size=None if how == "maxlength" else limit)
        buf = bytearray(limit)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            try:
                if how == "maxlength":
                    ch.recv_frame(maxlength=limit)
                elif how == "recv_frames":
                    ch.recv_frames()
                elif how == "recv_frame_into":
                    ch.recv_frame_into(buf)
                elif how == "discard_frame":
                    ch.discard_frame()
                else:
                    ch.recv_frame()
            except (FastnetError, EOFError) as e:
                error = e
            else:
                error = None
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    if claim < 0:
        assert isinstance(error, ProtocolError)
    elif claim > limit:
        assert isinstance(error, MessageTooLarge), error
    elif claim > sent:
        assert isinstance(error, TruncatedFrameError) and error.missing == claim - sent
    else:
        assert error is None
    allowed = claim if 0 <= claim <= limit else 0
    # twice the frame: a received frame that does not fit recv_frame_into's buffer travels in BufferTooShort
    assert peak <= 2 * allowed + 64 * KiB, (peak, claim, limit)
