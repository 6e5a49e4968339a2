"""fastnet.monitor: a real server's stats() over real HTTP, as JSON and as Prometheus metrics.

Servers and monitors run in this process on ephemeral ports; traffic goes
through fastnet.Client and urllib. The Prometheus output is read back with
prometheus_client's own parser. Every wait has a deadline; nothing asserts
on timing.
"""
import json
import logging
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

import fastnet
from fastnet import monitor
from fastnet.server import MessageHandler, TCPServer
from rpcutil import wait_for

WAIT = 30.0

# The shape the RPC server reports per method (cumulative buckets).
RPC_STATS = {
    "connections_open": 2,
    "methods": {
        "add": {"calls": 10, "errors": 1,
                "latency_seconds": {"buckets": [[0.0001, 3], [0.001, 9], [0.01, 10], ["+Inf", 10]],
                                    "sum": 0.0042, "count": 10}},
        "mul": {"calls": 4, "errors": 0,
                "latency_seconds": {"buckets": [[0.0001, 0], [0.001, 1], [0.01, 4], ["+Inf", 4]],
                                    "sum": 0.011, "count": 4}},
    },
}


class Echo(MessageHandler):
    def message_received(self, data):
        self.reply(data)


class FixedStats:
    """Something to monitor whose stats() is known in advance."""

    def __init__(self, stats):
        self._stats = stats

    def stats(self):
        return self._stats


class MethodTally:
    """Per-method call counts and latency histograms, kept the way the RPC server reports them."""

    BOUNDS = (0.0001, 0.001, 0.01, 0.1)

    def __init__(self):
        self._methods = {}
        self._lock = threading.Lock()

    def call(self, name, fn, *args):
        t0 = time.perf_counter()
        failed = False
        try:
            return fn(*args)
        except Exception:
            failed = True
            raise
        finally:
            dt = time.perf_counter() - t0
            with self._lock:
                m = self._methods.setdefault(name, {"calls": 0, "errors": 0, "sum": 0.0,
                                                    "counts": [0] * (len(self.BOUNDS) + 1)})
                m["calls"] += 1
                m["errors"] += failed
                m["sum"] += dt
                m["counts"][next((i for i, b in enumerate(self.BOUNDS) if dt <= b), len(self.BOUNDS))] += 1

    def stats(self):
        with self._lock:
            out = {}
            for name, m in self._methods.items():
                cum, buckets = 0, []
                for bound, n in zip(self.BOUNDS + ("+Inf",), m["counts"]):
                    cum += n
                    buckets.append([bound, cum])
                out[name] = {"calls": m["calls"], "errors": m["errors"],
                             "latency_seconds": {"buckets": buckets, "sum": m["sum"], "count": m["calls"]}}
            return {"methods": out}


# -- helpers --------------------------------------------------------------------------

def fetch(url, method="GET", timeout=WAIT):
    """(status, headers, body) of one request; HTTP errors are answers too."""
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read()


def families(text):
    fams = list(text_string_to_metric_families(text))
    names = [f.name for f in fams]
    assert len(names) == len(set(names)), names
    # The parser turns a sample outside its family into an untyped one.
    assert all(f.type in ("counter", "gauge", "histogram") for f in fams), \
        [(f.name, f.type) for f in fams]
    return {f.name: f for f in fams}


def open_fds():
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(params=["loop", "thread"])
def echo_server(request):
    srv = TCPServer(("127.0.0.1", 0), Echo, concurrency=request.param).start()
    yield srv
    srv.shutdown(timeout=5)
    srv.server_close()


@pytest.fixture
def mon():
    """mon(server, **kw) -> a Monitor on a free loopback port, closed afterwards."""
    made = []

    def make(server, **kw):
        m = monitor.serve(server, ("127.0.0.1", 0), **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def push_traffic(srv, sizes):
    """Echo one message per size through fastnet.Client; returns once the server has counted it all."""
    sent = srv.stats()["messages_out"] + len(sizes)
    with fastnet.Client(srv.server_address, timeout=WAIT) as c:
        for i, n in enumerate(sizes):
            payload = bytes([i % 251]) * n
            c.send_bytes(payload)
            assert c.recv_bytes() == payload
    assert wait_for(lambda: srv.stats()["connections_open"] == 0
                    and srv.stats()["messages_out"] == sent)


SIZES = [0, 1, 100, 4096, 70000, 17]


# -- /stats and /metrics on a real server ------------------------------------------------

def test_stats_json_matches_server_and_traffic(echo_server, mon):
    push_traffic(echo_server, SIZES)
    m = mon(echo_server)
    status, headers, body = fetch(m.url + "stats")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) == len(body)
    got = json.loads(body)
    assert got == echo_server.stats()
    wire = sum(n + 4 for n in SIZES)        # each frame: 4-byte header + payload
    assert got["messages_in"] == got["messages_out"] == len(SIZES)
    assert got["bytes_in"] == got["bytes_out"] == wire
    assert got["connections_total"] == 1
    assert got["connections_open"] == 0


def test_metrics_match_server_stats(echo_server, mon):
    push_traffic(echo_server, SIZES)
    push_traffic(echo_server, [5, 6])
    m = mon(echo_server, labels={"server": "echo"})
    status, headers, body = fetch(m.url + "metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode("utf-8")
    type_lines = [ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE ")]
    help_lines = [ln.split()[2] for ln in text.splitlines() if ln.startswith("# HELP ")]
    assert len(type_lines) == len(set(type_lines)) and sorted(type_lines) == sorted(help_lines)

    fams = families(text)
    stats = echo_server.stats()
    counters = {"messages_in", "messages_out", "bytes_in", "bytes_out", "connections_refused",
                "handshake_failures", "idle_closed", "connections_total"}
    assert set(stats) >= counters | {"connections_open"}
    for key, value in stats.items():
        base = key[:-6] if key.endswith("_total") else key
        fam = fams["fastnet_" + base]
        if key in counters:
            assert fam.type == "counter", key
            sample_name = f"fastnet_{base}_total"
        else:
            assert fam.type == "gauge", key
            sample_name = f"fastnet_{key}"
        [sample] = fam.samples
        assert sample.name == sample_name
        assert sample.labels == {"server": "echo"}
        assert sample.value == value, key
    assert len(fams) == len(stats)
    assert fams["fastnet_messages_in"].samples[0].value == len(SIZES) + 2
    assert fams["fastnet_bytes_out"].samples[0].value == sum(n + 4 for n in SIZES + [5, 6])
    assert fams["fastnet_connections"].samples[0].value == 2
    assert "HELP fastnet_bytes_in_total Bytes received" in text


def test_index_lists_the_routes(echo_server, mon):
    m = mon(echo_server)
    status, headers, body = fetch(m.url)
    assert status == 200 and headers["Content-Type"] == "application/json"
    routes = json.loads(body)["routes"]
    assert set(routes) == {"/", "/stats", "/metrics"}
    for path in routes:
        assert fetch(m.url.rstrip("/") + path)[0] == 200


def test_monitor_address_and_url(echo_server, mon):
    m = mon(echo_server)
    host, port = m.address
    assert host == "127.0.0.1" and port > 0
    assert m.url == f"http://127.0.0.1:{port}/"
    assert repr(m).endswith(f"{m.url}>")


# -- the RPC server's per-method shape ---------------------------------------------------

def test_method_histograms_render_exactly(mon):
    m = mon(FixedStats(RPC_STATS), labels={"server": "rpc1"})
    status, headers, body = fetch(m.url + "metrics")
    assert status == 200
    text = body.decode()
    fams = families(text)
    assert set(fams) == {"fastnet_connections_open", "fastnet_rpc_calls", "fastnet_rpc_errors",
                         "fastnet_rpc_latency_seconds"}
    assert fams["fastnet_rpc_calls"].type == "counter"
    assert fams["fastnet_rpc_errors"].type == "counter"
    assert {(s.name, s.labels["method"], s.value) for s in fams["fastnet_rpc_calls"].samples} == {
        ("fastnet_rpc_calls_total", "add", 10), ("fastnet_rpc_calls_total", "mul", 4)}
    assert {(s.labels["method"], s.value) for s in fams["fastnet_rpc_errors"].samples} == {
        ("add", 1), ("mul", 0)}

    hist = fams["fastnet_rpc_latency_seconds"]
    assert hist.type == "histogram"
    assert hist.documentation
    got = {(s.name, tuple(sorted(s.labels.items())), s.value) for s in hist.samples}
    want = set()
    for method, figures in RPC_STATS["methods"].items():
        lat = figures["latency_seconds"]
        for le, n in lat["buckets"]:
            le = "+Inf" if le == "+Inf" else repr(float(le))
            want.add(("fastnet_rpc_latency_seconds_bucket",
                      tuple(sorted({"server": "rpc1", "method": method, "le": le}.items())), n))
        base = tuple(sorted({"server": "rpc1", "method": method}.items()))
        want.add(("fastnet_rpc_latency_seconds_sum", base, lat["sum"]))
        want.add(("fastnet_rpc_latency_seconds_count", base, lat["count"]))
    assert got == want
    assert 'fastnet_rpc_latency_seconds_bucket{server="rpc1",method="add",le="0.0001"} 3\n' in text
    assert text.count("# TYPE fastnet_rpc_latency_seconds histogram\n") == 1


def test_method_tally_histograms_are_consistent(mon):
    tally = MethodTally()
    for i in range(50):
        tally.call("add", lambda a, b: a + b, i, 1)
    for i in range(7):
        tally.call("sleep", time.sleep, 0.002)
    for i in range(3):
        with pytest.raises(ZeroDivisionError):
            tally.call("div", lambda a: 1 / a, 0)
    m = mon(tally, prefix="app")
    fams = families(fetch(m.url + "metrics")[2].decode())
    calls = {s.labels["method"]: s.value for s in fams["app_rpc_calls"].samples}
    assert calls == {"add": 50, "sleep": 7, "div": 3}
    errors = {s.labels["method"]: s.value for s in fams["app_rpc_errors"].samples}
    assert errors == {"add": 0, "sleep": 0, "div": 3}
    hist = fams["app_rpc_latency_seconds"]
    for method, n in calls.items():
        buckets = [(float(s.labels["le"]), s.value) for s in hist.samples
                   if s.name.endswith("_bucket") and s.labels["method"] == method]
        assert [le for le, _ in buckets] == sorted(le for le, _ in buckets)
        assert math.isinf(buckets[-1][0]) and buckets[-1][1] == n
        assert all(a <= b for (_, a), (_, b) in zip(buckets, buckets[1:]))
        [count] = [s.value for s in hist.samples
                   if s.name == "app_rpc_latency_seconds_count" and s.labels["method"] == method]
        assert count == n
    [sleep_sum] = [s.value for s in hist.samples
                   if s.name == "app_rpc_latency_seconds_sum" and s.labels["method"] == "sleep"]
    assert sleep_sum >= 7 * 0.002
    # time.sleep(0.002) cannot land in the 1 ms bucket
    [under_1ms] = [s.value for s in hist.samples if s.name.endswith("_bucket")
                   and s.labels == {"method": "sleep", "le": "0.001"}]
    assert under_1ms == 0


# -- the mapping itself ---------------------------------------------------------------

def test_labels_are_escaped():
    kinds = {'quote"d': 1, "back\\slash": 2, "new\nline": 3, "plain": 4}
    text = monitor.render_metrics({"errors": kinds}, labels={"server": 'a "b"\\\n'})
    fam = families(text)["fastnet_errors"]
    assert fam.type == "counter"
    assert {s.labels["kind"]: s.value for s in fam.samples} == kinds
    assert {s.labels["server"] for s in fam.samples} == {'a "b"\\\n'}
    assert len(text.splitlines()) == 2 + len(kinds)


def test_counters_gauges_bools_and_left_out_values():
    stats = {"requests_total": 3, "errors": 2, "uptime_seconds": 1.5, "children": 0,
             "draining": True, "ready": False, "name": "srv", "peers": ["a"], "nothing": None,
             "ratio": float("nan"), "limit": float("inf"), "weird key-1": 7}
    fams = families(monitor.render_metrics(stats))
    types = {name: f.type for name, f in fams.items()}
    assert types == {"fastnet_requests": "counter", "fastnet_errors": "counter",
                     "fastnet_uptime_seconds": "gauge", "fastnet_children": "gauge",
                     "fastnet_draining": "gauge", "fastnet_ready": "gauge", "fastnet_ratio": "gauge",
                     "fastnet_limit": "gauge", "fastnet_weird_key_1": "gauge"}
    value = {name: f.samples[0].value for name, f in fams.items()}
    assert fams["fastnet_requests"].samples[0].name == "fastnet_requests_total"
    assert value["fastnet_draining"] == 1 and value["fastnet_ready"] == 0
    assert value["fastnet_uptime_seconds"] == 1.5
    assert math.isnan(value["fastnet_ratio"]) and value["fastnet_limit"] == math.inf


def test_histogram_buckets_sorted_and_closed_with_inf():
    stats = {"wait_seconds": {"buckets": [[1, 5], [0.5, 2]], "sum": 3.0, "count": 6}}
    fam = families(monitor.render_metrics(stats, prefix=""))["wait_seconds"]
    assert fam.type == "histogram"
    assert [(s.labels["le"], s.value) for s in fam.samples if s.name == "wait_seconds_bucket"] == [
        ("0.5", 2), ("1.0", 5), ("+Inf", 6)]


def test_dict_of_dicts_gets_an_entity_label():
    stats = {"workers": 2, "pools": {"io": {"threads": 4, "tasks_total": 9},
                                      "cpu": {"threads": 2, "tasks_total": 1}}}
    fams = families(monitor.render_metrics(stats))
    assert {(s.labels["pool"], s.value) for s in fams["fastnet_pools_threads"].samples} == {
        ("io", 4), ("cpu", 2)}
    assert fams["fastnet_pools_tasks"].type == "counter"
    assert fams["fastnet_workers"].type == "gauge"


def test_bad_options_and_servers_are_refused():
    with pytest.raises(TypeError):
        monitor.wsgi_app(object())
    with pytest.raises(ValueError):
        monitor.wsgi_app(FixedStats({}), labels={"bad-name": "x"})
    with pytest.raises(ValueError):
        monitor.wsgi_app(FixedStats({}), labels={"le": "x"})
    with pytest.raises(ValueError):
        monitor.render_metrics({}, prefix="9lives")
    with pytest.raises(TypeError):
        monitor.serve(FixedStats({}), "127.0.0.1:9100")


# -- HTTP behaviour ---------------------------------------------------------------------

def test_unknown_path_is_404_and_other_methods_405(mon):
    m = mon(FixedStats(RPC_STATS))
    assert fetch(m.url + "nope")[0] == 404
    assert fetch(m.url + "stats/")[0] == 404
    for method in ("POST", "PUT", "DELETE"):
        status, headers, _ = fetch(m.url + "stats", method=method)
        assert status == 405
        assert headers["Allow"] == "GET, HEAD"
    status, headers, _ = fetch(m.url, method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_head_sends_headers_without_body(mon):
    m = mon(FixedStats(RPC_STATS))
    for path, ctype in (("metrics", monitor.METRICS_CONTENT_TYPE), ("stats", "application/json"), ("", "application/json")):
        _, _, get_body = fetch(m.url + path)
        status, headers, body = fetch(m.url + path, method="HEAD")
        assert status == 200
        assert body == b""
        assert headers["Content-Type"] == ctype
        assert int(headers["Content-Length"]) == len(get_body) > 0


def test_query_string_is_ignored(mon):
    m = mon(FixedStats(RPC_STATS))
    assert json.loads(fetch(m.url + "stats?x=1")[2]) == RPC_STATS


def test_failing_stats_is_a_500_logged_not_printed(mon, caplog, capfd):
    class Broken:
        def stats(self):
            raise RuntimeError("counter file vanished")

    m = mon(Broken())
    with caplog.at_level(logging.DEBUG, logger="fastnet.monitor"):
        status, _, body = fetch(m.url + "metrics")
        # a malformed request line: answered 400 by the server, logged
        with socket.create_connection(m.address, timeout=WAIT) as s:
            s.sendall(b"NONSENSE\r\n\r\n")
            reply = s.recv(4096)
        assert fetch(m.url + "")[0] == 200
        # the access line is logged once the response is out, so it may trail it
        assert wait_for(lambda: any(r.levelno == logging.DEBUG and "GET / " in r.getMessage()
                                    for r in caplog.records))
    assert status == 500 and b"counter file vanished" not in body
    # a request line without an HTTP version is answered the HTTP/0.9 way, on
    # every CPython: the error page without a status line
    assert b"<p>Error code: 400</p>" in reply and not reply.startswith(b"HTTP/")
    failed = [r for r in caplog.records if r.name == "fastnet.monitor" and r.levelno >= logging.ERROR]
    assert failed and "counter file vanished" in str(failed[0].exc_info[1])
    assert capfd.readouterr().err == ""


def test_environ_says_multithreaded():
    seen = []

    def app(environ, start_response):
        seen.append((environ["wsgi.multithread"], environ["wsgi.multiprocess"]))
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    with monitor.Monitor(app, ("127.0.0.1", 0)) as m:
        assert fetch(m.url)[2] == b"ok"
    assert seen == [(True, False)]


def test_slow_client_blocks_nobody_and_close_cuts_it(mon):
    m = mon(FixedStats(RPC_STATS))
    # Connected and silent mid-request line: it holds one request thread.
    stalled = socket.create_connection(m.address, timeout=WAIT)
    stalled.sendall(b"GET /sta")
    results = [None] * 16
    start = threading.Barrier(len(results))

    def get(i):
        start.wait(WAIT)
        results[i] = fetch(m.url + ("stats" if i % 2 else "metrics"))

    threads = [threading.Thread(target=get, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert all(r is not None and r[0] == 200 for r in results)
    assert all(json.loads(r[2]) == RPC_STATS for r in results[1::2])
    m.close()
    # close() shut the stalled connection down instead of waiting for it
    assert stalled.recv(1024) == b""
    stalled.close()


def test_close_frees_the_port_and_leaks_no_fd(echo_server):
    push_traffic(echo_server, [3])
    before = open_fds()
    m = monitor.serve(echo_server, ("127.0.0.1", 0))
    port = m.address[1]
    for path in ("", "stats", "metrics", "nope"):
        fetch(m.url + path)
    fetch(m.url + "stats", method="HEAD")
    m.close()
    m.close()                               # idempotent
    assert m.closed
    assert wait_for(lambda: open_fds() <= before), open_fds() - before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
    with monitor.serve(echo_server, ("127.0.0.1", port)) as again:
        assert again.address == ("127.0.0.1", port)
        assert fetch(again.url + "stats")[0] == 200
    assert wait_for(lambda: open_fds() <= before), open_fds() - before


def test_ipv6_loopback(mon):
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with monitor.serve(FixedStats({"up": True}), ("::1", 0)) as m:
        assert m.url.startswith("http://[::1]:")
        assert json.loads(fetch(m.url + "stats")[2]) == {"up": True}
