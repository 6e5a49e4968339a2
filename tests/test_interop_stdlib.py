"""Wire compatibility with the real stdlib ``multiprocessing.connection``.

Every CPython 3.10-3.13 that pyenv has on the machine is started as a real
subprocess (``python3 -I``, so it imports nothing but its own stdlib) running
``PEER_SCRIPT``: a small agent that reads JSON commands on stdin, drives the
stdlib ``Listener``/``Client`` and answers with one JSON line per command on
stdout. fastnet runs in this test process, so the file exercises whichever
kernel set is active (the suite runs once more with ``FASTNET_PURE=1``).

What the stdlib does, and so what these tests expect of it:

* 3.10/3.11 speak the legacy handshake: ``#CHALLENGE#`` + 20 random bytes,
  answered by a raw 16-byte HMAC-MD5. 3.12+ send ``#CHALLENGE#{sha256}`` + 40
  random bytes and answer with ``{digest}`` + HMAC; they still accept a raw
  HMAC-MD5 answer, and a legacy peer answers a prefixed challenge with a raw
  HMAC-MD5 over the whole nonce (prefix included).
* The handshake is mutual and the side that delivers the first challenge (the
  Listener) verifies first, so with a wrong key both ends raise
  AuthenticationError: the Listener "digest received was wrong" (after sending
  ``#FAILURE#``), the Client "digest sent was rejected".
* The stdlib Client of 3.10/3.11 checks a challenge with ``assert`` (so a
  non-challenge is an AssertionError there); 3.12+ raise AuthenticationError.
* A peer that gives up without answering (fastnet ``strict=True`` refusing a
  legacy challenge) leaves the stdlib Listener with an EOFError.

Frames above 0x7fffffff bytes (the ``-1`` + ``!Q`` header) cannot be sent
here with real payloads; only the encoded header is compared below, the
rest is unit-tested with the framing kernel.
"""
import array
import hashlib
import hmac
import json
import multiprocessing
import multiprocessing.connection as mpc
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import uuid

import pytest

import fastnet
from fastnet._kernels import framing as _framing

# Seconds the test waits for the peer at any step; the peer arms SIGALRM with
# PEER_OP_TIMEOUT around every command, so a stuck peer closes its sockets and
# reports before the test gives up on it. Nothing here can block forever.
IO_TIMEOUT = 30.0
PEER_OP_TIMEOUT = 20

KEY = b"interop-secret-\x00\xff-key"
WRONG_KEY = b"interop-secret-\x00\xff-kez"

# 0, the stdlib's copy threshold (16384: header and payload in one write, 16385:
# two writes) and its neighbours, a frame the size of fastnet's 64 KiB receive
# buffer, and several MiB with an odd tail.
SIZES = [0, 1, 16383, 16384, 16385, 65536, 5 * 2**20 + 3]
SMALL = [0, 7, 16385]

# A pickled object that travels both ways; its literal is pasted into the peer.
OBJ = {
    "text": "h\u00e9llo \u2713",
    "ints": [0, -1, 2**70, -(2**63)],
    "float": 2.5,
    "bytes": b"\x00\xff" * 3,
    "none": None,
    "tuple": (1, "two", 3.0, (True, False)),
    "set": frozenset({1, 2, 3}),
    "big": b"z" * 70000,  # a pickle over the stdlib's 16384-byte copy threshold
}
# The same without "big", for tests about handshakes: over TCP every stdlib
# send above 16384 bytes is two writes, which stall on Nagle + delayed ACK.
SMALL_OBJ = {k: v for k, v in OBJ.items() if k != "big"}

PEER_SCRIPT = r'''
import hashlib, json, os, signal, sys
import multiprocessing.connection as mpc
from multiprocessing import AuthenticationError
from multiprocessing.connection import Listener, Client

OP_TIMEOUT = int(sys.argv[1])
OBJS = {"full": @OBJ@, "small": @SMALL_OBJ@}


class OpTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise OpTimeout("peer operation timed out")


signal.signal(signal.SIGALRM, _alarm)


def addr(a):
    return tuple(a) if isinstance(a, list) else a


def key(cmd):
    k = cmd.get("authkey")
    return None if k is None else bytes.fromhex(k)


def exchange(c, spec):
    out = {}
    want = OBJS[spec["obj"]]
    c.send(("hello", list(sys.version_info[:3]), want))
    obj = c.recv()
    out["obj_ok"] = obj == want
    c.send(("echo", obj))
    # fastnet -> stdlib: every payload back to back, then their digests and
    # the payloads echoed (few turnarounds: over TCP each costs the stdlib a
    # Nagle + delayed-ACK stall)
    datas = [c.recv_bytes() for n in spec["sizes"]]
    out["received"] = [[len(d), hashlib.sha256(d).hexdigest()] for d in datas]
    c.send([hashlib.sha256(d).digest() for d in datas])
    for d in datas:
        c.send_bytes(d)
    # stdlib -> fastnet: fresh random payloads, their digests, then the echo
    mine = [os.urandom(n) for n in spec["sizes"]]
    for d in mine:
        c.send_bytes(d)
    c.send([hashlib.sha256(d).digest() for d in mine])
    echo_bad = [len(d) for d in mine if c.recv_bytes() != d]
    out["echo_bad"] = echo_bad
    if spec["closer"] == "fastnet":
        try:
            c.recv_bytes()
            out["eof"] = False
        except EOFError:
            out["eof"] = True
    return out


def raw(c, spec):
    for h in spec["send"]:
        c.send_bytes(bytes.fromhex(h))
    frames = []
    while len(frames) < 10:
        try:
            frames.append(c.recv_bytes(1 << 20)[:80].hex())
        except EOFError:
            return {"frames": frames, "end": "EOFError"}
        except Exception as e:
            return {"frames": frames, "end": type(e).__name__}
    return {"frames": frames, "end": "too many frames"}


def run(c, spec):
    if spec is None:
        return {}
    return {"exchange": exchange, "raw": raw}[spec["kind"]](c, spec)


def main():
    listener = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        reply = {"ok": True}
        c = None
        signal.alarm(OP_TIMEOUT)
        try:
            if op == "info":
                reply["version"] = list(sys.version_info[:3])
                reply["implementation"] = sys.implementation.name
                reply["prefix"] = sys.base_prefix
                reply["mpc_file"] = mpc.__file__
                reply["foreign"] = sorted(m for m in sys.modules if m.split(".")[0] == "fastnet")
            elif op == "listen":
                if listener is not None:
                    listener.close()
                listener = Listener(addr(cmd["address"]), authkey=key(cmd))
                a = listener.address
                if isinstance(a, bytes):
                    a = a.decode("utf-8", "surrogateescape")
                reply["address"] = a
            elif op == "accept":
                c = listener.accept()
            elif op == "connect":
                c = Client(addr(cmd["address"]), authkey=key(cmd))
            else:
                raise ValueError("unknown op %r" % op)
            if c is not None:
                reply.update(run(c, cmd.get("session")))
        except BaseException as e:
            reply = {"ok": False, "error": type(e).__name__,
                     "auth_error": isinstance(e, AuthenticationError), "msg": str(e)[:300]}
        finally:
            signal.alarm(0)
            if c is not None:
                c.close()
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    if listener is not None:
        listener.close()


main()
'''.replace("@OBJ@", repr(OBJ)).replace("@SMALL_OBJ@", repr(SMALL_OBJ))


# -- the interpreters --------------------------------------------------------

_MINORS = (10, 11, 12, 13)


def _run(args):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _discover():
    """{name: (python3 path, version tuple)} for every pyenv CPython 3.10-3.13."""
    root = os.environ.get("PYENV_ROOT") or _run(["pyenv", "root"]).strip() or os.path.expanduser("~/.pyenv")
    vdir = os.path.join(root, "versions")
    names = set(_run(["pyenv", "versions", "--bare"]).split())
    if os.path.isdir(vdir):  # the glob fallback, and a check on pyenv's list
        names.update(os.listdir(vdir))
    found = {}
    for name in names:
        m = re.fullmatch(r"3\.(1[0-3])\.(\d+)", name)
        exe = os.path.join(vdir, name, "bin", "python3")
        if m and os.access(exe, os.X_OK):
            found[name] = (exe, (3, int(m[1]), int(m[2])))
    return found


class Interp:
    def __init__(self, name, exe, version):
        self.name, self.exe, self.version = name, exe, version

    @property
    def legacy(self):
        """True for 3.10/3.11: the MD5-only handshake."""
        return self.version < (3, 12)


def _interp_params():
    found = _discover()
    params = []
    for name, (exe, version) in sorted(found.items(), key=lambda kv: kv[1][1]):
        params.append(pytest.param(Interp(name, exe, version), id=f"py{name}"))
    for minor in _MINORS:
        if not any(v[:2] == (3, minor) for _, v in found.values()):
            params.append(pytest.param(Interp(f"3.{minor}", None, (3, minor, 0)), id=f"py3.{minor}-absent"))
    return params


INTERPS = _interp_params()


@pytest.fixture(params=INTERPS)
def interp(request):
    it = request.param
    if it.exe is None:
        pytest.skip(f"pyenv has no CPython {it.name} on this machine")
    return it


# -- the peer process ----------------------------------------------------------

class Peer:
    """A stdlib multiprocessing.connection agent in another interpreter."""

    def __init__(self, interp, workdir):
        self.interp = interp
        self._errpath = os.path.join(workdir, "peer.stderr")
        self._err = open(self._errpath, "wb")
        self.proc = subprocess.Popen(
            [interp.exe, "-I", "-c", PEER_SCRIPT, str(PEER_OP_TIMEOUT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, cwd=workdir)
        self._buf = b""
        self._pending = 0  # commands sent and not yet answered
        info = self.request(op="info")
        # the peer really is the interpreter it claims to be, with its own stdlib
        assert info["ok"], info
        assert tuple(info["version"]) == interp.version, info
        assert info["implementation"] == "cpython", info
        assert info["mpc_file"].startswith(info["prefix"]), info
        assert info["foreign"] == [], info

    def send(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        self.proc.stdin.flush()
        self._pending += 1

    def reply(self, timeout=IO_TIMEOUT):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.kill()
                raise AssertionError(f"peer {self.interp.name} silent for {timeout}s; stderr: {self.stderr()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                rc = self.proc.wait(5)
                raise AssertionError(f"peer {self.interp.name} exited ({rc}); stderr: {self.stderr()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        self._pending -= 1
        return json.loads(line)

    def request(self, **cmd):
        self.send(**cmd)
        return self.reply()

    def stderr(self):
        self._err.flush()
        with open(self._errpath, "rb") as f:
            return f.read().decode("utf-8", "replace")[-2000:]

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def close(self):
        try:
            # a peer still busy with a command (the test failed mid-session) is
            # killed at once rather than left to time out
            if self.proc.poll() is None and self._pending == 0:
                self.send(op="quit")
                self.proc.stdin.close()
                self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            self.kill()
            self.proc.stdout.close()
            self._err.close()


@pytest.fixture
def workdir():
    # short: an AF_UNIX path must fit in 108 bytes, pytest's tmp_path may not
    d = tempfile.mkdtemp(prefix="fn-interop-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def peer(interp, workdir):
    p = Peer(interp, workdir)
    try:
        yield p
    finally:
        p.close()


def _address(family, workdir):
    if family == "tcp":
        return ("127.0.0.1", 0)
    if family == "unix":
        return os.path.join(workdir, "s.sock")
    return "\0fastnet-interop-" + uuid.uuid4().hex


def _hex(key):
    return None if key is None else key.hex()


def _exchange(sizes, closer):
    return {"kind": "exchange", "sizes": sizes, "closer": closer,
            "obj": "full" if sizes is SIZES else "small"}


def _obj_for(sizes):
    return OBJ if sizes is SIZES else SMALL_OBJ


def _accept(listener, peer):
    """fastnet Listener.accept, but never waiting more than IO_TIMEOUT for the peer to connect."""
    if not select.select([listener.fileno()], [], [], IO_TIMEOUT)[0]:
        raise AssertionError(f"peer never connected: {peer.reply(1.0)}")
    return listener.accept()


def _recv(conn):
    assert conn.poll(IO_TIMEOUT), "peer sent nothing"
    return conn.recv_bytes()


def _same(got, want, what):
    ok = bytes(got) == bytes(want)
    assert ok, f"{what}: {len(got)} bytes differ from the {len(want)} expected"


def _fastnet_side(conn, interp, sizes, closer):
    """The mirror of the peer's ``exchange``: checks every byte both ways."""
    want = _obj_for(sizes)
    assert conn.poll(IO_TIMEOUT)
    tag, version, obj = conn.recv()
    assert (tag, tuple(version), obj) == ("hello", interp.version, want)
    conn.send(want)
    assert conn.poll(IO_TIMEOUT)
    assert conn.recv() == ("echo", want)
    # fastnet -> stdlib: the stdlib's digests prove what it received, the
    # echo what fastnet receives
    payloads = [os.urandom(n) for n in sizes]
    for p in payloads:
        conn.send_bytes(p)
    assert conn.poll(IO_TIMEOUT)
    digests = conn.recv()
    assert digests == [hashlib.sha256(p).digest() for p in payloads], "the stdlib received other bytes"
    for p in payloads:
        _same(_recv(conn), p, f"echo of {len(p)} bytes")
    # stdlib -> fastnet, alternately through recv_bytes and recv_bytes_into
    datas = []
    for i, n in enumerate(sizes):
        assert conn.poll(IO_TIMEOUT)
        if i % 2:
            buf = bytearray(n + 11)
            k = conn.recv_bytes_into(buf, 5)
            assert k == n
            assert buf[:5] == bytes(5) and buf[5 + k:] == bytes(6)
            datas.append(bytes(buf[5:5 + k]))
        else:
            datas.append(conn.recv_bytes())
    assert conn.poll(IO_TIMEOUT)
    digests = conn.recv()
    assert [len(d) for d in datas] == list(sizes)
    assert [hashlib.sha256(d).digest() for d in datas] == digests, "fastnet received other bytes"
    for d in datas:
        conn.send_bytes(d)
    if closer == "fastnet":
        conn.close()
    else:
        assert conn.poll(IO_TIMEOUT)
        with pytest.raises(EOFError):
            conn.recv_bytes()
        conn.close()
    return [[len(p), hashlib.sha256(p).hexdigest()] for p in payloads]


def _check_reply(reply, sent, closer):
    assert reply["ok"], reply
    assert reply["obj_ok"] is True
    assert reply["received"] == sent
    assert reply["echo_bad"] == []
    if closer == "fastnet":
        assert reply["eof"] is True


def _session_via_stdlib_listener(peer, address, client_key, sizes, **client_kw):
    """The peer accepts (its Listener already bound), fastnet connects; both exchange."""
    peer.send(op="accept", session=_exchange(sizes, "fastnet"))
    conn = fastnet.Client(address, authkey=client_key, timeout=IO_TIMEOUT, **client_kw)
    sent = _fastnet_side(conn, peer.interp, sizes, "fastnet")
    _check_reply(peer.reply(), sent, "fastnet")


def _session_via_fastnet_listener(peer, listener, peer_key, sizes):
    """fastnet accepts, the peer's Client connects; both exchange."""
    peer.send(op="connect", address=listener.address, authkey=_hex(peer_key),
              session=_exchange(sizes, "peer"))
    conn = _accept(listener, peer)
    sent = _fastnet_side(conn, peer.interp, sizes, "peer")
    _check_reply(peer.reply(), sent, "peer")


def _stdlib_listen(peer, address, key):
    r = peer.request(op="listen", address=address, authkey=_hex(key))
    assert r["ok"], r
    a = r["address"]
    return tuple(a) if isinstance(a, list) else a


# -- sessions: handshake, pickled objects, payloads both ways ------------------

@pytest.mark.parametrize("key", [KEY, None], ids=["key", "nokey"])
@pytest.mark.parametrize("family", ["tcp", "unix", "abstract"])
def test_stdlib_listener_fastnet_client(peer, workdir, family, key):
    address = _stdlib_listen(peer, _address(family, workdir), key)
    if family == "tcp":
        assert address[0] == "127.0.0.1" and address[1] > 0
    _session_via_stdlib_listener(peer, address, key, SIZES)


@pytest.mark.parametrize("key", [KEY, None], ids=["key", "nokey"])
@pytest.mark.parametrize("family", ["tcp", "unix", "abstract"])
def test_fastnet_listener_stdlib_client(peer, workdir, family, key):
    with fastnet.Listener(_address(family, workdir), authkey=key) as listener:
        _session_via_fastnet_listener(peer, listener, key, SIZES)


# -- wrong keys ------------------------------------------------------------------

@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_wrong_key_stdlib_listener(peer, workdir, family):
    address = _stdlib_listen(peer, _address(family, workdir), KEY)
    peer.send(op="accept", session=_exchange(SMALL, "fastnet"))
    # the stdlib Listener verifies first: it sends #FAILURE# and raises, so the
    # fastnet Client is told its digest was rejected
    with pytest.raises(fastnet.AuthenticationError) as info:
        fastnet.Client(address, authkey=WRONG_KEY, timeout=IO_TIMEOUT)
    assert isinstance(info.value, multiprocessing.AuthenticationError)
    r = peer.reply()
    assert not r["ok"] and r["auth_error"] and r["error"] == "AuthenticationError", r
    assert "digest received was wrong" in r["msg"]
    # the stdlib Listener survives it too: the right key now works
    _session_via_stdlib_listener(peer, address, KEY, SMALL)


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_wrong_key_fastnet_listener(peer, workdir, family):
    with fastnet.Listener(_address(family, workdir), authkey=KEY) as listener:
        peer.send(op="connect", address=listener.address, authkey=_hex(WRONG_KEY),
                  session=_exchange(SMALL, "peer"))
        with pytest.raises(multiprocessing.AuthenticationError) as info:
            _accept(listener, peer)
        assert isinstance(info.value, fastnet.AuthenticationError)
        r = peer.reply()
        assert not r["ok"] and r["auth_error"] and r["error"] == "AuthenticationError", r
        assert "digest sent was rejected" in r["msg"]
        # a fastnet Listener keeps accepting after a failed handshake
        _session_via_fastnet_listener(peer, listener, KEY, SMALL)
        _session_via_fastnet_listener(peer, listener, KEY, SMALL)


# -- a key on one side only ---------------------------------------------------------

def _challenge_shape(interp, frame):
    if interp.legacy:
        return len(frame) == 11 + 20 and frame.startswith(b"#CHALLENGE#")
    return len(frame) == 11 + 8 + 40 and frame.startswith(b"#CHALLENGE#{sha256}")


def test_one_sided_key_stdlib_listener(peer):
    # keyed stdlib Listener, fastnet Client without a key: its first message is
    # taken as the answer to the challenge and refused
    address = _stdlib_listen(peer, ("127.0.0.1", 0), KEY)
    peer.send(op="accept", session=None)
    conn = fastnet.Client(address, timeout=IO_TIMEOUT)
    conn.send_bytes(b"hello")
    assert _challenge_shape(peer.interp, _recv(conn))
    assert _recv(conn) == b"#FAILURE#"
    conn.close()
    r = peer.reply()
    assert not r["ok"] and r["auth_error"], r

    # stdlib Listener without a key, keyed fastnet Client: what arrives is no
    # challenge, the Client raises and hangs up without sending anything
    address = _stdlib_listen(peer, ("127.0.0.1", 0), None)
    peer.send(op="accept", session={"kind": "raw", "send": [b"hello".hex()]})
    with pytest.raises(fastnet.AuthenticationError):
        fastnet.Client(address, authkey=KEY, timeout=IO_TIMEOUT)
    r = peer.reply()
    assert r == {"ok": True, "frames": [], "end": "EOFError"}


def test_one_sided_key_fastnet_listener(peer):
    # keyed fastnet Listener, stdlib Client without a key: the stdlib sees the
    # challenge and #FAILURE# as plain frames, then the end of the stream
    with fastnet.Listener(("127.0.0.1", 0), authkey=KEY) as listener:
        peer.send(op="connect", address=listener.address, authkey=None,
                  session={"kind": "raw", "send": [b"hello".hex()]})
        with pytest.raises(fastnet.AuthenticationError):
            _accept(listener, peer)
        r = peer.reply()
        assert r["ok"] and r["end"] == "EOFError", r
        frames = [bytes.fromhex(f) for f in r["frames"]]
        assert len(frames) == 2 and frames[1] == b"#FAILURE#", r
        assert frames[0].startswith(b"#CHALLENGE#{sha256}") and len(frames[0]) == 59, r
        # and the Listener still serves a keyed stdlib Client
        _session_via_fastnet_listener(peer, listener, KEY, SMALL)

    # fastnet Listener without a key, keyed stdlib Client: the stdlib Client
    # finds no challenge (3.10/3.11: AssertionError, 3.12+: AuthenticationError)
    with fastnet.Listener(("127.0.0.1", 0)) as listener:
        peer.send(op="connect", address=listener.address, authkey=_hex(KEY), session=None)
        conn = _accept(listener, peer)
        conn.send_bytes(b"hello")
        r = peer.reply()
        assert not r["ok"], r
        if peer.interp.legacy:
            assert r["error"] == "AssertionError", r
        else:
            assert r["auth_error"] and "expected challenge" in r["msg"], r
        assert conn.poll(IO_TIMEOUT)
        with pytest.raises(EOFError):
            conn.recv_bytes()
        conn.close()


# -- strict=True: no MD5 ------------------------------------------------------------

def test_strict_fastnet_listener(peer):
    with fastnet.Listener(("127.0.0.1", 0), authkey=KEY, strict=True) as listener:
        if peer.interp.legacy:
            # a 3.10/3.11 Client answers the {sha256} challenge with raw HMAC-MD5
            peer.send(op="connect", address=listener.address, authkey=_hex(KEY), session=None)
            with pytest.raises(fastnet.AuthenticationError, match="(?i)md5"):
                _accept(listener, peer)
            r = peer.reply()
            assert not r["ok"] and r["auth_error"] and "digest sent was rejected" in r["msg"], r
        else:
            _session_via_fastnet_listener(peer, listener, KEY, SMALL)


def test_strict_fastnet_client(peer):
    address = _stdlib_listen(peer, ("127.0.0.1", 0), KEY)
    if peer.interp.legacy:
        # a 3.10/3.11 Listener sends the legacy challenge: refused unanswered, so
        # the stdlib Listener sees the connection end (EOFError)
        peer.send(op="accept", session=None)
        with pytest.raises(fastnet.AuthenticationError, match="(?i)md5"):
            fastnet.Client(address, authkey=KEY, timeout=IO_TIMEOUT, strict=True)
        r = peer.reply()
        assert not r["ok"] and r["error"] == "EOFError", r
    else:
        _session_via_stdlib_listener(peer, address, KEY, SMALL, strict=True)


# -- the digest fastnet challenges with -----------------------------------------------

# None is the legacy 20-byte MD5 challenge of CPython < 3.12, which every
# stdlib version answers; a legacy peer answers any prefixed one with raw MD5.
DIGESTS = [None, "sha256", "sha384", "sha3_256", "sha3_384", "md5"]


def test_digests_fastnet_listener(peer):
    for digest in DIGESTS:
        with fastnet.Listener(("127.0.0.1", 0), authkey=KEY, digest=digest) as listener:
            _session_via_fastnet_listener(peer, listener, KEY, [0, 7])


def test_digests_fastnet_client(peer):
    address = _stdlib_listen(peer, ("127.0.0.1", 0), KEY)
    for digest in DIGESTS:
        _session_via_stdlib_listener(peer, address, KEY, [0, 7], digest=digest)


# -- raw bytes in this process ----------------------------------------------------------

def _drain(sock, out):
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return
        out.append(chunk)


def _capture(write):
    """The bytes ``write(sock)`` puts on a socketpair, read until it closes its end."""
    a, b = socket.socketpair()
    chunks = []
    reader = threading.Thread(target=_drain, args=(b, chunks), daemon=True)
    reader.start()
    try:
        write(a)
    finally:
        a.close()
    reader.join(IO_TIMEOUT)
    assert not reader.is_alive()
    b.close()
    return b"".join(chunks)


FRAME_SIZES = [0, 1, 16384, 16385, 65535, 65536, 262145, 5 * 2**20 + 3]


def test_send_bytes_headers_are_stdlib_struct():
    payloads = [os.urandom(n) for n in FRAME_SIZES]

    def write(sock):
        conn = fastnet.Connection(sock.dup())
        for p in payloads:
            conn.send_bytes(p)
        conn.close()

    stream = _capture(write)
    want = b"".join(struct.pack("!i", len(p)) + p for p in payloads)
    _same(stream, want, "fastnet frames")


def _ops(conn):
    conn.send_bytes(b"")
    conn.send_bytes(b"abc")
    conn.send_bytes(bytearray(b"x" * 16385))
    conn.send_bytes(memoryview(b"0123456789")[2:8])
    conn.send_bytes(b"0123456789", 3)
    conn.send_bytes(b"0123456789", 3, 4)
    conn.send_bytes(b"0123456789", 10, 0)
    conn.send_bytes(array.array("i", range(10)), 8, 12)  # offset and size count bytes
    conn.send_bytes(array.array("d", [1.5] * 3000))
    conn.send(OBJ)
    conn.send(None)
    conn.send(list(range(5000)))


def test_stream_identical_to_stdlib_connection():
    def with_stdlib(sock):
        c = mpc.Connection(os.dup(sock.fileno()))
        _ops(c)
        c.close()

    def with_fastnet(sock):
        c = fastnet.Connection(sock.dup())
        _ops(c)
        c.close()

    want = _capture(with_stdlib)
    got = _capture(with_fastnet)
    _same(got, want, "fastnet stream vs multiprocessing.connection stream")


def test_huge_frame_header_form():
    # payloads over 0x7fffffff: length -1 then an 8-byte unsigned length, as
    # multiprocessing writes them (not sendable here; only the header)
    assert _framing.encode_header(0x7fffffff) == struct.pack("!i", 0x7fffffff)
    assert _framing.encode_header(0x80000000) == struct.pack("!i", -1) + struct.pack("!Q", 0x80000000)


def _frame(data):
    return struct.pack("!i", len(data)) + data


def _read_frame(sock):
    sock.settimeout(IO_TIMEOUT)
    header = b""
    while len(header) < 4:
        chunk = sock.recv(4 - len(header))
        assert chunk, "closed"
        header += chunk
    (n,) = struct.unpack("!i", header)
    body = b""
    while len(body) < n:
        chunk = sock.recv(n - len(body))
        assert chunk, "closed"
        body += chunk
    return body


def _in_thread(fn):
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # reported by the caller
            result["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, result


@pytest.mark.parametrize("legacy", [False, True], ids=["sha256", "legacy-md5"])
def test_client_handshake_bytes(legacy):
    """fastnet's Client answers and challenges with exactly the stdlib's bytes."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        t, result = _in_thread(lambda: fastnet.Client(srv.getsockname(), authkey=KEY, timeout=IO_TIMEOUT))
        srv.settimeout(IO_TIMEOUT)
        s, _ = srv.accept()
        with s:
            nonce = os.urandom(20) if legacy else b"{sha256}" + os.urandom(40)
            s.sendall(_frame(b"#CHALLENGE#" + nonce))
            response = _read_frame(s)
            if legacy:
                assert response == hmac.digest(KEY, nonce, "md5")
            else:
                assert response == b"{sha256}" + hmac.digest(KEY, nonce, "sha256")
            s.sendall(_frame(b"#WELCOME#"))
            challenge = _read_frame(s)
            assert challenge.startswith(b"#CHALLENGE#{sha256}") and len(challenge) == 59
            theirs = challenge[len(b"#CHALLENGE#"):]
            s.sendall(_frame(b"{sha256}" + hmac.digest(KEY, theirs, "sha256")))
            assert _read_frame(s) == b"#WELCOME#"
            t.join(IO_TIMEOUT)
            assert "error" not in result, result
            conn = result["value"]
            conn.send_bytes(b"after")
            assert _read_frame(s) == b"after"
            conn.close()


@pytest.mark.parametrize("digest", ["sha256", None], ids=["sha256", "legacy-md5"])
def test_listener_handshake_bytes(digest):
    """fastnet's Listener challenges and answers with exactly the stdlib's bytes."""
    with fastnet.Listener(("127.0.0.1", 0), authkey=KEY, digest=digest) as listener:
        t, result = _in_thread(listener.accept)
        with socket.create_connection(listener.address, IO_TIMEOUT) as s:
            challenge = _read_frame(s)
            assert challenge.startswith(b"#CHALLENGE#")
            nonce = challenge[len(b"#CHALLENGE#"):]
            if digest is None:
                assert len(nonce) == 20
                s.sendall(_frame(hmac.digest(KEY, nonce, "md5")))
            else:
                assert nonce.startswith(b"{sha256}") and len(nonce) == 48
                s.sendall(_frame(b"{sha256}" + hmac.digest(KEY, nonce, "sha256")))
            assert _read_frame(s) == b"#WELCOME#"
            ours = b"{sha256}" + os.urandom(40)
            s.sendall(_frame(b"#CHALLENGE#" + ours))
            assert _read_frame(s) == b"{sha256}" + hmac.digest(KEY, ours, "sha256")
            s.sendall(_frame(b"#WELCOME#"))
            t.join(IO_TIMEOUT)
            assert "error" not in result, result
            conn = result["value"]
            s.sendall(_frame(b"ping"))
            assert conn.poll(IO_TIMEOUT) and conn.recv_bytes() == b"ping"
            conn.close()
