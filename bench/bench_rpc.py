#!/usr/bin/env python3
"""RPC benchmarks: fastnet's RPCServer/RPCProxy beside other RPC stacks, as ratios of medians.

Cases (server and client in two fresh processes per row, loopback):

* ``sequential``  ``add(2, 3)`` calls/s, one call at a time from one client:
  fastnet RPC with the msgpack, json and pickle (with an authkey) codecs;
  fastnet's bare pingpong (``send_bytes``/``recv_bytes`` of 64 bytes against
  an echo Listener) as round trips/s, the floor under an RPC call; anchors: a
  pickle RPC over multiprocessing.connection (the Python Cookbook's recipe
  11.8: the proxy sends ``(name, args, kwargs)``, the handler sends back the
  result or the exception), xmlrpc (SimpleXMLRPCServer + ServerProxy, stdlib
  defaults: a new HTTP connection per call), pyzmq REQ/REP + msgpack, Pyro5
  (its default serpent serializer), rpyc (a cached remote method: one round
  trip per call) and grpc (a generic handler with msgpack bytes
  (de)serializers, no protoc).  TCP and AF_UNIX.
* ``pipelined``   ``add(2, 3)`` with 64 calls in flight on one connection,
  calls/s: fastnet ``call_async`` with a sliding window (a new call as soon as
  the oldest completes), in batches (64 ``call_async``, then wait for all
  64) and in ``proxy.batch()`` blocks of 64 (the requests in one write); pyzmq
  DEALER/ROUTER + msgpack with a sliding window of 64; the multiprocessing
  pickle RPC sending 64 requests, then reading 64 replies.
* ``array``       ``echo(a)`` of a 64 MiB float64 array, GB/s counting both
  directions: fastnet RPC with pickle (out-of-band buffers) and with msgpack,
  the multiprocessing pickle RPC, beside fastnet's own ``send_array`` /
  ``recv_array`` echo of the same array over the same transport (into
  preallocated arrays, as the transport bulk benchmark does, and into new
  ones, as an RPC reply must).
* ``tls``         sequential msgpack RPC calls/s and 64-byte pingpong round
  trips/s over TLS beside plain TCP (an ECDSA P-256 certificate made at run
  time with the ``cryptography`` package, else the ``openssl`` command as in
  bench_tls.py).  TLS on the RPC server needs ``ssl_context=`` support in
  fastnet.server; without it the row says n/a and why.

A library that is missing, or a fastnet feature that is, shows as ``n/a``
with the reason; no number is ever filled in.  Rounds go round-robin over the
rows so that a noisy neighbour hurts all of them alike; each row's figure is
the median over all samples of all rounds.  ``--pin same`` puts server and
client on one CPU, ``--pin split`` on one each, the default leaves placement to
the scheduler (see ``fastnet bench``).

    python3 bench/bench_rpc.py                       # everything, full profile
    python3 bench/bench_rpc.py --only sequential,tls --pin same --json rpc.json
    python3 bench/bench_rpc.py --quick               # a short look

The child processes reuse the servers and clients of ``fastnet/bench/``
(loaded by path, as the ``fastnet bench`` children do) and add the ones only
this script runs.  ``run()`` returns the report dict, ``format_table()``
renders it.
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import textwrap
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from benchutil import load as _load  # noqa: E402  (by path: the anchor rows run even when fastnet fails to import)

bench_report, bulk_case, cases, child, common, pingpong_case, rpc_case, runner = (
    _load(name) for name in ("report", "bulk", "cases", "child", "common", "pingpong", "rpc", "runner"))
Impl = common.Impl
NotAvailable = common.NotAvailable

IN_FLIGHT = rpc_case.RPC_IN_FLIGHT
ARRAY_MIB = 64

# fastnet bench's reference figures of the sequential rows (calls/s, TCP, one
# client process), and grpc's, measured with them.
REFERENCE = {impl: v for (case, family, impl), v in cases.REFERENCE.items()
             if case == "rpc-seq" and family == "tcp"} | {"grpc": 1570.0}


# --------------------------------------------------------------------------
# Child side: the roles only this script runs.
# --------------------------------------------------------------------------

def _grpc():
    try:
        import grpc
    except ImportError:
        raise NotAvailable("grpcio is not installed")
    return grpc


def _grpc_target(spec, port=None):
    if spec["family"] == "tcp":
        return f"127.0.0.1:{port if port is not None else 0}"
    return "unix:" + spec["path"]


def _grpc_server(spec, ready):
    from concurrent import futures
    grpc = _grpc()
    mp = common._msgpack()
    stop = threading.Event()

    def add(request, context):
        return request[0] + request[1]

    def halt(request, context):
        stop.set()
        return 0

    def handler(func):
        return grpc.unary_unary_rpc_method_handler(
            func, request_deserializer=mp.unpackb, response_serializer=mp.packb)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Calc", {"Add": handler(add), "Stop": handler(halt)}),))
    port = server.add_insecure_port(_grpc_target(spec))
    if spec["family"] == "tcp" and not port:
        raise RuntimeError("grpc could not bind a TCP port")
    server.start()
    ready(_grpc_target(spec, port))
    stop.wait()
    server.stop(grace=1).wait()


def _grpc_client(spec, address):
    grpc = _grpc()
    mp = common._msgpack()
    channel = grpc.insecure_channel(address)

    def method(name):
        return channel.unary_unary(f"/bench.Calc/{name}", request_serializer=mp.packb,
                                   response_deserializer=mp.unpackb)

    add = method("Add")
    out = rpc_case.rpc_sequential(lambda x, y: add([x, y]), spec)
    method("Stop")([])
    channel.close()
    out["info"]["grpc"] = grpc.__version__
    return out


# ---- array ----

def _spots(np, a, nelem):
    # sampled elements of arange(nelem): a reply that is not the array sent cannot pass
    a = a.reshape(-1)
    if a.dtype != np.float64 or a.size != nelem or a[-1] != nelem - 1 or \
            not np.array_equal(a[::4097], np.arange(0, nelem, 4097, dtype=np.float64)):
        raise ValueError("array: the reply differs from the array sent")


def _array_echo_server(spec, ready):
    np = common._numpy()
    fastnet = common._fastnet(spec)
    conn = common._accept_one(spec, fastnet, ready)
    common._need(conn, "send_array", "recv_array")
    out = np.empty(spec["nbytes"] // 8) if spec["impl"] == "echo-out" else None
    while True:
        try:
            a = conn.recv_array(out=out)
        except EOFError:
            break
        conn.send_array(a)
        del a
    conn.close()


def _array_echo_client(spec, address):
    np = common._numpy()
    fastnet = common._fastnet(spec)
    conn = fastnet.Client(common._addr(address))
    nelem = spec["nbytes"] // 8
    arr = np.arange(nelem, dtype=np.float64)
    back = np.empty(nelem) if spec["impl"] == "echo-out" else None

    def transfer():
        t0 = time.perf_counter()
        conn.send_array(arr)
        got = conn.recv_array(out=back)
        t = time.perf_counter() - t0
        _spots(np, got, nelem)
        return t

    out = bulk_case._bulk_samples(transfer, spec, 2 * arr.nbytes)
    out["info"]["backend"] = fastnet.backend
    conn.close()
    return out


def _array_rpc_client(spec, address):
    np = common._numpy()
    nelem = spec["nbytes"] // 8
    arr = np.arange(nelem, dtype=np.float64)
    if spec["impl"] == "mp-rpc":
        import multiprocessing.connection as mpc
        conn = mpc.Client(common._addr(address), authkey=bytes.fromhex(spec["authkey"]))
        echo = rpc_case.CookbookRPCProxy(conn).echo
        close = conn.close
    else:
        proxy = rpc_case.rpc_proxy(spec, address)
        echo = proxy.echo
        close = lambda: rpc_case.rpc_stop(proxy)  # noqa: E731

    def transfer():
        t0 = time.perf_counter()
        got = echo(arr)
        t = time.perf_counter() - t0
        _spots(np, got, nelem)
        return t

    out = bulk_case._bulk_samples(transfer, spec, 2 * arr.nbytes)
    close()
    return out


# ---- tls ----

def _tls_support(fastnet):
    import inspect
    import fastnet.server as fs
    if "ssl_context" not in inspect.signature(fs.BaseServer.__init__).parameters:
        raise NotAvailable("fastnet.server takes no ssl_context yet: RPCServer cannot serve TLS")
    from fastnet import tls
    return tls


def _tls_server_context(spec, fastnet):
    if "tls" not in spec["impl"]:
        return None
    tls = _tls_support(fastnet)
    return tls.server_context(spec["tls_cert"], spec["tls_key"])


def _tls_client_context(spec):
    if "tls" not in spec["impl"]:
        return None
    from fastnet import tls
    return tls.client_context(cafile=spec["tls_cert"])


def _tls_rpc_server(spec, ready):
    fastnet = common._fastnet(spec)
    ctx = _tls_server_context(spec, fastnet)
    rpc_case.rpc_server(spec, ready, **({"ssl_context": ctx} if ctx is not None else {}))


def _tls_rpc_client(spec, address):
    fastnet = common._fastnet(spec)
    proxy = rpc_case.rpc_proxy(spec, address, ssl_context=_tls_client_context(spec))
    out = rpc_case.rpc_sequential(proxy.add, spec)
    out["info"]["backend"] = fastnet.backend
    rpc_case.rpc_stop(proxy)
    return out


def _tls_pingpong_server(spec, ready):
    fastnet = common._fastnet(spec)
    ctx = _tls_server_context(spec, fastnet)
    pingpong_case._echo_until_eof(common._accept_one(spec, fastnet, ready, ssl_context=ctx))


def _tls_pingpong_client(spec, address):
    fastnet = common._fastnet(spec)
    conn = fastnet.Client(common._addr(address), ssl_context=_tls_client_context(spec))
    step = pingpong_case._round_trips(conn.send_bytes, conn.recv_bytes, spec["size"])
    out = common._samples(step, spec, 64, 100, common._per_second)
    out["info"]["backend"] = fastnet.backend
    conn.close()
    return out


ROLES = {
    ("rpc-seq", "grpc"): (_grpc_server, _grpc_client),
    ("rpc-array", "echo-out"): (_array_echo_server, _array_echo_client),
    ("rpc-array", "echo-new"): (_array_echo_server, _array_echo_client),
    ("rpc-array", "fastnet-pickle"): (rpc_case.rpc_server, _array_rpc_client),
    ("rpc-array", "fastnet"): (rpc_case.rpc_server, _array_rpc_client),
    ("rpc-array", "mp-rpc"): (rpc_case._rpc_mp_server, _array_rpc_client),
    ("rpc-tls", "fastnet"): (_tls_rpc_server, _tls_rpc_client),
    ("rpc-tls", "fastnet-tls"): (_tls_rpc_server, _tls_rpc_client),
    ("rpc-tls", "pingpong"): (_tls_pingpong_server, _tls_pingpong_client),
    ("rpc-tls", "pingpong-tls"): (_tls_pingpong_server, _tls_pingpong_client),
}


def _child(arg):
    child.main(arg, {**cases.ROLES, **ROLES})


# --------------------------------------------------------------------------
# Parent side.
# --------------------------------------------------------------------------

def _rows(case, insert=None, replace=None, append=()):
    """The rows of ``fastnet bench``'s ``case`` (the same children), with this script's own.

    ``insert`` maps a row key to rows placed after it, ``replace`` a row key
    to the row that stands in its place, ``append`` comes last.
    """
    out = []
    for impl in cases.CASES[case]["impls"]:
        out.append((replace or {}).get(impl.key, impl))
        out.extend((insert or {}).get(impl.key, ()))
    return out + list(append)


# spec_case: the case name the children know (the runner's rpc-seq and
# rpc-pipe roles are reused as they are); columns: rows that get a ratio column.
CASES = {
    "sequential": {
        "spec_case": "rpc-seq", "families": ("tcp", "unix"),
        "title": "add(2, 3) calls one at a time from one client",
        "unit": "calls/s", "columns": ["mp-rpc", "pingpong"],
        "impls": _rows("rpc-seq", insert={"xmlrpc": [Impl("grpc", "grpc, msgpack bytes", anchor=True)]},
                       append=[Impl("fastnet-json", "fastnet RPC json", pure=False),
                               Impl("fastnet-pickle", "fastnet RPC pickle + authkey", pure=False)]),
    },
    "pipelined": {
        "spec_case": "rpc-pipe", "families": ("tcp", "unix"),
        "title": "add(2, 3) with {window} calls in flight on one connection",
        "unit": "calls/s", "columns": ["mp-rpc", "zmq-rpc"],
        # the window is an option here, so the multiprocessing row's label says it
        "impls": _rows("rpc-pipe", replace={
            "mp-rpc": Impl("mp-rpc", "pickle RPC, mp: {window} sent, {window} read", anchor=True)}),
    },
    "array": {
        "spec_case": "rpc-array", "families": ("tcp", "unix"),
        "title": "echo(a), a {mib:g} MiB float64 array; GB/s both directions",
        "unit": "GB/s", "columns": ["echo-out", "echo-new"],
        "impls": [
            Impl("echo-out", "send_array/recv_array(out=)", pure=False),
            Impl("echo-new", "send_array/recv_array() new", pure=False),
            Impl("mp-rpc", "pickle RPC, multiprocessing", anchor=True),
            Impl("fastnet-pickle", "fastnet RPC pickle + authkey", pure=False),
            Impl("fastnet", "fastnet RPC msgpack", pure=False),
        ],
    },
    "tls": {
        "spec_case": "rpc-tls", "families": ("tcp",),
        "title": "TLS beside plain TCP: sequential msgpack RPC and 64 B pingpong",
        "unit": "calls/s", "columns": ["fastnet", "pingpong"],
        "impls": [
            Impl("fastnet", "fastnet RPC msgpack, plain", pure=False),
            Impl("fastnet-tls", "fastnet RPC msgpack, TLS", pure=False),
            Impl("pingpong", "fastnet pingpong 64 B, plain", pure=False),
            Impl("pingpong-tls", "fastnet pingpong 64 B, TLS", pure=False),
        ],
    },
}

FAMILIES = cases.FAMILIES

# (case, text, rule): ("ratio", num, den, op, bound) is value(num)/value(den);
# ("value", impl, op, bound); ("report", num, den) a ratio without a bound.
_SAME_CASE = {"rpc-seq": "sequential", "rpc-pipe": "pipelined"}
TARGETS = [(_SAME_CASE[case], text, rule) for case, _family, text, rule in cases.TARGETS
           if case in _SAME_CASE] + [
    ("sequential", "json / msgpack", ("report", "fastnet-json", "fastnet")),
    ("sequential", "pickle / msgpack", ("report", "fastnet-pickle", "fastnet")),
    ("array", "pickle RPC >= 0.8x send_array echo", ("ratio", "fastnet-pickle", "echo-out", ">=", 0.8)),
    ("tls", "RPC calls/s, TLS / plain", ("report", "fastnet-tls", "fastnet")),
    ("tls", "pingpong round trips/s, TLS / plain", ("report", "pingpong-tls", "pingpong")),
]

PROFILES = {
    "full": dict(rounds=3, repeat=5, warmup=0.2, sample=0.3, bulk_warmup=1, timeout=300.0),
    "quick": dict(rounds=1, repeat=3, warmup=0.05, sample=0.1, bulk_warmup=1, timeout=120.0),
}


def make_cert(d):
    """A self-signed ECDSA P-256 certificate for 127.0.0.1 and localhost in ``d``: (key, cert) paths."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        from bench_tls import make_cert as openssl_cert
        return openssl_cert(d)
    import ipaddress
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    kpath, cpath = os.path.join(d, "k.pem"), os.path.join(d, "c.pem")
    with open(kpath, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(cpath, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return kpath, cpath


def _child_cmd(spec):
    return [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]


class _Pairs(runner._Runner):
    """The runner's process pairs (pinning, time limits, n/a reasons) with this script's children."""

    def __init__(self, cfg, workdir, extra):
        super().__init__(cfg, workdir)
        self.extra = extra

    def spec(self, case, impl, family, role):
        s = super().spec(CASES[case]["spec_case"], impl, family, role)
        s.update(self.extra)
        return s

    def commands(self, case, impl, family):
        sspec = self.spec(case, impl, family, "server")
        cspec = dict(sspec, role="client")
        return _child_cmd(sspec), lambda address: _child_cmd(dict(cspec, address=address))


def _label(impl, cfg):
    return impl.label.format(window=cfg["window"])


def run(cases=None, *, quick=False, families=("tcp", "unix"), log=None, **overrides):
    """Run the cases; return the report dict (the ``--json`` document).

    ``overrides``: rounds, repeat, warmup, sample, timeout, pin ("none",
    "same", "split"), array_mib, window.  ``log(text)`` gets a line per pair.
    """
    cases = list(cases or CASES)
    for c in cases:
        if c not in CASES:
            raise ValueError(f"unknown case {c!r}; choose from {', '.join(CASES)}")
    cfg = dict(PROFILES["quick" if quick else "full"], pin="none", array_mib=ARRAY_MIB,
               window=IN_FLIGHT, size=common.PAYLOAD_SIZE, batch=128,
               conns=None)     # the runner's echo setting: no case here uses it
    for k, v in overrides.items():
        if k not in cfg:
            raise TypeError(f"run() got an unexpected setting {k!r}")
        if v is not None:
            cfg[k] = v
    cfg["bulk_mib"] = cfg["array_mib"]
    plan = [(c, f) for c in cases for f in CASES[c]["families"] if f in families]
    slots = {(c, f, i.key): {"samples": [], "na": None, "info": {}, "rounds": []}
             for c, f in plan for i in CASES[c]["impls"]}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="fnrpc-") as workdir:
        extra = {"window": cfg["window"]}
        if "tls" in cases:
            key, cert = make_cert(workdir)
            extra.update(tls_key=key, tls_cert=cert)
        pairs = _Pairs(cfg, workdir, extra)
        for rnd in range(cfg["rounds"]):
            for case, family in plan:
                for impl in CASES[case]["impls"]:
                    slot = slots[(case, family, impl.key)]
                    if slot["na"]:
                        continue
                    out = pairs.pair(case, impl, family)
                    if "na" in out:
                        slot.update(na=out["na"], samples=[], rounds=[])
                        shown = "n/a: " + out["na"]
                    else:
                        slot["samples"].extend(out["samples"])
                        slot["rounds"].append(statistics.median(out["samples"]))
                        slot["info"] = out.get("info", {})
                        shown = f"{bench_report._fmt(slot['rounds'][-1])} {CASES[case]['unit']}"
                    if log:
                        log(f"[{rnd + 1}/{cfg['rounds']}] {case:10s} {FAMILIES[family]:7s} "
                            f"{_label(impl, cfg):32s} {shown}")
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(time.time() - started, 1),
        "machine": _machine(),
        "config": dict(cfg, quick=quick, cases=cases, families=list(families)),
        "results": {},
    }
    for case, family in plan:
        rows = report["results"].setdefault(case, {}).setdefault(family, {})
        for impl in CASES[case]["impls"]:
            slot = slots[(case, family, impl.key)]
            ss = slot["samples"]
            med = statistics.median(ss) if ss and not slot["na"] else None
            q = statistics.quantiles(ss, n=4) if med is not None and len(ss) >= 2 else None
            rows[impl.key] = {
                "label": _label(impl, cfg), "unit": CASES[case]["unit"], "median": med,
                # interquartile range over the median: how much the samples scattered
                "spread": (q[2] - q[0]) / med if q and med else None,
                "round_medians": slot["rounds"] if med is not None else [],
                "samples": ss if med is not None else [], "na": slot["na"], "info": slot["info"],
                "reference": REFERENCE.get(impl.key) if case == "sequential" and family == "tcp" else None,
            }
    report["targets"] = _targets(report)
    return report


def _machine():
    m = runner._machine()
    for name in ("msgpack", "Pyro5", "rpyc", "grpc"):
        try:
            mod = __import__(name)
        except ImportError:
            continue
        v = getattr(mod, "__version__", None) or getattr(mod, "version", None)
        m["versions"][name] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return m


def _targets(report):
    out = []
    for case, text, rule in TARGETS:
        for family, rows in report["results"].get(case, {}).items():
            value, status = bench_report.evaluate(rule, rows)
            out.append({"case": case, "family": family, "target": text, "value": value,
                        "status": status})
    return out


def format_table(report):
    """The report as text tables: medians, ratio columns (value / that row's value), spread."""
    cfg = report["config"]
    lines = bench_report.preamble(report, "fastnet RPC bench", "ratio columns: value / that row's value; "
                                  "iqr: interquartile range of the samples / median")
    notes = []
    for case, fams in report["results"].items():
        spec = CASES[case]
        cols = spec["columns"]
        title = spec["title"].format(window=cfg["window"], mib=cfg["array_mib"])
        lines += ["", f"{case}: {title}  [{spec['unit']}, higher is better]"]
        lines.append(f"{'':8s} {'':33s} {'median':>9s}" + "".join(f" {'/' + c:>10s}" for c in cols)
                     + f" {'iqr':>5s}" + (f" {cases.REFERENCE_LABEL:>9s}" if case == "sequential" else ""))
        for family, rows in fams.items():
            first = True
            for key, row in rows.items():
                cells = f"{FAMILIES[family] if first else '':8s} {row['label']:33s} "
                first = False
                if row["median"] is None:
                    notes.append(f"{case} {FAMILIES[family]} {row['label']}: {row['na']}")
                    cells += f"{'n/a [' + str(len(notes)) + ']':>9s}"
                else:
                    cells += bench_report.figures(rows, key, cols, width=10, spread=True)
                lines.append(cells.rstrip())
    if "sequential" in report["results"]:
        lines += ["", *textwrap.wrap(cases.REFERENCE_NOTE, 100)]
    if report["targets"]:
        lines += ["", "targets"]
        for t in report["targets"]:
            v = t["value"]
            shown = "n/a" if v is None else (bench_report._fmt(v) if v >= 100 else f"{v:.2f}")
            lines.append(f"  {t['case']:10s} {FAMILIES[t['family']]:7s} {t['target']:44s} "
                         f"{shown:>8s}  {t['status']}")
    return "\n".join(lines + bench_report.footnotes(notes))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one round, short samples")
    p.add_argument("--only", metavar="CASE,...", help=f"cases to run: {','.join(CASES)}")
    p.add_argument("--family", default="tcp,unix", metavar="NAME,...", help="tcp, unix or both")
    p.add_argument("--rounds", type=int, help="fresh process pairs per row (round-robin)")
    p.add_argument("--repeat", type=int, help="timed samples per pair")
    p.add_argument("--sample", type=float, help="seconds per timed sample")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per pair")
    p.add_argument("--array-mib", type=float, help=f"array size in MiB (default {ARRAY_MIB})")
    p.add_argument("--window", type=int, help=f"calls in flight, pipelined (default {IN_FLIGHT})")
    p.add_argument("--timeout", type=float, help="seconds before a pair is abandoned")
    p.add_argument("--pin", choices=("none", "same", "split"), default="none",
                   help="CPU placement of server and client: the scheduler's choice (default), "
                        "one CPU for both, or one CPU each")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.child)
        return 0
    cases = [c.strip() for c in args.only.split(",") if c.strip()] if args.only else None
    families = tuple(f.strip() for f in args.family.split(",") if f.strip())
    try:
        report = run(cases, quick=args.quick, families=families,
                     log=None if args.quiet else lambda t: print(t, file=sys.stderr, flush=True),
                     rounds=args.rounds, repeat=args.repeat, sample=args.sample,
                     warmup=args.warmup, timeout=args.timeout, pin=args.pin,
                     array_mib=args.array_mib, window=args.window)
    except ValueError as exc:
        print(f"bench_rpc: {exc}", file=sys.stderr)
        return 2
    report["command"] = "python3 bench/bench_rpc.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
