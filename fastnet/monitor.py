"""A REST face for long-running servers: their ``stats()`` as JSON and Prometheus metrics.

The Python Cookbook's recipe 11.5 on the standard library's WSGI server::

    from fastnet.server import TCPServer
    from fastnet import monitor

    srv = TCPServer(("", 20000), EchoHandler).start()
    with monitor.serve(srv, ("127.0.0.1", 9100)) as mon:
        print(mon.url)          # GET /stats, GET /metrics, GET /
        ...

Anything with a ``stats()`` method returning a dict can be monitored: the
servers of :mod:`fastnet.server` and the RPC server. :func:`wsgi_app` is a
plain PEP 3333 application, to mount under any WSGI server instead of
:func:`serve`'s.

Routes: ``GET /stats`` is ``stats()`` as JSON; ``GET /metrics`` is the
Prometheus text exposition format 0.0.4 (:func:`render_metrics` says how
keys become metrics); ``GET /`` lists the routes. HEAD works wherever GET
does; other methods get 405 with an ``Allow`` header, unknown paths 404.

The monitor logs to the ``fastnet.monitor`` logger (requests at DEBUG,
failures at ERROR) and never writes to stderr itself.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import re
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["wsgi_app", "serve", "render_metrics", "PathDispatcher", "Monitor",
           "METRICS_CONTENT_TYPE", "DEFAULT_ADDRESS"]

logger = logging.getLogger("fastnet.monitor")

#: The Content-Type of the Prometheus text exposition format 0.0.4.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Where :func:`serve` listens unless told otherwise (9100 is the port
#: Prometheus exporters customarily start from).
DEFAULT_ADDRESS = ("127.0.0.1", 9100)

# -- stats() -> Prometheus text format ---------------------------------------------

# Keys whose values only ever grow. Prometheus needs to know, because rate()
# treats a drop in a counter as a restart rather than as a decrease.
_COUNTER_KEYS = frozenset({
    "messages_in", "messages_out", "bytes_in", "bytes_out",
    "connections_total", "connections_refused", "handshake_failures",
    "idle_closed", "worker_restarts", "errors", "calls",
})

# Nested dicts of dicts: key -> (name part, label name) of what they hold.
# The RPC server's per-method figures become fastnet_rpc_*{method="..."}.
_GROUPS = {"methods": ("rpc", "method")}

# The label that tells apart the entries of a dict of numbers.
_KIND_LABEL = "kind"

_HELP = {
    "connections_open": "Connections open now, pending handshakes included.",
    "connections_total": "Connections accepted.",
    "connections_refused": "Connections refused: peers outside the allow list, or beyond max_connections with overflow=\"refuse\".",
    "handshake_failures": "Authentication handshakes that failed or timed out.",
    "idle_closed": "Connections closed for being idle longer than idle_timeout.",
    "messages_in": "Messages received (MessageHandler frames and datagrams).",
    "messages_out": "Messages sent (MessageHandler frames and datagrams).",
    "bytes_in": "Bytes received in messages, frame headers included.",
    "bytes_out": "Bytes sent in messages, frame headers included.",
    "workers": "Prefork worker processes alive.",
    "worker_restarts": "Prefork workers replaced after they died.",
    "children": "Forked child processes alive.",
    "errors": "Errors, by kind.",
    "rpc_calls": "RPC calls handled, by method.",
    "rpc_errors": "RPC calls that raised, by method.",
    "rpc_latency_seconds": "RPC call latency in seconds, by method.",
}

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_NOT_METRIC = re.compile(r"[^a-zA-Z0-9_:]")
_NOT_LABEL = re.compile(r"[^a-zA-Z0-9_]")


def _metric_part(key: object) -> str:
    return _NOT_METRIC.sub("_", str(key))


def _label_name(key: object) -> str:
    name = _NOT_LABEL.sub("_", str(key))
    return "_" + name if not name or name[0].isdigit() else name


def _escape_label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _is_number(v: object) -> bool:
    return isinstance(v, numbers.Real)     # bool is an int, so it is included


def _is_histogram(v: object) -> bool:
    return isinstance(v, dict) and isinstance(v.get("buckets"), (list, tuple))


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, numbers.Integral):
        return str(int(v))
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def _singular(key: str) -> str:
    return key[:-1] if len(key) > 1 and key.endswith("s") else key


class _Family:
    __slots__ = ("name", "type", "help", "samples", "seen")

    def __init__(self, name: str, type_: str, help_: str) -> None:
        self.name = name
        self.type = type_
        self.help = help_
        self.samples: list[tuple[str, dict[str, str], Any]] = []
        self.seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()


class _Renderer:
    def __init__(self, prefix: str, labels: dict[str, str]) -> None:
        self.prefix = prefix
        self.const = labels
        self.families: dict[str, _Family] = {}

    def name(self, part: str) -> str:
        name = f"{self.prefix}_{part}" if self.prefix else part
        return "_" + name if name[0].isdigit() else name

    def family(self, name: str, type_: str, help_: str) -> _Family | None:
        fam = self.families.get(name)
        if fam is None:
            fam = self.families[name] = _Family(name, type_, help_)
        elif fam.type != type_:
            # Two stats keys that map onto one name with different types
            # would make the exposition invalid; the first one keeps it.
            logger.debug("metric %s is a %s; a %s of that name was left out", name, fam.type, type_)
            return None
        return fam

    def add(self, fam: _Family, sample: str, labels: dict[str, str], value: Any) -> None:
        key = (sample, tuple(labels.items()))
        if key in fam.seen:
            logger.debug("duplicate sample %s%r left out", sample, labels)
            return
        fam.seen.add(key)
        fam.samples.append((sample, labels, value))

    def scalar(self, part: str, key: str, value: Any, labels: dict[str, str], path: str) -> None:
        counter = key.endswith("_total") or key in _COUNTER_KEYS
        base = part[:-6] if part.endswith("_total") else part
        name = self.name(base + "_total" if counter else base)
        help_ = _HELP.get(part) or _HELP.get(base) or f"{path} in stats()."
        fam = self.family(name, "counter" if counter else "gauge", help_)
        if fam is not None:
            self.add(fam, name, labels, value)

    def histogram(self, part: str, value: Any, labels: dict[str, str], path: str) -> None:
        try:
            buckets = sorted((float(le), count) for le, count in value["buckets"])
        except (TypeError, ValueError):
            buckets = None
        if buckets is None or not all(_is_number(n) for _, n in buckets):
            logger.debug("histogram %s has malformed buckets; left out", path)
            return
        count = value.get("count")
        if not _is_number(count):
            count = buckets[-1][1] if buckets else 0
        if not buckets or not math.isinf(buckets[-1][0]):
            buckets.append((math.inf, count))
        name = self.name(part)
        fam = self.family(name, "histogram", _HELP.get(part) or f"{path} in stats().")
        if fam is None:
            return
        for le, n in buckets:
            self.add(fam, name + "_bucket", {**labels, "le": _format_value(le)}, n)
        if _is_number(value.get("sum")):
            self.add(fam, name + "_sum", labels, value["sum"])
        self.add(fam, name + "_count", labels, count)

    def walk(self, part: str, key: str, value: Any, labels: dict[str, str], path: str) -> None:
        if _is_number(value):
            self.scalar(part, key, value, labels, path)
        elif _is_histogram(value):
            self.histogram(part, value, labels, path)
        elif isinstance(value, dict):
            group, label = _GROUPS.get(key, (part, _label_name(_singular(key))))
            for sub, v in value.items():
                if _is_number(v):
                    self.scalar(part, key, v, {**labels, _KIND_LABEL: str(sub)}, path)
                elif _is_histogram(v):
                    self.histogram(part, v, {**labels, _KIND_LABEL: str(sub)}, path)
                elif isinstance(v, dict):
                    inner = {**labels, label: str(sub)}
                    for field, fv in v.items():
                        field = str(field)
                        self.walk(f"{group}_{_metric_part(field)}", field, fv, inner,
                                  f"{path}.<{label}>.{field}")
        # strings, None, lists: not numbers, so not metrics

    def text(self) -> str:
        out = []
        for fam in self.families.values():
            if not fam.samples:
                continue
            out.append(f"# HELP {fam.name} {_escape_help(fam.help)}\n")
            out.append(f"# TYPE {fam.name} {fam.type}\n")
            for sample, labels, value in fam.samples:
                if labels:
                    body = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
                    out.append(f"{sample}{{{body}}} {_format_value(value)}\n")
                else:
                    out.append(f"{sample} {_format_value(value)}\n")
        return "".join(out)


def _check_options(prefix: str | None, labels: Mapping[str, object] | None) -> tuple[str, dict[str, str]]:
    if prefix and not _METRIC_NAME.match(prefix):
        raise ValueError(f"invalid metric name prefix {prefix!r}")
    labels = {} if labels is None else dict(labels)
    for k in labels:
        if not isinstance(k, str) or not _LABEL_NAME.match(k) or k.startswith("__") or k == "le":
            raise ValueError(f"invalid constant label name {k!r}")
    return prefix or "", {k: str(v) for k, v in labels.items()}


def render_metrics(stats: Mapping[Any, Any], prefix: str | None = "fastnet",
                   labels: Mapping[str, object] | None = None) -> str:
    """``stats`` (a ``stats()`` dict) in the Prometheus text exposition format 0.0.4.

    Each key becomes the metric ``<prefix>_<key>``. Numbers are counters when
    the key ends in ``_total`` or is a known counter (``messages_in``,
    ``bytes_out``, ``connections_refused``, ``errors``, ...; they get the
    ``_total`` suffix), gauges otherwise; bools are 0/1. A dict of numbers is
    one metric with a ``kind`` label per entry; a dict with ``buckets``
    (cumulative ``[le, count]`` pairs), ``sum`` and ``count`` is a histogram;
    a dict of dicts is one metric per inner key, labelled by the outer key
    (``"methods"`` becomes ``<prefix>_rpc_<field>{method="..."}``). Other
    values are left out. ``labels`` are constant labels put on every sample.
    """
    prefix, labels = _check_options(prefix, labels)
    r = _Renderer(prefix, labels)
    for key, value in stats.items():
        key = str(key)
        r.walk(_metric_part(key), key, value, dict(labels), key)
    return r.text()


# -- the WSGI application -------------------------------------------------------------

def _respond(start_response: StartResponse, status: str, content_type: str, body: bytes,
             extra: Iterable[tuple[str, str]] = (), exc_info: OptExcInfo | None = None) -> list[bytes]:
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body))),
               ("Cache-Control", "no-store"), *extra]
    start_response(status, headers, exc_info)
    return [body]


def _text(start_response: StartResponse, status: str, message: str,
          extra: Iterable[tuple[str, str]] = (), exc_info: OptExcInfo | None = None) -> list[bytes]:
    return _respond(start_response, status, "text/plain; charset=utf-8",
                    (message + "\n").encode("utf-8"), extra, exc_info)


def _json_default(obj: object) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    return str(obj)


class PathDispatcher:
    """A WSGI application routing ``(method, path)`` to WSGI applications (recipe 11.5).

    ``register(method, path, app, description="")`` adds a route. A path
    registered for GET also answers HEAD (the body is dropped); a known path
    asked with another method gets 405 and ``Allow``, an unknown one 404.
    """

    def __init__(self) -> None:
        self.pathmap: dict[str, dict[str, WSGIApplication]] = {}
        self.descriptions: dict[str, str] = {}

    def register(self, method: str, path: str, app: WSGIApplication, description: str = "") -> WSGIApplication:
        """Route ``method`` on ``path`` to the WSGI application ``app``; returns ``app``."""
        self.pathmap.setdefault(path, {})[method.upper()] = app
        if description or path not in self.descriptions:
            self.descriptions[path] = description
        return app

    def routes(self) -> dict[str, str]:
        """``{path: description}`` for every registered path."""
        return dict(self.descriptions)

    def allowed(self, path: str) -> list[str]:
        """The methods ``path`` answers, HEAD included where GET is."""
        methods = set(self.pathmap.get(path, ()))
        if "GET" in methods:
            methods.add("HEAD")
        return sorted(methods)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        method = environ.get("REQUEST_METHOD", "GET").upper()
        routes = self.pathmap.get(path)
        if routes is None:
            return _text(start_response, "404 Not Found", "not found")
        app = routes.get(method)
        head = app is None and method == "HEAD" and "GET" in routes
        if head:
            app = routes["GET"]
        if app is None:
            return _text(start_response, "405 Method Not Allowed", "method not allowed",
                         [("Allow", ", ".join(self.allowed(path)))])
        try:
            result = app(environ, start_response)
            if not head:
                return result
            try:
                # Run it through, so the headers (Content-Length included)
                # are those GET would send.
                for _ in result:
                    pass
            finally:
                if hasattr(result, "close"):
                    result.close()
            return []
        except Exception:
            logger.exception("%s %s failed", method, path)
            return _text(start_response, "500 Internal Server Error", "internal server error",
                         exc_info=sys.exc_info())


def wsgi_app(server: Any, *, prefix: str | None = "fastnet",
             labels: Mapping[str, object] | None = None) -> PathDispatcher:
    """A WSGI application serving ``server.stats()`` at /stats (JSON) and /metrics (Prometheus).

    ``prefix`` and ``labels`` (constant labels, e.g. ``{"server": "echo"}``)
    are :func:`render_metrics`'s.
    """
    if not callable(getattr(server, "stats", None)):
        raise TypeError(f"{type(server).__name__} has no stats() method")
    prefix, labels = _check_options(prefix, labels)
    dispatcher = PathDispatcher()

    def snapshot() -> dict[Any, Any]:
        stats = server.stats()
        if not isinstance(stats, dict):
            raise TypeError(f"stats() returned {type(stats).__name__}, not a dict")
        return stats

    def stats_json(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        body = json.dumps(snapshot(), default=_json_default).encode("utf-8") + b"\n"
        return _respond(start_response, "200 OK", "application/json", body)

    def metrics(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        body = render_metrics(snapshot(), prefix, labels).encode("utf-8")
        return _respond(start_response, "200 OK", METRICS_CONTENT_TYPE, body)

    def index(environ: WSGIEnvironment, start_response: StartResponse) -> list[bytes]:
        body = json.dumps({"routes": dispatcher.routes()}).encode("utf-8") + b"\n"
        return _respond(start_response, "200 OK", "application/json", body)

    dispatcher.register("GET", "/", index, "this list")
    dispatcher.register("GET", "/stats", stats_json, "stats() as JSON")
    dispatcher.register("GET", "/metrics", metrics, "Prometheus text format 0.0.4")
    return dispatcher


# -- a threaded wsgiref server on a daemon thread ----------------------------------------

class _ErrorStream:
    # wsgi.errors: what an application writes there goes to the log, not stderr.
    def write(self, s: str) -> None:
        s = s.rstrip("\n")
        if s:
            logger.error("%s", s)

    def writelines(self, lines: Iterable[str]) -> None:
        for s in lines:
            self.write(s)

    def flush(self) -> None:
        pass


class _ServerHandler(ServerHandler):
    request_handler: WSGIRequestHandler

    def log_exception(self, exc_info: OptExcInfo | None) -> None:
        try:
            logger.error("error in the monitor's WSGI application", exc_info=exc_info)
        finally:
            exc_info = None


class _RequestHandler(WSGIRequestHandler):
    # A client that stops sending or reading frees its thread after this.
    timeout = 30.0
    server: WSGIServer

    def get_stderr(self) -> Any:
        return _ErrorStream()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def log_error(self, format: str, *args: Any) -> None:
        logger.info("%s %s", self.address_string(), format % args)

    def handle(self) -> None:
        # wsgiref's handle(), but telling the application it runs threaded
        # and logging instead of printing.
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline = ""
            self.request_version = ""
            self.command = ""
            self.send_error(414)
            return
        if not self.parse_request():
            return
        handler = _ServerHandler(self.rfile, self.wfile,  # type: ignore[arg-type]
                                 self.get_stderr(), self.get_environ(),
                                 multithread=True)
        handler.request_handler = self
        handler.run(cast("WSGIApplication", self.server.get_app()))


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # close() joins the request threads itself, with a deadline.
    block_on_close = False
    request_queue_size = 64

    def __init__(self, address: tuple[Any, ...], handler: type[WSGIRequestHandler]) -> None:
        self._active: dict[socket.socket, threading.Thread] = {}
        self._active_lock = threading.Lock()
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves socket.getfqdn(host), a DNS round
        # trip that can stall startup for seconds; the bare host will do.
        socketserver.TCPServer.server_bind(self)
        host, port = cast("tuple[str, int]", self.server_address[:2])
        self.server_name = host
        self.server_port = port
        self.setup_environ()

    def process_request(self, request: Any, client_address: Any) -> None:
        t = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                             name="fastnet-monitor-request", daemon=True)
        with self._active_lock:
            self._active[request] = t
        t.start()

    def shutdown_request(self, request: Any) -> None:
        # Unregistered before it is closed, under the lock abort() holds,
        # so abort() never shuts down a descriptor number reused elsewhere.
        with self._active_lock:
            self._active.pop(request, None)
        super().shutdown_request(request)

    def abort(self) -> list[threading.Thread]:
        """Cut every connection in flight; returns their threads."""
        with self._active_lock:
            for request in self._active:
                try:
                    request.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return list(self._active.values())

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.exception("request from %s failed", client_address[0] if client_address else "?")


class _ThreadingWSGIServer6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class Monitor:
    """A running monitor (see :func:`serve`): ``address``, ``url``, ``app``, ``close()``.

    A context manager: leaving the block closes it.
    """

    def __init__(self, app: WSGIApplication, address: tuple[str, int] = DEFAULT_ADDRESS, *,
                 poll_interval: float = 0.25) -> None:
        if not (isinstance(address, tuple) and len(address) == 2 and isinstance(address[0], str)):
            raise TypeError(f"address must be a (host, port) tuple, not {address!r}")
        host, port = address
        cls = _ThreadingWSGIServer6 if ":" in host else _ThreadingWSGIServer
        self.app = app
        self._httpd = cls((host, port), _RequestHandler)
        self._httpd.set_app(app)
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, args=(poll_interval,),
                                        name="fastnet-monitor", daemon=True)
        self._thread.start()
        logger.info("monitor serving on %s", self.url)

    def _serve(self, poll_interval: float) -> None:
        try:
            self._httpd.serve_forever(poll_interval)
        except Exception:
            logger.exception("the monitor's server thread failed")

    @property
    def address(self) -> tuple[str, int]:
        """The ``(host, port)`` listened on (the real port when 0 was asked)."""
        return cast("tuple[str, int]", self._httpd.server_address[:2])

    @property
    def url(self) -> str:
        """``http://host:port/``; a wildcard host is given as loopback, to be fetchable."""
        host, port = self.address
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}/"

    @property
    def closed(self) -> bool:
        """True once close() has begun."""
        return self._closed

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving, cut requests in flight, wait up to ``timeout`` seconds, free the port."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        httpd = self._httpd
        deadline = time.monotonic() + timeout
        httpd.shutdown()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        for t in httpd.abort():
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                logger.warning("a monitor request thread did not finish within %.1f s", timeout)
        httpd.server_close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.url
        return f"<fastnet.monitor.Monitor {state}>"


def serve(server: Any, address: tuple[str, int] = DEFAULT_ADDRESS, *, prefix: str | None = "fastnet",
          labels: Mapping[str, object] | None = None) -> Monitor:
    """Serve :func:`wsgi_app` for ``server`` on a daemon thread; returns a :class:`Monitor`.

    ``address`` is ``(host, port)``; port 0 picks a free port (read it back
    from ``.address`` or ``.url``). Each request runs on its own thread, so
    a slow client delays nobody else. Close it with ``close()`` or a
    ``with`` block.
    """
    return Monitor(wsgi_app(server, prefix=prefix, labels=labels), address)
