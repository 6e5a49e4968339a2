#!/usr/bin/env python3
"""Reliability harness for fastnet: servers in processes of their own, checked workloads, a soak.

The soak (the documented long run is one hour)::

    python3 tools/soak.py --minutes 60
    python3 tools/soak.py --seconds 90 --json soak.json --max-rss-growth-mib 20

runs mixed RPC calls, sequence-numbered message streams, bulk arrays and
connection churn against three servers, each in its own process, samples
the RSS and descriptor count of the client (this process) and of every
server once a second, and reports the growth after the warm-up. It exits
with status 1 if a workload saw a wrong, lost or duplicated message, if a
descriptor count did not come back to its baseline once every connection
was closed, or if RSS grew more than ``--max-rss-growth-mib``.

``python3 tools/soak.py serve CONFIG_JSON`` runs one server of the harness
in the calling process; the tests start those with :class:`ServerHost`
(optionally inside a network namespace). It prints ``READY {json}`` and then
answers ``stats`` lines on stdin with one JSON line; ``quit`` (or the end
of stdin) shuts it down. Server kinds:

``echo``
    a ``fastnet.server`` stream server with :class:`SeqEcho`: each message is
    an 8-byte big-endian sequence number plus a payload; the reply is the
    number, the serving process's pid (4 bytes), a flag that is 1 when the
    number is the one this connection expected next (0, 1, 2, ...), and
    the payload.
``rpc``
    a ``fastnet.RPCServer`` whose ``do(seq)`` and ``slow(seq, t)`` append
    ``seq`` to a log file (O_APPEND, before returning ``3*seq + 1``): the
    record of which calls ran, and how often, that survives a killed server.
``arrays``
    a ``fastnet.Listener`` (optionally TLS) with a thread per connection:
    ``b"PUT"`` then an array is answered with its CRC-32 and size;
    ``b"GET n start"`` is answered with ``numpy.arange(start, start+n, dtype=int64)``.
"""
import argparse
import collections
import ctypes
import gc
import itertools
import json
import os
import random
import resource
import select
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fastnet  # noqa: E402
from fastnet.errors import ConnectionLost, FastnetError, TimeoutError as FastnetTimeout  # noqa: E402

SOAK = os.path.abspath(__file__)
WAIT = 30.0

# -- process figures -------------------------------------------------------------------


def fd_count(pid=None):
    """Open descriptors of a process (this one by default), from /proc."""
    if pid is None:
        gc.collect()
        pid = "self"
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_list(pid="self"):
    """{fd: target} of a process, to name what leaked."""
    out = {}
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            out[int(name)] = os.readlink(f"{base}/{name}")
        except OSError:
            pass
    return out


def rss_kib(pid="self"):
    """Resident set size of a process in KiB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


M_MMAP_THRESHOLD = -3


def pin_mmap_threshold(nbytes=128 * 1024):
    """Fix glibc's mmap threshold (as ``MALLOC_MMAP_THRESHOLD_`` would); False if not glibc.

    By default glibc raises the threshold each time a large mmapped block is freed, so
    later multi-MiB buffers (arrays) come from per-thread arenas and, once freed, may
    stay resident there: RSS then wanders by tens of MiB with nothing leaked. With the
    threshold fixed, every large buffer is mapped and unmapped, and RSS growth measures
    what stays allocated.
    """
    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False


def raise_nofile(n):
    """Raise RLIMIT_NOFILE to at least ``n`` (the hard limit too, when we may)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= n:
        return soft
    if hard < n:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
            return n
        except (ValueError, OSError):
            n = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    return n


def percentiles(values, ps=(50, 90, 99, 99.9)):
    """{p: value} of a list (nearest rank), and max; empty dict for no values."""
    if not values:
        return {}
    v = sorted(values)
    out = {}
    for p in ps:
        k = min(len(v) - 1, max(0, int(round(p / 100.0 * len(v) + 0.5)) - 1))
        out[f"p{p:g}"] = v[k]
    out["max"] = v[-1]
    out["n"] = len(v)
    return out


def record_figure(name, **values):
    """Append measured figures to the JSON-lines file named by $FASTNET_FIGURES (if set)."""
    path = os.environ.get("FASTNET_FIGURES")
    line = json.dumps({"name": name, "backend": fastnet.backend, **values}, default=str)
    print(f"FIGURE {line}")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


# -- servers (the ``serve`` command) ----------------------------------------------------

SEQ = struct.Struct("!Q")
PID = struct.Struct("!I")
OK, BAD = b"\x01", b"\x00"


class SeqEcho(fastnet.server.MessageHandler):
    """Replies seq + pid + in-order flag + payload to each ``seq + payload`` message."""

    def setup(self):
        self.expected = 0
        self.pid = PID.pack(os.getpid())

    def message_received(self, data):
        seq = SEQ.unpack_from(data)[0]
        flag = OK if seq == self.expected else BAD
        self.expected = seq + 1
        self.reply(b"".join((data[:8], self.pid, flag, data[8:])))


def _address(a):
    return tuple(a) if isinstance(a, list) else a


def _key(cfg):
    k = cfg.get("authkey")
    return k.encode() if isinstance(k, str) else k


def _server_tls(cfg):
    t = cfg.get("tls")
    if not t:
        return None
    from fastnet import tls
    return tls.server_context(t["cert"], t["key"])


def make_echo(cfg):
    class Server(fastnet.server.UnixServer if isinstance(cfg["address"], str) else fastnet.server.TCPServer):
        request_queue_size = cfg.get("backlog", 128)

    kw = {k: cfg[k] for k in ("concurrency", "workers", "max_connections", "overflow", "idle_timeout",
                              "backend", "handshake_timeout", "max_message_size") if k in cfg}
    return Server(_address(cfg["address"]), SeqEcho, authkey=_key(cfg), ssl_context=_server_tls(cfg), **kw)


def make_rpc(cfg):
    kw = {k: cfg[k] for k in ("workers", "max_connections", "overflow", "idle_timeout", "backend",
                              "handshake_timeout") if k in cfg}
    srv = fastnet.RPCServer(_address(cfg["address"]), authkey=_key(cfg), ssl_context=_server_tls(cfg), **kw)
    log = cfg.get("log")
    logfd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if log else None

    def record(seq):
        if logfd is not None:
            os.write(logfd, b"%d\n" % seq)

    @srv.register
    def do(seq):
        "Record seq as executed; return 3*seq + 1."
        record(seq)
        return seq * 3 + 1

    @srv.register(blocking=True)
    def slow(seq, t):
        "Record seq, sleep t seconds on a worker thread, return 3*seq + 1."
        record(seq)
        time.sleep(t)
        return seq * 3 + 1

    @srv.register
    def checksum(arr):
        "CRC-32 and size of an array's bytes."
        m = memoryview(arr)
        return [zlib.crc32(m.cast("B") if m.c_contiguous else bytes(m)), m.nbytes]

    @srv.register
    def pid():
        return os.getpid()

    return srv


class ArrayServer:
    """A fastnet.Listener answering PUT (checksum of an array) and GET (an arange) requests."""

    def __init__(self, cfg):
        self.listener = fastnet.Listener(_address(cfg["address"]), authkey=_key(cfg), backlog=64,
                                         ssl_context=_server_tls(cfg),
                                         max_message_size=cfg.get("max_message_size", 1 << 30))
        self.address = self.listener.address
        self.lock = threading.Lock()
        self.open = 0
        self.arrays_in = 0
        self.bytes_in = 0
        self.arrays_out = 0
        self.ended = collections.Counter()   # how connections ended, by exception type
        self.threads = []
        self.closing = False

    def start(self):
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        return self

    def _accept(self):
        while not self.closing:
            try:
                conn = self.listener.accept()
            except (FastnetError, OSError, EOFError) as e:
                if self.closing:
                    return
                with self.lock:
                    self.ended["accept:" + type(e).__name__] += 1
                continue
            with self.lock:
                self.open += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()

    def _serve(self, conn):
        import numpy as np
        how = "EOFError"
        try:
            while True:
                cmd = conn.recv_bytes(256)
                if cmd == b"PUT":
                    a = conn.recv_array()
                    m = memoryview(a).cast("B")
                    conn.send_bytes(json.dumps([zlib.crc32(m), m.nbytes]).encode())
                    with self.lock:
                        self.arrays_in += 1
                        self.bytes_in += m.nbytes
                elif cmd.startswith(b"GET "):
                    n, start = map(int, cmd.split()[1:3])
                    conn.send_array(np.arange(start, start + n, dtype=np.int64))
                    with self.lock:
                        self.arrays_out += 1
                else:
                    conn.send_bytes(b"?")
        except EOFError as e:
            how = type(e).__name__
            if isinstance(e, fastnet.TruncatedFrameError):
                how = f"TruncatedFrameError(missing={e.missing})"
        except (FastnetError, OSError) as e:
            how = type(e).__name__
        finally:
            conn.close()
            with self.lock:
                self.open -= 1
                self.ended[how] += 1

    def stats(self):
        with self.lock:
            return {"connections_open": self.open, "arrays_in": self.arrays_in, "bytes_in": self.bytes_in,
                    "arrays_out": self.arrays_out, "ended": dict(self.ended)}

    def shutdown(self):
        self.closing = True
        self.listener.close()

    worker_pids = ()


def serve_main(cfg):
    if cfg.get("pin_mmap_threshold"):
        pin_mmap_threshold()
    if cfg.get("nofile"):
        raise_nofile(cfg["nofile"])
    kind = cfg["kind"]
    if kind == "echo":
        srv = make_echo(cfg)
    elif kind == "rpc":
        srv = make_rpc(cfg)
    elif kind == "arrays":
        srv = ArrayServer(cfg)
    else:
        raise SystemExit(f"unknown server kind {kind!r}")
    srv.start()
    addr = srv.address
    print("READY " + json.dumps({"address": addr, "pid": os.getpid(), "backend": fastnet.backend}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "stats":
            st = srv.stats()
            st.pop("methods", None)
            rep = {"stats": st, "fds": fd_count(), "rss_kib": rss_kib(),
                   "workers": list(getattr(srv, "worker_pids", ()) or ())}
            print(json.dumps(rep), flush=True)
        elif cmd == "fdlist":
            print(json.dumps(fd_list()), flush=True)
        elif cmd == "quit":
            break
    srv.shutdown()
    print("STOPPED", flush=True)


# -- ServerHost: one harness server in a process of its own -----------------------------------


class ServerHost:
    """``python3 tools/soak.py serve CONFIG`` as a child process (in ``netns`` if given).

    ``address`` and ``pid`` come from its READY line; :meth:`stats` asks it
    for its counters, descriptor count and RSS; :meth:`kill` is the fault
    (SIGKILL to the server process only); :meth:`close` kills its whole
    session (prefork workers included) and is always safe to call.
    """

    def __init__(self, cfg, netns=None, timeout=WAIT):
        self.cfg = dict(cfg)
        self.netns = netns
        cmd = [sys.executable, SOAK, "serve", json.dumps(self.cfg)]
        if netns:
            cmd = ["ip", "netns", "exec", netns] + cmd
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                     env=env, start_new_session=True)
        self._buf = b""
        try:
            line = self.readline(timeout)
            if not line.startswith("READY "):
                raise AssertionError(f"server host said {line!r}; stderr: {self.stderr()}")
        except BaseException:
            self.close()
            raise
        info = json.loads(line[6:])
        self.address = _address(info["address"])
        self.pid = info["pid"]

    def stderr(self):
        self.err.seek(0)
        return self.err.read().decode(errors="replace")[-3000:]

    def readline(self, timeout=WAIT):
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"no line from the server host in {timeout} s; stderr: {self.stderr()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"server host closed its stdout; stderr: {self.stderr()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def command(self, cmd, timeout=WAIT):
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()
        return json.loads(self.readline(timeout))

    def stats(self):
        return self.command("stats")

    def fdlist(self):
        return self.command("fdlist")

    def wait_stats(self, predicate, timeout=WAIT, interval=0.05):
        """Poll stats until predicate(report) holds; returns the last report (check it)."""
        deadline = time.monotonic() + timeout
        while True:
            rep = self.stats()
            if predicate(rep) or time.monotonic() > deadline:
                return rep
            time.sleep(interval)

    def kill(self, sig=signal.SIGKILL):
        os.kill(self.pid, sig)
        if sig == signal.SIGKILL:
            self.proc.wait(WAIT)

    def stop(self, timeout=WAIT):
        """Graceful: ``quit``, then wait for the process."""
        try:
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.flush()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.close()

    def close(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.err.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- certificates -------------------------------------------------------------------------


def make_pki(directory, addresses=("127.0.0.1",), names=("localhost",)):
    """A throwaway CA and a server certificate for ``addresses`` and ``names``, as PEM files.

    Returns ``{"ca": path, "cert": path, "key": path}``. Needs the ``cryptography`` package.
    """
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def build(subject, pub, ca):
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name("fastnet soak CA"))
             .public_key(pub).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                              key_encipherment=False, data_encipherment=False, key_agreement=False,
                                              key_cert_sign=True, crl_sign=True, encipher_only=False,
                                              decipher_only=False), critical=True)
            b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        else:
            sans = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
            b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                critical=False)
        return b.sign(ca_key, hashes.SHA256())

    out = {"ca": os.path.join(directory, "ca.pem"), "cert": os.path.join(directory, "server.pem"),
           "key": os.path.join(directory, "server.key")}
    with open(out["ca"], "wb") as f:
        f.write(build("fastnet soak CA", ca_key.public_key(), True).public_bytes(serialization.Encoding.PEM))
    with open(out["cert"], "wb") as f:
        f.write(build(names[0] if names else addresses[0], key.public_key(), False)
                .public_bytes(serialization.Encoding.PEM))
    with open(out["key"], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return out


# -- network namespaces ---------------------------------------------------------------------

CLONE_NEWNET = 0x40000000


def netns_available():
    """None if namespaces can be used here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not any(os.access(os.path.join(p, "ip"), os.X_OK)
               for p in os.environ.get("PATH", "/usr/sbin:/sbin").split(os.pathsep) + ["/usr/sbin", "/sbin"]):
        return "no `ip` command (iproute2)"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True)
    if r.returncode != 0:
        return f"`ip netns` does not work here: {r.stderr.decode().strip()}"
    return None


def ip(*args, check=True):
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


class NetnsPair:
    """Two network namespaces joined by a veth pair: ``a`` (10.X.Y.1) and ``b`` (10.X.Y.2).

    Names are unique per instance; :meth:`close` deletes both namespaces
    (and so the veth) and is safe to call twice.
    """

    def __init__(self, tag="fn"):
        u = f"{os.getpid() % 100000}{random.randrange(1000, 9999)}"
        self.a = f"{tag}a{u}"
        self.b = f"{tag}b{u}"
        self.veth_a = f"va{u}"[:15]
        self.veth_b = f"vb{u}"[:15]
        x, y = random.randrange(16, 250), random.randrange(1, 250)
        self.ip_a = f"10.{x}.{y}.1"
        self.ip_b = f"10.{x}.{y}.2"
        self.made = []
        try:
            for ns in (self.a, self.b):
                ip("netns", "add", ns)
                self.made.append(ns)
            ip("link", "add", self.veth_a, "netns", self.a, "type", "veth", "peer", "name", self.veth_b,
               "netns", self.b)
            for ns, dev, addr in ((self.a, self.veth_a, self.ip_a), (self.b, self.veth_b, self.ip_b)):
                ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                ip("-n", ns, "link", "set", dev, "up")
                ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def link(self, state):
        """``up`` or ``down`` on a's end of the veth (b's end loses its carrier)."""
        ip("-n", self.a, "link", "set", self.veth_a, state)

    def delete_link(self):
        """Delete the veth pair: both ends vanish at once, no FIN, no RST."""
        ip("-n", self.a, "link", "del", self.veth_a, check=False)

    def close(self):
        for ns in self.made:
            # processes still inside keep a namespace alive: kill them first
            r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in r.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            ip("netns", "del", ns, check=False)
        self.made = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def in_netns(ns, fn, *args, timeout=120.0, **kwargs):
    """Run ``fn(*args, **kwargs)`` on a new thread inside network namespace ``ns``; return its result.

    Sockets that thread (and threads it starts) creates belong to ``ns``.
    """
    box = {}

    def run():
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"setns({ns}): {os.strerror(e)}")
        finally:
            os.close(fd)
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:     # re-raised on the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"{fn.__name__} in {ns} did not finish in {timeout} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# -- workloads --------------------------------------------------------------------------------

CLEAN_ERRORS = (EOFError, ConnectionError, FastnetError, OSError)


def _err(e):
    s = f"{type(e).__name__}: {e}"
    return s[:200]


class ConnRecord:
    """One stream connection: what was sent, what came back, how it ended."""
    __slots__ = ("client", "sent", "acked", "error", "pids", "opened", "closed")

    def __init__(self, client):
        self.client = client
        self.sent = 0        # messages whose send_bytes returned
        self.acked = 0       # of those, replies received and checked
        self.error = None    # the exception that ended it, if any
        self.pids = set()    # serving processes
        self.opened = time.monotonic()
        self.closed = None

    def as_dict(self):
        return {"client": self.client, "sent": self.sent, "acked": self.acked, "error": self.error,
                "pids": sorted(self.pids)}


class _Workload:
    def __init__(self):
        self.stop_event = threading.Event()
        self.threads = []
        self.problems = []
        self.lock = threading.Lock()

    def problem(self, text):
        with self.lock:
            if len(self.problems) < 200:
                self.problems.append(text)

    def start(self):
        for i in range(self.nthreads):
            t = threading.Thread(target=self._guard, args=(i,), name=f"{type(self).__name__}-{i}", daemon=True)
            self.threads.append(t)
            t.start()
        return self

    def _guard(self, i):
        try:
            self.run(i)
        except BaseException as e:   # a bug in the harness or an unexpected error: never silent
            self.problem(f"thread {i} died: {_err(e)}")

    def stop(self, timeout=WAIT):
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self.threads if t.is_alive()]
        if alive:
            self.problem(f"threads still running after stop: {alive}")
        return self

    def sleep(self, t):
        return self.stop_event.wait(t)


class StreamWorkload(_Workload):
    """Clients of an ``echo`` server, each on its own thread and connection.

    Each connection sends 0, 1, 2, ... (``window`` messages at a time) and
    checks every reply: same number, flag "in order", same payload. A
    connection that fails is recorded with its error and replaced by a new
    one (numbers start again at 0). :meth:`check` lists every violation of:
    each reply matches its message; for each connection, every message
    whose send returned was answered, or the connection ended in an error.
    """

    def __init__(self, address, clients=4, authkey=None, payload=32, window=1, reconnect=True,
                 ssl_context=None, latencies=False, reply_timeout=20.0, connect_timeout=10.0, pace=0.0):
        super().__init__()
        self.address = address
        self.nthreads = clients
        self.authkey = authkey
        self.payload = payload
        self.window = window
        self.reconnect = reconnect
        self.ssl_context = ssl_context
        self.reply_timeout = reply_timeout
        self.connect_timeout = connect_timeout
        self.pace = pace
        self.records = []
        self.connect_errors = collections.Counter()
        self.latencies = [] if latencies else None    # (time sent, round trip seconds)
        self.messages = 0
        self.conns = {}

    def _payload(self, cid, seq):
        n = self.payload
        if n <= 0:
            return b""
        unit = b"%d:%d;" % (cid, seq)
        return (unit * (n // len(unit) + 1))[:n]

    def run(self, cid):
        while not self.stop_event.is_set():
            try:
                conn = fastnet.Client(self.address, authkey=self.authkey, timeout=self.connect_timeout,
                                      ssl_context=self.ssl_context)
            except CLEAN_ERRORS as e:
                with self.lock:
                    self.connect_errors[type(e).__name__] += 1
                if not self.reconnect:
                    return
                self.sleep(0.05)
                continue
            rec = ConnRecord(cid)
            with self.lock:
                self.records.append(rec)
                self.conns[cid] = conn
            try:
                self._talk(cid, conn, rec)
            except CLEAN_ERRORS as e:
                rec.error = _err(e)
            finally:
                rec.closed = time.monotonic()
                with self.lock:
                    self.conns.pop(cid, None)
                conn.close()
            if not self.reconnect:
                return

    def _talk(self, cid, conn, rec):
        seq = 0
        lat = self.latencies
        while not self.stop_event.is_set():
            batch = []
            for _ in range(self.window):
                msg = SEQ.pack(seq) + self._payload(cid, seq)
                t0 = time.perf_counter()
                conn.send_bytes(msg)
                rec.sent += 1
                batch.append((seq, msg, t0))
                seq += 1
            for s, msg, t0 in batch:
                if not conn.poll(self.reply_timeout):
                    self.problem(f"client {cid}: no reply to message {s} in {self.reply_timeout} s")
                    raise FastnetTimeout("no reply")
                r = conn.recv_bytes()
                if lat is not None:
                    lat.append((t0, time.perf_counter() - t0))
                got = SEQ.unpack_from(r)[0]
                if got != s:
                    self.problem(f"client {cid}: reply for message {got}, expected {s}")
                    raise FastnetError("out of order")
                if r[12:13] != OK:
                    self.problem(f"client {cid}: the server saw message {s} out of order")
                if r[13:] != msg[8:]:
                    self.problem(f"client {cid}: payload of message {s} corrupted")
                rec.pids.add(PID.unpack_from(r, 8)[0])
                rec.acked += 1
                with self.lock:
                    self.messages += 1
            if self.pace:
                self.sleep(self.pace)

    def check(self):
        """Violations of the contract (empty when nothing was lost, duplicated or corrupted)."""
        out = list(self.problems)
        for r in self.records:
            if r.closed is None:
                out.append(f"client {r.client}: connection never finished")
            elif r.error is None and r.acked != r.sent:
                out.append(f"client {r.client}: {r.sent} sends returned, {r.acked} answered, and no error")
            elif r.acked > r.sent:
                out.append(f"client {r.client}: more replies than messages")
        return out

    def errors(self):
        return collections.Counter(r.error.split(":")[0] for r in self.records if r.error)


class RPCWorkload(_Workload):
    """Threads calling an ``rpc`` server's ``do(seq)`` (and ``slow``/``checksum``) with unique numbers.

    Every call's outcome is kept (``ok``, ``lost`` for ConnectionLost,
    ``timeout``, or the unexpected error); :meth:`check` compares them with
    the server's log: no number ran twice, every call that returned ran
    exactly once, nothing ran that was not called, and no call ended any
    other way than a correct result, ConnectionLost or TimeoutError.
    ``shared=True`` makes all threads share one proxy; ``track=False``
    keeps counts only (for long runs).
    """

    def __init__(self, address, threads=4, authkey=None, shared=False, slow_every=0, slow_time=0.2,
                 array_every=0, array_bytes=65536, timeout=20.0, connect_timeout=10.0, ssl_context=None,
                 track=True, seq_base=0, latencies=False):
        super().__init__()
        self.address = address
        self.nthreads = threads
        self.authkey = authkey
        self.shared = shared
        self.slow_every = slow_every
        self.slow_time = slow_time
        self.array_every = array_every
        self.array_bytes = array_bytes
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        self.track = track
        self.seq = itertools.count(seq_base)
        self.outcomes = {}            # seq -> (outcome, time it ended)
        self.counts = collections.Counter()
        self.proxies = []
        self.latencies = [] if latencies else None
        self._shared = None

    def _proxy(self):
        p = fastnet.RPCProxy(self.address, authkey=self.authkey, timeout=self.timeout, lazy=True,
                             connect_timeout=self.connect_timeout, ssl_context=self.ssl_context)
        with self.lock:
            self.proxies.append(p)
        return p

    def start(self):
        if self.shared:
            self._shared = self._proxy()
        return super().start()

    def run(self, tid):
        import numpy as np
        proxy = self._shared or self._proxy()
        arr = None
        if self.array_every:
            arr = np.frombuffer(os.urandom(self.array_bytes), dtype=np.uint8)
            crc = zlib.crc32(arr)
        while not self.stop_event.is_set():
            seq = next(self.seq)
            t0 = time.perf_counter()
            try:
                if self.array_every and seq % self.array_every == 1:
                    r = proxy.checksum(arr)
                    outcome = "ok" if r == [crc, arr.nbytes] else f"wrong checksum {r!r}"
                    seq = None
                else:
                    if self.slow_every and seq % self.slow_every == 0:
                        r = proxy.slow(seq, self.slow_time)
                    else:
                        r = proxy.do(seq)
                    outcome = "ok" if r == seq * 3 + 1 else f"wrong result {r!r}"
            except ConnectionLost:
                outcome = "lost"
            except FastnetTimeout:
                outcome = "timeout"
            except Exception as e:
                outcome = "error " + _err(e)
            if self.latencies is not None and outcome == "ok":
                self.latencies.append((t0, time.perf_counter() - t0))
            with self.lock:
                self.counts[outcome if outcome in ("ok", "lost", "timeout") else "other"] += 1
                if self.track and seq is not None:
                    self.outcomes[seq] = (outcome, time.monotonic())
            if outcome not in ("ok", "lost", "timeout"):
                self.problem(f"call {seq}: {outcome}")
            if outcome == "lost":
                self.sleep(0.01)

    def stop(self, timeout=WAIT):
        super().stop(timeout)
        for p in self.proxies:
            p.close()
        return self

    def check(self, log_path=None, others=()):
        """Violations; ``others`` are numbers other clients called (each may run at most once)."""
        out = list(self.problems)
        if log_path is None or not self.track:
            return out
        others = set(others)
        ran = collections.Counter()
        with open(log_path) as f:
            for line in f:
                if line.strip():
                    ran[int(line)] += 1
        for seq, n in ran.items():
            if n > 1:
                out.append(f"call {seq} ran {n} times")
            if seq not in self.outcomes and seq not in others:
                out.append(f"call {seq} ran but was never made (or its outcome was not recorded)")
        for seq, (outcome, _) in self.outcomes.items():
            if outcome == "ok" and ran[seq] != 1:
                out.append(f"call {seq} returned but ran {ran[seq]} times")
        return out


class ArrayWorkload(_Workload):
    """Clients of an ``arrays`` server: PUT arrays (checked by CRC) and GET aranges (checked whole)."""

    def __init__(self, address, clients=1, max_bytes=8 << 20, authkey=None, ssl_context=None):
        super().__init__()
        self.address = address
        self.nthreads = clients
        self.max_bytes = max_bytes
        self.authkey = authkey
        self.ssl_context = ssl_context
        self.arrays = 0
        self.bytes = 0
        self.errors = collections.Counter()

    def run(self, tid):
        import numpy as np
        rng = random.Random(tid)
        while not self.stop_event.is_set():
            try:
                conn = fastnet.Client(self.address, authkey=self.authkey, timeout=10.0,
                                      ssl_context=self.ssl_context)
            except CLEAN_ERRORS as e:
                with self.lock:
                    self.errors["connect " + type(e).__name__] += 1
                self.sleep(0.1)
                continue
            try:
                for _ in range(50):
                    if self.stop_event.is_set():
                        break
                    n = rng.randrange(1, self.max_bytes // 8)
                    start = rng.randrange(1 << 40)
                    if rng.random() < 0.5:
                        a = np.arange(start, start + n, dtype=np.int64)
                        conn.send_bytes(b"PUT")
                        conn.send_array(a)
                        if not conn.poll(WAIT):
                            raise FastnetTimeout("no reply to PUT")
                        crc, nbytes = json.loads(conn.recv_bytes())
                        if crc != zlib.crc32(a) or nbytes != a.nbytes:
                            self.problem(f"PUT of {a.nbytes} bytes: server saw crc {crc} size {nbytes}")
                    else:
                        conn.send_bytes(b"GET %d %d" % (n, start))
                        if not conn.poll(WAIT):
                            raise FastnetTimeout("no reply to GET")
                        a = conn.recv_array()
                        if a.shape != (n,) or a[0] != start or a[-1] != start + n - 1 or \
                                not np.array_equal(a, np.arange(start, start + n, dtype=np.int64)):
                            self.problem(f"GET of {n} int64 from {start}: wrong content")
                    with self.lock:
                        self.arrays += 1
                        self.bytes += a.nbytes
                    del a
            except CLEAN_ERRORS as e:
                with self.lock:
                    self.errors[type(e).__name__] += 1
                self.problem(f"array client {tid}: {_err(e)}")
            finally:
                conn.close()


class ChurnWorkload(_Workload):
    """Opens and closes connections: a message on an echo connection, a call on a new proxy."""

    def __init__(self, echo_address, rpc_address, interval=0.05, authkey=None):
        super().__init__()
        self.nthreads = 1
        self.echo_address = echo_address
        self.rpc_address = rpc_address
        self.interval = interval
        self.authkey = authkey
        self.connections = 0

    def run(self, tid):
        n = 0
        while not self.stop_event.is_set():
            try:
                with fastnet.Client(self.echo_address, authkey=self.authkey, timeout=10.0) as c:
                    c.send_bytes(SEQ.pack(0) + b"churn")
                    if not c.poll(WAIT):
                        raise FastnetTimeout("no reply")
                    r = c.recv_bytes()
                    if r[:8] != SEQ.pack(0) or r[13:] != b"churn":
                        self.problem("churn echo: wrong reply")
                with fastnet.RPCProxy(self.rpc_address, authkey=self.authkey, timeout=WAIT) as p:
                    if p.do(-1 - n) != 3 * (-1 - n) + 1:
                        self.problem("churn call: wrong result")
                n += 1
                with self.lock:
                    self.connections += 2
            except CLEAN_ERRORS as e:
                self.problem(f"churn: {_err(e)}")
            self.sleep(self.interval)


# -- the soak -------------------------------------------------------------------------------


def _median(xs):
    return statistics.median(xs) if xs else 0


def growth(samples, key, warmup, window=5):
    """RSS growth (KiB) of a series: median of the last ``window`` samples minus the first after warm-up."""
    after = [s for s in samples if s["t"] >= warmup]
    if len(after) < 2:
        after = samples
    first = [s[key] for s in after[:window]]
    last = [s[key] for s in after[-window:]]
    return {"start_kib": _median(first), "end_kib": _median(last), "growth_kib": _median(last) - _median(first),
            "max_kib": max((s[key] for s in after), default=0)}


def run_soak(seconds, warmup=None, interval=1.0, array_mib=8, authkey=b"soak", quiet=False):
    """Run the soak; return its report (a dict, see the module docstring)."""
    if warmup is None:
        warmup = min(60.0, max(10.0, seconds * 0.2))
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    key = authkey.decode()
    pinned = pin_mmap_threshold()     # see pin_mmap_threshold: RSS growth that means something
    hosts = {}
    try:
        common = {"address": ["127.0.0.1", 0], "authkey": key, "pin_mmap_threshold": pinned}
        hosts["echo"] = ServerHost({"kind": "echo", "idle_timeout": 120, **common})
        hosts["rpc"] = ServerHost({"kind": "rpc", "idle_timeout": 120, **common})
        hosts["arrays"] = ServerHost({"kind": "arrays", **common})
        base = {name: h.stats() for name, h in hosts.items()}
        client_fds0 = fd_count()
        client_fdlist0 = fd_list()
        workloads = {
            "stream": StreamWorkload(hosts["echo"].address, clients=2, authkey=authkey, payload=256, window=8,
                                     reconnect=False),
            "rpc": RPCWorkload(hosts["rpc"].address, threads=2, authkey=authkey, array_every=50,
                               array_bytes=256 << 10, track=False, seq_base=0),
            "arrays": ArrayWorkload(hosts["arrays"].address, clients=1, max_bytes=array_mib << 20,
                                    authkey=authkey),
            "churn": ChurnWorkload(hosts["echo"].address, hosts["rpc"].address, authkey=authkey),
        }
        t0 = time.monotonic()
        for w in workloads.values():
            w.start()
        samples = []
        say(f"soak: {seconds:.0f} s, warm-up {warmup:.0f} s, backend {fastnet.backend}; "
            f"servers pid {', '.join(f'{n}={h.pid}' for n, h in hosts.items())}")
        next_t = t0
        last_say = t0
        while True:
            now = time.monotonic()
            if now - t0 >= seconds:
                break
            s = {"t": round(now - t0, 2), "client_rss": rss_kib(), "client_fds": fd_count(os.getpid())}
            for name, h in hosts.items():
                s[f"{name}_rss"] = rss_kib(h.pid)
                s[f"{name}_fds"] = fd_count(h.pid)
            samples.append(s)
            if now - last_say >= 60 or len(samples) == 1:
                last_say = now
                say(f"  t={s['t']:7.1f}s client rss {s['client_rss']/1024:.1f} MiB fds {s['client_fds']}; "
                    + "; ".join(f"{n} rss {s[n + '_rss']/1024:.1f} MiB fds {s[n + '_fds']}" for n in hosts)
                    + f"; rpc {workloads['rpc'].counts['ok']} stream {workloads['stream'].messages}"
                    f" arrays {workloads['arrays'].arrays}")
            next_t += interval
            time.sleep(max(0.0, next_t - time.monotonic()))
        elapsed = time.monotonic() - t0
        for w in workloads.values():
            w.stop()
        problems = []
        problems += workloads["stream"].check()
        problems += [f"stream: connection ended with {r.error}" for r in workloads["stream"].records if r.error]
        problems += workloads["rpc"].check()
        problems += [f"rpc: {n} calls {k}" for k, n in workloads["rpc"].counts.items() if k != "ok"]
        problems += workloads["arrays"].problems + workloads["churn"].problems
        # every connection closed: the servers' descriptors must come back to where they started
        end = {}
        for name, h in hosts.items():
            end[name] = h.wait_stats(lambda r, b=base[name]: r["stats"]["connections_open"] == 0
                                     and r["fds"] <= b["fds"], timeout=15)
        client_fds1 = fd_count()
        report = {
            "seconds": round(elapsed, 1), "warmup": warmup, "interval": interval, "backend": fastnet.backend,
            "mmap_threshold_pinned": pinned,
            "ops": {
                "rpc_calls": workloads["rpc"].counts["ok"],
                "stream_messages": workloads["stream"].messages,
                "arrays": workloads["arrays"].arrays,
                "array_bytes": workloads["arrays"].bytes,
                "churn_connections": workloads["churn"].connections,
            },
            "problems": problems,
            "client": {**growth(samples, "client_rss", warmup), "fds_baseline": client_fds0,
                       "fds_end": client_fds1},
            "servers": {},
            "samples": samples,
        }
        if client_fds1 != client_fds0:
            after = fd_list()
            report["client"]["fds_leaked"] = {k: v for k, v in after.items() if client_fdlist0.get(k) != v}
        for name in hosts:
            report["servers"][name] = {**growth(samples, f"{name}_rss", warmup),
                                       "fds_baseline": base[name]["fds"], "fds_end": end[name]["fds"],
                                       "connections_open_end": end[name]["stats"]["connections_open"]}
        return report
    finally:
        for h in hosts.values():
            h.stop(timeout=10)


def summarize(rep):
    mib = 1024.0
    lines = [f"soak {rep['seconds']} s (warm-up {rep['warmup']:.0f} s), backend {rep['backend']}",
             "ops: " + ", ".join(f"{k} {v}" for k, v in rep["ops"].items())]
    rows = [("client", rep["client"])] + list(rep["servers"].items())
    lines.append(f"{'process':<8} {'rss start':>10} {'rss end':>10} {'growth':>9} {'rss max':>9} "
                 f"{'fds base':>8} {'fds end':>8}")
    for name, r in rows:
        lines.append(f"{name:<8} {r['start_kib']/mib:9.1f}M {r['end_kib']/mib:9.1f}M "
                     f"{r['growth_kib']/mib:8.2f}M {r['max_kib']/mib:8.1f}M {r['fds_baseline']:>8} {r['fds_end']:>8}")
    lines.append(f"problems: {len(rep['problems'])}" + "".join(f"\n  {p}" for p in rep["problems"][:20]))
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        serve_main(json.loads(argv[1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--minutes", type=float, help="duration in minutes (the documented long run: 60)")
    g.add_argument("--seconds", type=float, help="duration in seconds")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds before RSS growth is measured (default: 20%% of the run, 10..60 s)")
    ap.add_argument("--interval", type=float, default=1.0, help="sampling interval in seconds")
    ap.add_argument("--array-mib", type=int, default=8, help="largest bulk array in MiB")
    ap.add_argument("--json", help="write the report (with every sample) to this file")
    ap.add_argument("--max-rss-growth-mib", type=float, default=None,
                    help="fail (exit 1) if any process's RSS grew more than this after the warm-up")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))    # unwinds: the servers are stopped
    seconds = a.seconds if a.seconds is not None else (a.minutes if a.minutes is not None else 1.0) * 60
    rep = run_soak(seconds, a.warmup, a.interval, a.array_mib)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=1)
    print(summarize(rep))
    bad = bool(rep["problems"])
    for name, r in [("client", rep["client"])] + list(rep["servers"].items()):
        if r["fds_end"] != r["fds_baseline"]:
            print(f"FAIL: {name} descriptors {r['fds_baseline']} -> {r['fds_end']}")
            bad = True
        if a.max_rss_growth_mib is not None and r["growth_kib"] > a.max_rss_growth_mib * 1024:
            print(f"FAIL: {name} RSS grew {r['growth_kib']/1024:.1f} MiB > {a.max_rss_growth_mib} MiB")
            bad = True
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
