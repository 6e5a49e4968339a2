"""Load: 10,000 concurrent connections on one server, 64 threads on one RPCProxy, and a
connection flood beyond max_connections while existing clients keep working.

Servers run in processes of their own (``tools/soak.py serve``) with RLIMIT_NOFILE
raised; the 10,000 connections come from four client processes driving non-blocking
sockets on epoll, each connection making a request and checking its reply twice (once
as it connects, once more when all 10,000 are open at the same time). Latencies under
the flood are measured and reported (``FIGURE`` lines; $FASTNET_FIGURES), never
asserted: what is asserted is that every call completed correctly and that the server
never held more connections than max_connections.
"""
import collections
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import fastnet
from fastnet.errors import ConnectionLost

import fastnet_soak as soak   # tools/soak.py, loaded by conftest: server hosts, checked workloads, figures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WAIT = 60.0
KEY = "load-key"


@pytest.fixture
def procs():
    made = []

    def make(code, *args):
        env = dict(os.environ)
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                             text=True, bufsize=1)
        made.append(p)
        return p

    yield make
    for p in made:
        finish(p)


def finish(p):
    """Kill (if need be) and reap a client process, and close our ends of its pipes."""
    if p.poll() is None:
        p.kill()
    p.wait(WAIT)
    for f in (p.stdin, p.stdout, p.stderr):
        try:
            f.close()
        except OSError:
            pass


def readline(p, timeout=WAIT):
    import select
    if not select.select([p.stdout], [], [], timeout)[0]:
        raise AssertionError(f"no line from client process {p.pid} in {timeout} s")
    line = p.stdout.readline()
    if not line:
        raise AssertionError(f"client process ended: {p.wait(WAIT)} {p.stderr.read()[-3000:]}")
    return line.strip()


# -- 10,000 concurrent connections --------------------------------------------------------

MASS_CLIENT = r"""
import os, resource, select, socket, struct, sys, time
host, port, n, base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 512), hard))
ep = select.epoll()
socks = {}
state = {}        # fd -> [connection number, phase, bytes read]
bad = []
INFLIGHT = 256    # connects in progress at once


def frame(i, seq):
    payload = struct.pack("!Q", seq) + b"conn %d" % i
    return struct.pack("!i", len(payload)) + payload


def readable(fd, seq, done_phase):
    # read a reply; True once it is complete (checked) or the connection failed
    st = state[fd]
    data = socks[fd].recv(4096)
    if not data:
        bad.append(f"conn {st[0]}: closed by the server")
        ep.unregister(fd)
        return True
    st[2] += data
    if len(st[2]) < 4 or len(st[2]) < 4 + struct.unpack_from("!i", st[2])[0]:
        return False
    ln = struct.unpack_from("!i", st[2])[0]
    reply, st[2] = st[2][4:4 + ln], st[2][4 + ln:]
    if reply[:8] != struct.pack("!Q", seq) or reply[12:13] != b"\x01" or reply[13:] != b"conn %d" % st[0]:
        bad.append(f"conn {st[0]}: wrong reply {reply!r}")
    st[1] = done_phase
    return True


# round 1: connect (at most INFLIGHT at a time), one request/reply each, keep every connection open
t0 = time.monotonic()
pending = set()
i = 0
while i < n or pending:
    while i < n and len(pending) < INFLIGHT:
        s = socket.socket()
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        socks[s.fileno()] = s
        state[s.fileno()] = [base + i, "connecting", b""]
        ep.register(s.fileno(), select.EPOLLOUT)
        pending.add(s.fileno())
        i += 1
    events = ep.poll(10.0)
    if not events:
        bad.append(f"stalled with {len(pending)} connections pending")
        break
    for fd, ev in events:
        st = state[fd]
        if st[1] == "connecting":
            err = socks[fd].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                bad.append(f"connect {st[0]}: {os.strerror(err)}")
                ep.unregister(fd)
                pending.discard(fd)
                continue
            socks[fd].send(frame(st[0], 0))
            st[1] = "sent0"
            ep.modify(fd, select.EPOLLIN)
        elif readable(fd, 0, "ok0"):
            pending.discard(fd)
t1 = time.monotonic()
ok = sum(1 for st in state.values() if st[1] == "ok0")
print(f"CONNECTED {ok} {t1 - t0:.3f} {len(bad)} {' | '.join(bad[:5])}", flush=True)

# round 2, once every process has all its connections open: another request/reply on each
sys.stdin.readline()
t0 = time.monotonic()
todo = set()
for fd, st in state.items():
    if st[1] == "ok0":
        socks[fd].send(frame(st[0], 1))
        st[1] = "sent1"
        todo.add(fd)
while todo:
    events = ep.poll(10.0)
    if not events:
        bad.append(f"{len(todo)} second replies missing")
        break
    for fd, ev in events:
        if readable(fd, 1, "ok1"):
            todo.discard(fd)
t1 = time.monotonic()
ok = sum(1 for st in state.values() if st[1] == "ok1")
print(f"ROUND2 {ok} {t1 - t0:.3f} {len(bad)} {' | '.join(bad[:5])}", flush=True)
sys.stdin.readline()
for s in socks.values():
    s.close()
print("CLOSED", flush=True)
"""

N_CONN = 10_000
N_PROC = 4


def test_ten_thousand_concurrent_connections(hosts, procs):
    soak.raise_nofile(N_CONN + 1024)
    echo = hosts({"kind": "echo", "address": ["127.0.0.1", 0], "backend": "epoll", "nofile": N_CONN + 2048,
                  "max_connections": N_CONN + 1000, "backlog": 4096})
    base = echo.stats()
    per = N_CONN // N_PROC
    host, port = echo.address
    t0 = time.monotonic()
    clients = [procs(MASS_CLIENT, host, port, per, k * per) for k in range(N_PROC)]
    connected = [readline(p).split(None, 4) for p in clients]
    t_connect = time.monotonic() - t0
    assert [c[1] for c in connected] == [str(per)] * N_PROC, connected
    assert all(c[3] == "0" for c in connected), connected
    rep = echo.stats()
    # all of them open at once, on one server process
    assert rep["stats"]["connections_open"] == N_CONN, rep
    assert rep["fds"] >= N_CONN
    for p in clients:
        p.stdin.write("ROUND2\n")
        p.stdin.flush()
    t0 = time.monotonic()
    round2 = [readline(p).split(None, 4) for p in clients]
    t_round2 = time.monotonic() - t0
    assert [r[1] for r in round2] == [str(per)] * N_PROC and all(r[3] == "0" for r in round2), round2
    mid = echo.stats()
    assert mid["stats"]["messages_in"] >= 2 * N_CONN
    for p in clients:
        p.stdin.write("CLOSE\n")
        p.stdin.flush()
    assert [readline(p) for p in clients] == ["CLOSED"] * N_PROC
    end = echo.wait_stats(lambda r: r["stats"]["connections_open"] == 0 and r["fds"] == base["fds"])
    assert end["stats"]["connections_open"] == 0 and end["fds"] == base["fds"], end
    assert end["stats"]["connections_total"] == N_CONN and end["stats"]["connections_refused"] == 0
    soak.record_figure("10,000 concurrent connections, one server (epoll)", connections=N_CONN,
                       client_processes=N_PROC, connect_and_first_reply_s=round(t_connect, 2),
                       second_round_all_open_s=round(t_round2, 2),
                       server_rss_mib_idle=round(base["rss_kib"] / 1024, 1),
                       server_rss_mib_at_10k=round(rep["rss_kib"] / 1024, 1),
                       kib_per_connection=round((rep["rss_kib"] - base["rss_kib"]) / N_CONN, 1),
                       server_fds_at_10k=rep["fds"], fds_after=end["fds"], fds_leaked=end["fds"] - base["fds"],
                       replies_checked=2 * N_CONN, wrong=0)


# -- 64 threads on one RPCProxy -------------------------------------------------------------

def test_64_threads_share_one_proxy(hosts, tmp_path):
    log = str(tmp_path / "calls.log")
    rpc = hosts({"kind": "rpc", "address": ["127.0.0.1", 0], "log": log, "authkey": KEY})
    base = rpc.stats()
    before = soak.fd_count()
    calls_per_thread = 150
    results = {}
    errors = []
    lat = []
    lock = threading.Lock()
    barrier = threading.Barrier(64)
    with fastnet.RPCProxy(rpc.address, authkey=KEY.encode(), timeout=WAIT) as proxy:
        def worker(t):
            barrier.wait()
            mine = {}
            my_lat = []
            try:
                for k in range(calls_per_thread):
                    seq = t * 100_000 + k
                    if t % 4 == 0 and k % 10 == 0:
                        # a burst of asynchronous calls on the same proxy
                        futs = [(seq + 50_000 + j, proxy.call_async("do", seq + 50_000 + j)) for j in range(8)]
                        for s, f in futs:
                            mine[s] = f.result(WAIT)
                    t0 = time.perf_counter()
                    mine[seq] = proxy.do(seq)
                    my_lat.append(time.perf_counter() - t0)
            except Exception as e:
                errors.append(f"thread {t}: {type(e).__name__}: {e}")
            with lock:
                results.update(mine)
                lat.extend(my_lat)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(64)]
        t0 = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join(WAIT * 2)
        elapsed = time.monotonic() - t0
        assert not any(th.is_alive() for th in threads)
    assert errors == []
    wrong = {s: r for s, r in results.items() if r != 3 * s + 1}
    assert wrong == {}
    ran = collections.Counter(int(x) for x in open(log).read().split())
    assert set(ran) == set(results) and max(ran.values()) == 1
    rep = rpc.wait_stats(lambda r: r["stats"]["connections_open"] == 0 and r["fds"] == base["fds"])
    assert rep["fds"] == base["fds"]
    assert soak.fd_count() == before
    pct = soak.percentiles([x * 1e3 for x in lat])
    soak.record_figure("64 threads sharing one RPCProxy", calls=len(results), wrong=0, ran_twice=0,
                       calls_per_s=round(len(results) / elapsed),
                       sync_call_ms={k: round(v, 3) if k != "n" else v for k, v in pct.items()})


# -- a connection flood beyond max_connections ------------------------------------------------

FLOOD = r"""
import socket, struct, sys, time
host, port, seconds, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
frame = struct.pack("!i", 8) + struct.pack("!Q", 0)
held = []
c = {"attempts": 0, "connected": 0, "connect_failed": 0, "served": 0, "closed_by_server": 0, "waiting": 0}

def settle(s):
    try:
        data = s.recv(64)
        if data:
            c["served"] += 1
        else:
            c["closed_by_server"] += 1
    except BlockingIOError:
        c["waiting"] += 1
    except OSError:
        c["closed_by_server"] += 1
    s.close()

print("GO", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    c["attempts"] += 1
    try:
        s = socket.create_connection((host, port), timeout=0.2)
    except OSError:
        c["connect_failed"] += 1
        continue
    c["connected"] += 1
    s.setblocking(False)
    try:
        s.send(frame)
    except OSError:
        pass
    held.append(s)
    if len(held) > hold:
        settle(held.pop(0))
for s in held:
    settle(s)
import json
print(json.dumps(c), flush=True)
"""

MAX_CONN = 64
MEASURED = 8


@pytest.mark.parametrize("overflow", ["refuse", "wait"])
def test_connection_flood_beyond_max_connections(hosts, procs, overflow):
    echo = hosts({"kind": "echo", "address": ["127.0.0.1", 0], "max_connections": MAX_CONN,
                  "overflow": overflow, "backlog": 128})
    base = echo.stats()
    before = soak.fd_count()
    # the existing clients: request/reply every millisecond, every round trip measured
    clients = soak.StreamWorkload(echo.address, clients=MEASURED, latencies=True, pace=0.001,
                                  reconnect=False).start()
    peak = []
    stop_sampling = threading.Event()
    try:
        time.sleep(2.0)
        t_flood = time.monotonic()
        flooders = [procs(FLOOD, *echo.address, 3.0, 300) for _ in range(2)]
        assert [readline(f) for f in flooders] == ["GO", "GO"]

        def sample():
            while not stop_sampling.is_set():
                peak.append(echo.stats()["stats"]["connections_open"])
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        counts = [json.loads(readline(f, 30)) for f in flooders]
        t_flood_end = time.monotonic()
        for f in flooders:
            finish(f)
        stop_sampling.set()
        sampler.join()
        time.sleep(1.0)
    finally:
        stop_sampling.set()
        clients.stop()
    flood = {k: sum(c[k] for c in counts) for k in counts[0]}
    # every call of the existing clients completed correctly, none was dropped
    assert clients.check() == []
    assert [r.as_dict() for r in clients.records if r.error] == []
    assert len(clients.records) == MEASURED
    assert max(peak) <= MAX_CONN, f"the server held {max(peak)} connections, max_connections={MAX_CONN}"
    rep = echo.wait_stats(lambda r: r["stats"]["connections_open"] == 0 and r["fds"] == base["fds"])
    assert rep["fds"] == base["fds"], rep
    if overflow == "refuse":
        assert rep["stats"]["connections_refused"] > 0
        assert flood["closed_by_server"] > 0
    else:
        assert rep["stats"]["connections_refused"] == 0
    assert soak.fd_count() == before
    lat = clients.latencies

    def window(a, b):
        return soak.percentiles([rtt * 1e3 for ts, rtt in lat if a <= ts < b])

    # the latencies carry perf_counter timestamps: convert the phase boundaries
    off = time.perf_counter() - time.monotonic()
    pre = window(t_flood - 2.0 + off, t_flood + off)
    during = window(t_flood + off, t_flood_end + off)
    r3 = {k: round(v, 3) if k != "n" else v for k, v in pre.items()}
    d3 = {k: round(v, 3) if k != "n" else v for k, v in during.items()}
    soak.record_figure(f"connection flood beyond max_connections={MAX_CONN}, overflow={overflow}",
                       existing_clients=MEASURED, round_trips=clients.messages, wrong_or_lost=0,
                       rtt_ms_before=r3, rtt_ms_during=d3, flood=flood,
                       server_refused=rep["stats"]["connections_refused"], peak_open=max(peak))


def test_rpc_proxy_refused_by_a_full_server_raises_connection_lost(hosts):
    """overflow="refuse": a full RPCServer accepts and closes new connections at once.

    A proxy that meets that refusal cannot open its connection: the RPC contract
    (ConnectionLost: "could not be re-opened") asks for ConnectionLost once its
    connect_timeout has passed, not for an authentication error that blames the key.
    (With an authkey the outcome is deterministic: the proxy reads the server's
    challenge first and finds the connection closed. Without one it races: its hello
    meets either the FIN, a ProtocolError, or an RST, an OSError that is retried.)
    """
    rpc = hosts({"kind": "rpc", "address": ["127.0.0.1", 0], "max_connections": 2, "overflow": "refuse",
                 "authkey": KEY})
    key = KEY.encode()
    held = [fastnet.RPCProxy(rpc.address, authkey=key, timeout=WAIT) for _ in range(2)]
    try:
        assert [p.do(i) for i, p in enumerate(held)] == [1, 4]
        late = fastnet.RPCProxy(rpc.address, authkey=key, timeout=WAIT, lazy=True, connect_timeout=1.0)
        try:
            with pytest.raises(ConnectionLost):
                late.do(7)
        finally:
            late.close()
        # the held proxies are unaffected
        assert [p.do(i + 10) for i, p in enumerate(held)] == [31, 34]
    finally:
        for p in held:
            p.close()


def test_rpc_proxy_waiting_for_a_full_server_gets_in_when_a_slot_frees(hosts):
    rpc = hosts({"kind": "rpc", "address": ["127.0.0.1", 0], "max_connections": 2, "overflow": "wait"})
    held = [fastnet.RPCProxy(rpc.address, timeout=WAIT) for _ in range(2)]
    assert [p.do(i) for i, p in enumerate(held)] == [1, 4]
    # nothing frees a slot: the waiting proxy gives up with ConnectionLost after connect_timeout
    with fastnet.RPCProxy(rpc.address, timeout=WAIT, lazy=True, connect_timeout=1.0) as late:
        with pytest.raises(ConnectionLost):
            late.do(7)
    # a slot frees while it waits: it gets in and its call runs
    with fastnet.RPCProxy(rpc.address, timeout=WAIT, lazy=True, connect_timeout=WAIT) as late:
        threading.Timer(0.5, held[0].close).start()
        assert late.do(8) == 25
    held[1].close()
