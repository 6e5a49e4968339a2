"""RPCServer(monitor=...): per-method counters and latency histograms over real HTTP."""
import json
import urllib.error
import urllib.request

import pytest

import fastnet

parser = pytest.importorskip("prometheus_client.parser")


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("Content-Type"), r.read().decode()


@pytest.mark.parametrize("workers", [1, 2])
def test_rpc_server_serves_stats_and_metrics_beside_itself(workers):
    # with workers=2 each connection is served by its own prefork worker, and
    # the parent's figures are the sums over both
    srv = fastnet.RPCServer(("127.0.0.1", 0), monitor=("127.0.0.1", 0), workers=workers)
    srv.register(lambda x, y: x + y, "add")

    def fail():
        raise RuntimeError("no")
    srv.register(fail)
    srv.start()
    try:
        url = srv.monitor.url.rstrip("/")
        with fastnet.RPCProxy(srv.address) as p, fastnet.RPCProxy(srv.address) as q:
            for i in range(25):
                assert (p if i % 2 else q).add(i, 1) == i + 1
            for _ in range(3):
                with pytest.raises(fastnet.RemoteError):
                    q.fail()
            with pytest.raises(fastnet.MethodNotFound):
                p.nothere()
            status, ctype, body = _get(url + "/stats")
            assert status == 200 and ctype.startswith("application/json")
            stats = json.loads(body)
            assert stats["methods"]["add"]["calls"] == 25
            assert stats["methods"]["fail"]["errors"] == 3
            assert stats["errors"] == {"method_not_found": 1}
            assert stats["connections_open"] == 2

            status, ctype, body = _get(url + "/metrics")
            assert ctype.startswith("text/plain")
        families = {f.name: f for f in parser.text_string_to_metric_families(body)}
        calls = {s.labels["method"]: s.value for s in families["fastnet_rpc_calls"].samples}
        assert calls["add"] == 25 and calls["fail"] == 3
        errors = {s.labels["method"]: s.value for s in families["fastnet_rpc_errors"].samples}
        assert errors["fail"] == 3 and errors["add"] == 0
        hist = families["fastnet_rpc_latency_seconds"]
        assert hist.type == "histogram"
        add_count = [s.value for s in hist.samples
                     if s.name.endswith("_count") and s.labels["method"] == "add"]
        inf = [s.value for s in hist.samples
               if s.name.endswith("_bucket") and s.labels == {"method": "add", "le": "+Inf"}]
        assert add_count == [25] and inf == [25]
    finally:
        srv.close()
    # the monitor goes with the server
    assert srv.monitor is None
    with pytest.raises(urllib.error.URLError):
        _get(url + "/stats")
