#!/usr/bin/env python3
"""libFuzzer (atheris) target: the compiled kernels against their pure twins.

Every input is a little program run on a compiled ``fastnet._c.framing``
FrameDecoder and a pure ``fastnet._pure.framing`` one side by side, or a
handshake message handed to both ``auth`` kernels. Any difference between the
two (a value, an exception type or message, the decoder state afterwards), a
frame the wire format does not contain, or an error the bytes do not explain
raises, and libFuzzer keeps the input as a crash.

    python3 fuzz/fuzz_kernels.py [libFuzzer options] [corpus dirs]   # fuzz (fuzz/run.sh does this)
    python3 fuzz/fuzz_kernels.py --make-corpus fuzz/corpus           # rewrite the seed inputs

``check(data)`` runs one input without atheris; tests/test_fuzz_regressions.py
replays the seeds and every kept crash through it.

Input format. Byte 0 with its top bit clear is a framing program::

    byte 0   bits 0-2 max_size  MAX_SIZES[i]
             bits 3-4 threshold THRESHOLDS[i]  (FrameDecoder large_threshold)
             bits 5-6 bufsize   BUFSIZES[i]
    then ops until the input ends, each an op byte (kind = bits 0-2, arg = bits 3-7):
      0 feed        arg&3: bytes/bytearray/memoryview/array; arg&4: 2-byte length, else 1; the bytes
      1 get_buffer  sizehint SIZEHINTS[arg&7]; arg&8: 2-byte length, else 1; the bytes;
                    arg&16: keep the region afterwards
      2 next_frame  3 frames() (arg&1: list(decoder))  4 has_frame  5 eof
      6 late write  through a kept region: index arg, offset byte, length byte, the bytes
      7 drop the kept regions

Byte 0 with its top bit set is a handshake message: bit 0 strict, bits 1-3 the
digest DIGESTS[i], then a key-length byte, the key, and the message (the rest).
"""
import array
import hashlib
import hmac
import os
import struct
import sys

MAX_SIZES = (None, 0, 1, 20, 100, 300, 5000, 70000)
THRESHOLDS = (16, 40, 65536, 2**62 + 1)
BUFSIZES = (64, 100, 4096, 0)
SIZEHINTS = (-1, 0, 1, 100, 10000, 2**40, 2**62, 2**63 - 1)
DIGESTS = (None, "md5", "sha256", "sha384", "sha3_256", "sha3_384", "sha256", None)
LLONG_MAX = 2**63 - 1
# Without a limit, a header claiming between these would really be allocated
# (and zero-filled by the pure twin): the program stops before feeding it.
SAFE_CLAIM, UNALLOCATABLE = 1 << 20, 2**56

cframing = pframing = cauth = pauth = errors = None


def _reference():
    """fuzz_reference.py beside this file, however this file was loaded."""
    import importlib.util
    mod = sys.modules.get("fuzz_reference")
    if mod is None:
        spec = importlib.util.spec_from_file_location(
            "fuzz_reference", os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_reference.py"))
        mod = sys.modules["fuzz_reference"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return mod


_ref = _reference()
ref_parse, ref_claims, hmac_ok = _ref.ref_parse, _ref.ref_claims, _ref.hmac_ok


def _load():
    """Import the kernels (inside atheris.instrument_imports when fuzzing)."""
    global cframing, pframing, cauth, pauth, errors
    if cframing is not None:
        return
    import fastnet._c.auth as ca
    import fastnet._c.framing as cf
    import fastnet._pure.auth as pa
    import fastnet._pure.framing as pf
    import fastnet.errors as er
    for mod in (cf, ca):
        # the run must exercise the extension the install built, never a fallback
        if not mod.__file__.endswith(".so"):
            raise ImportError(f"{mod.__name__} is not a compiled extension: {mod.__file__}")
    cframing, pframing, cauth, pauth, errors = cf, pf, ca, pa, er


class Mismatch(AssertionError):
    """The compiled kernel and its pure twin disagreed, or both broke a rule of the format."""


def _outcome(fn):
    try:
        r = fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Mismatch:
        raise
    except BaseException as e:  # noqa: B902 - any difference counts
        worded = isinstance(e, (errors.FastnetError, EOFError, ValueError, MemoryError))
        return ("raise", type(e), (str(e), getattr(e, "missing", None)) if worded else None), e
    return ("ok", r), None


def _same(fc, fp, what):
    (rc, ec), (rp, ep) = _outcome(fc), _outcome(fp)
    if rc != rp:
        raise Mismatch(f"{what}: compiled {rc!r} != pure {rp!r}")
    return rc, (ec, ep)


def _print(frame):
    """What is kept of a returned frame: not the object, which the decoder may still point into."""
    return len(frame), hashlib.blake2b(frame, digest_size=16).digest()


def _ensure(cond, what):
    if not cond:
        raise Mismatch(what)


# -- framing ---------------------------------------------------------------------------------


class _Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def left(self):
        return len(self.data) - self.pos

    def byte(self):
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def length(self, wide):
        return (self.byte() << 8 | self.byte()) if wide else self.byte()

    def take(self, n):
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out


class _Run:
    """One framing program on both decoders, with the reference parser watching."""

    STATE = ("buffered", "needed", "received", "frame_start", "frame_hdr", "max_size", "large_threshold")

    def __init__(self, config):
        self.max_size = MAX_SIZES[config & 7]
        args = dict(max_size=self.max_size, bufsize=BUFSIZES[(config >> 5) & 3],
                    large_threshold=THRESHOLDS[(config >> 3) & 3])
        self.c, self.p = cframing.FrameDecoder(**args), pframing.FrameDecoder(**args)
        self.stream = bytearray()
        self.returned = []           # fingerprints of the frames returned
        self.complete = False
        self.error = None
        self.held = []
        self.tainted = False
        self.pending_error = None    # checked once the op has recorded what the decoders took

    def safe(self, more):
        """False where, without a limit, the bytes would make a decoder really allocate a claimed size."""
        if self.max_size is not None:
            return True
        return all(n <= SAFE_CLAIM or n >= UNALLOCATABLE for n in ref_claims(self.stream + more))

    def run(self, what, fn, checks=True):
        res, (ec, ep) = _same(lambda: fn(self.c), lambda: fn(self.p), what)
        if self.error is not None and checks:
            # a desynchronised stream raises that same exception object again
            _ensure(res[0] == "raise" and ec is self.error[0] and ep is self.error[1],
                    f"{what} on a broken stream: {res!r}")
        elif res[0] == "raise" and isinstance(ec, (errors.FastnetError, EOFError)):
            self.error = (ec, ep)
            self.pending_error = ec
        return res

    def took(self, before, chunk):
        took = self.c.received - before
        _ensure(0 <= took <= len(chunk), f"received moved by {took} for {len(chunk)} bytes")
        self.stream += chunk[:took]
        if took:
            self.complete = False

    def check_error(self, e):
        frames, err, _ = ref_parse(self.stream, self.max_size)
        if isinstance(e, errors.TruncatedFrameError):
            _, err0, missing = ref_parse(self.stream, None)
            _ensure(err0 is None and missing == e.missing, f"{e!r}: the stream lacks {missing} bytes")
        elif isinstance(e, errors.ProtocolError):
            _ensure(err is errors.ProtocolError, f"{e!r} on a stream without a bad header")
        elif isinstance(e, errors.MessageTooLarge):
            _ensure(err is errors.MessageTooLarge or (
                self.max_size is None
                and any(n >= UNALLOCATABLE for n in ref_claims(self.stream)[len(self.returned):])),
                f"{e!r} with no claim over the limits")
        else:
            raise Mismatch(f"unexpected {e!r}")

    def invariants(self):
        for attr in self.STATE:
            vc, vp = getattr(self.c, attr), getattr(self.p, attr)
            _ensure(vc == vp, f"{attr}: compiled {vc!r} != pure {vp!r}")
        _ensure(self.c.received == len(self.stream), "received != bytes taken")
        if self.pending_error is not None:
            if not self.tainted:
                self.check_error(self.pending_error)
            self.pending_error = None
        if self.tainted:
            return
        frames, _, _ = ref_parse(self.stream, self.max_size)
        _ensure(self.returned == [_print(f) for f in frames[:len(self.returned)]],
                "a frame the stream does not hold")
        if self.complete and self.error is None:
            _ensure(len(self.returned) == len(frames), "a complete frame was left behind")
        _, err0, missing = ref_parse(self.stream, None)
        if self.error is None and err0 is None:
            _ensure(self.c.needed == missing, f"needed {self.c.needed} != {missing}")

    def take(self, how):
        if how == "next":
            res = self.run("next_frame", lambda d: d.next_frame())
            if res[0] == "ok":
                if res[1] is None:
                    self.complete = True
                else:
                    self.returned.append(_print(res[1]))
        else:
            res = self.run(how, (lambda d: d.frames()) if how == "frames" else (lambda d: list(d)))
            if res[0] == "ok":
                _ensure(all(type(f) is bytes for f in res[1]), "a frame that is not bytes")
                self.returned.extend(_print(f) for f in res[1])
                self.complete = True

    def op(self, r):
        op = r.byte()
        kind, arg = op & 7, op >> 3
        if kind == 0:
            chunk = r.take(r.length(arg & 4))
            if not self.safe(chunk):
                return False
            buf = (bytes, bytearray, memoryview, lambda b: array.array("B", b))[arg & 3](chunk)
            before = self.c.received
            self.run("feed", lambda d: d.feed(buf))
            self.took(before, chunk)
        elif kind == 1:
            sizehint = SIZEHINTS[arg & 7]
            regions = []

            def get(d):
                regions.append(d.get_buffer(sizehint))
                return len(regions[-1]), regions[-1].readonly    # not its bytes: uninitialised

            res = self.run("get_buffer", get)
            if res[0] != "ok":
                return True
            _ensure(res[1][0] > 0 and not res[1][1], f"get_buffer region {res[1]!r}")
            chunk = r.take(min(r.length(arg & 8), res[1][0]))
            if not self.safe(chunk):
                return False
            for region in regions:
                region[:len(chunk)] = chunk
            before = self.c.received
            self.run("buffer_updated", lambda d: d.buffer_updated(len(chunk)), checks=False)
            self.took(before, chunk)
            if arg & 16:
                self.held.append(regions)
            else:
                for region in regions:
                    region.release()
        elif kind in (2, 3):
            self.take("next" if kind == 2 else ("iter" if arg & 1 else "frames"))
        elif kind == 4:
            self.run("has_frame", lambda d: d.has_frame())
        elif kind == 5:
            res = self.run("eof", lambda d: d.eof())
            if res[0] == "ok" and not self.tainted:
                _ensure(ref_parse(self.stream, None)[2] == 0, "eof() accepted a truncated frame")
        elif kind == 6:
            at, n = r.byte(), r.byte()
            junk = r.take(n)
            # a late write can forge any header: only where a limit bounds what it may claim
            if self.held and self.max_size is not None:
                regions = self.held[arg % len(self.held)]
                size = len(regions[0])
                _ensure(len(regions[1]) == size, "kept regions differ in size")
                at = min(at * (size // 256 + 1), size)
                junk = junk[:size - at]
                for region in regions:
                    region[at:at + len(junk)] = junk
                self.tainted = self.tainted or bool(junk)
        else:
            self.drop()
        self.invariants()
        return True

    def drop(self):
        for regions in self.held:
            for region in regions:
                region.release()
        self.held = []


def check_framing(data):
    r = _Reader(data)
    run = _Run(r.byte())
    try:
        while r.left() and run.op(r):
            pass
    finally:
        run.drop()


# -- the handshake -----------------------------------------------------------------------------


def _auth(name):
    return getattr(cauth, name), getattr(pauth, name)


def _both(name, *args):
    fc, fp = _auth(name)
    return _same(lambda: fc(*args), lambda: fp(*args), name)[0]


def nonce_for(digest, key):
    """A deterministic stand-in for make_challenge's random nonce, so inputs replay exactly."""
    body = hashlib.sha512(b"nonce" + key).digest()
    return body[:20] if digest is None else b"{%s}%s" % (digest.encode(), body[:40])


def check_handshake(data):
    r = _Reader(data)
    head = r.byte()
    strict, digest = bool(head & 1), DIGESTS[(head >> 1) & 7]
    key = r.take(r.byte() % 65)
    message = r.take(r.left())
    nonce = nonce_for(digest, key)

    # the server: a fresh challenge has the same shape in both kernels
    (mc, nc), (mp, np_) = cauth.make_challenge(digest), pauth.make_challenge(digest)
    rand = 20 if digest is None else 40
    _ensure(len(nc) == len(np_) and nc[:-rand] == np_[:-rand] and nc != np_
            and mc == cauth.CHALLENGE + nc and mp == pauth.CHALLENGE + np_, "make_challenge shapes differ")

    # whatever a hostile peer sends, to either side
    _both("digest_name_and_payload", message)
    res = _both("parse_challenge", message)
    if res[0] == "ok":
        _ensure(cauth.CHALLENGE + res[1] == message, "parse_challenge lost bytes")
        _both("create_response", key, res[1], strict)
    _both("create_response", key, message, strict)
    res = _both("verify_response", key, nonce, message, strict)
    _ensure((res[0] == "ok") == hmac_ok(key, nonce, message, strict),
            f"verify_response {res!r} against the HMAC rules")
    if res[0] == "raise":
        _ensure(res[1] is errors.AuthenticationError, f"verify_response raised {res!r}")

    # the right answer verifies unless strict refuses MD5; any one-byte change does not
    res = _both("create_response", key, nonce, strict)
    md5 = digest in (None, "md5")
    if strict and md5:
        _ensure(res[0] == "raise" and res[1] is errors.AuthenticationError, "strict answered MD5")
        return
    _ensure(res[0] == "ok", f"create_response {res!r}")
    answer = res[1]
    _ensure(_both("verify_response", key, nonce, answer, strict) == ("ok", None), "a right answer failed")
    if message:
        bad = bytearray(answer)
        bad[message[0] % len(bad)] ^= (message[-1] | 1)
        res = _both("verify_response", key, nonce, bytes(bad), strict)
        _ensure(res[0] == "raise" and res[1] is errors.AuthenticationError, "a mutated answer verified")
        # replayed to another challenge, or reflected back
        for other in (nonce_for(digest, key + message[:1]), cauth.CHALLENGE + nonce):
            res = _both("verify_response", key, other, answer, strict)
            _ensure(res[0] == "raise", "an answer verified against another challenge")


def check(data):
    """Run one fuzz input; raise if the kernels disagree or break the format's rules."""
    _load()
    if not data:
        return
    if data[0] & 0x80:
        check_handshake(data)
    else:
        check_framing(data)


# -- the seed corpus ------------------------------------------------------------------------------


def _frame(payload, long_form=False):
    if long_form:
        return b"\xff\xff\xff\xff" + struct.pack("!Q", len(payload)) + payload
    return struct.pack("!i", len(payload)) + payload


def _feed(chunk):
    return (bytes([0 | 4 << 3]) + struct.pack("!H", len(chunk)) if len(chunk) > 255
            else bytes([0, len(chunk)])) + chunk


def _get_buffer(chunk, sizehint=0, keep=False):
    return bytes([1 | (sizehint | 8 | (16 if keep else 0)) << 3]) + struct.pack("!H", len(chunk)) + chunk


FRAMES, NEXT, LIST, HAS, EOF, DROP = b"\x03", b"\x02", b"\x0b", b"\x04", b"\x05", b"\x07"


def _config(max_i, threshold_i=0, bufsize_i=0):
    return bytes([max_i | threshold_i << 3 | bufsize_i << 5])


def seeds():
    """Named seed inputs: valid traffic of every kind, and the classic bad headers."""
    _load()
    msgs = [b"", b"x", b"hello world", bytes(range(256)) * 2]
    stream = b"".join(_frame(m) for m in msgs)
    out = {
        "frames-one-feed": _config(7) + _feed(stream) + FRAMES + EOF,
        "frames-byte-by-byte": _config(6, 1) + b"".join(_feed(stream[i:i + 1]) + NEXT for i in range(40)) + LIST,
        "frames-long-header": _config(0) + _feed(_frame(b"long form", True) + _frame(b"")) + LIST + EOF,
        "large-frame-get-buffer": _config(7, 0, 1) + _get_buffer(_frame(bytes(300))[:150], 1)
        + _get_buffer(_frame(bytes(300))[150:], 0) + FRAMES + HAS + EOF,
        "large-frame-kept-region": _config(6, 1, 0) + _get_buffer(_frame(b"k" * 200)[:100], 0, keep=True)
        + _feed(_frame(b"k" * 200)[100:]) + NEXT + b"\x06\x00\x04JUNK" + DROP + EOF,
        "over-max-size": _config(3) + _feed(_frame(b"y" * 21)) + NEXT,
        "negative-length": _config(0) + _feed(_frame(b"ok") + struct.pack("!i", -2)) + NEXT + FRAMES + FRAMES,
        "huge-claim": _config(0, 2) + _feed(b"\xff\xff\xff\xff" + struct.pack("!Q", 2**62)) + NEXT + HAS,
        "beyond-64-bits": _config(5) + _feed(b"\xff" * 12) + FRAMES,
        "truncated-at-eof": _config(5) + _feed(_frame(b"z" * 50)[:30]) + EOF + NEXT,
        "partial-header-at-eof": _config(4) + _feed(b"\xff\xff\xff\xff\x00") + EOF,
    }
    for i, digest in enumerate(DIGESTS[:6]):
        key = b"secret key"
        nonce = nonce_for(digest, key)
        answer = (hmac.digest(key, nonce, "md5") if digest is None
                  else b"{%s}%s" % (digest.encode(), hmac.digest(key, nonce, digest)))
        for strict in (0, 1):
            out[f"answer-{digest or 'legacy'}-{'strict' if strict else 'lax'}"] = (
                bytes([0x80 | i << 1 | strict, len(key)]) + key + answer)
        out[f"challenge-{digest or 'legacy'}"] = bytes([0x80 | i << 1, len(key)]) + key + cauth.CHALLENGE + nonce
    out["welcome"] = bytes([0x84, 3]) + b"key" + cauth.WELCOME
    return out


def make_corpus(directory):
    _load()
    os.makedirs(directory, exist_ok=True)
    for name, data in sorted(seeds().items()):
        check(data)    # a seed that fails is a bug in the seed or the kernels: stop here
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    print(f"wrote {len(seeds())} seed inputs to {directory}")


def main(argv):
    if len(argv) == 3 and argv[1] == "--make-corpus":
        make_corpus(argv[2])
        return
    import atheris
    # Coverage guides the search through the pure twins' bytecode: the compiled
    # kernels take the same branches (that is what is checked), without the
    # clang instrumentation libFuzzer would need to see inside them. The
    # package is imported in here too, since fastnet.tls imports the pure framing.
    with atheris.instrument_imports(include=["fastnet"]):
        _load()
    print(f"fuzzing {cframing.__file__} and {cauth.__file__} against their pure twins", flush=True)
    atheris.Setup(argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
