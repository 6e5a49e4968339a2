"""The ``fastnet`` command: ``bench``, ``info``, ``serve-rpc`` and ``call``.

A user mistake (a module that does not import, an address nobody listens
on, a wrong key, a remote exception) is one line on stderr and a non-zero
exit status, never a traceback: 1 for a failed call or server, 2 for bad
usage.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import platform
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastnet._version import __version__

if TYPE_CHECKING:
    import ssl

__all__ = ["main"]

logger = logging.getLogger("fastnet.cli")


class _UsageError(Exception):
    """A mistake in the command line: reported in one line, exit status 2."""


def _info(args: argparse.Namespace) -> int:
    import select

    import fastnet
    from fastnet import _kernels

    print(f"fastnet {fastnet.__version__}")
    print(f"kernels: {fastnet.backend}" + (" (FASTNET_PURE=1)" if _kernels.PURE else ""))
    for name in _kernels.KERNELS:
        try:
            mod = importlib.import_module(f"fastnet._c.{name}")
            print(f"  compiled {name}: {mod.__file__}")
        except ImportError as exc:
            print(f"  compiled {name}: missing ({exc})")
    loops = [b for b in ("epoll", "poll", "select") if hasattr(select, b)]
    print(f"event-loop backends: {', '.join(loops)}")
    print(f"python: {sys.version.split()[0]} ({platform.python_implementation()})")
    print(f"platform: {platform.platform()}")
    return 0


# -- shared options ------------------------------------------------------------------


def _address(text: str) -> str | tuple[str, int]:
    """``host:port``, ``[v6]:port``, ``tcp://``/``unix://`` URLs, or a filesystem path."""
    if "://" in text or text.startswith(("/", "./", "\0", "@")):
        return "\0" + text[1:] if text.startswith("@") else text
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise _UsageError(f"bad address {text!r}: use HOST:PORT, a path, or tcp:// / unix:// URLs")
    return (host.strip("[]") or "127.0.0.1", int(port))


def _authkey(args: argparse.Namespace) -> bytes | None:
    if args.authkey_env is None:
        return None
    value = os.environ.get(args.authkey_env)
    if not value:
        raise _UsageError(f"environment variable {args.authkey_env} is not set or empty")
    return value.encode()


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--codec", default="msgpack", help="msgpack (default), json or pickle")
    p.add_argument("--authkey-env", metavar="VAR",
                   help="read the authkey from this environment variable (never from the command line)")
    p.add_argument("--tls-cert", metavar="PEM", help="this end's certificate")
    p.add_argument("--tls-key", metavar="PEM", help="this end's private key")
    p.add_argument("--tls-ca", metavar="PEM", help="CA certificates to verify the peer against")


# -- serve-rpc -----------------------------------------------------------------------


def _load_target(spec: str) -> tuple[Any, str]:
    """``module`` or ``module:object`` -> (what to register, description)."""
    modname, _, attr = spec.partition(":")
    if not modname:
        raise _UsageError(f"bad target {spec!r}: use MODULE or MODULE:OBJECT")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(modname)
    except ImportError as e:
        raise _UsageError(f"cannot import {modname!r}: {e}") from None
    if not attr:
        return mod, f"module {modname}"
    obj = mod
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise _UsageError(f"{modname!r} has no attribute {attr!r}") from None
    if inspect.isclass(obj):
        try:
            obj = obj()
        except TypeError as e:
            raise _UsageError(f"cannot create {attr}() with no arguments: {e}") from None
    return obj, f"{modname}:{attr}"


def _register_target(server: Any, obj: Any) -> list[str]:
    if inspect.ismodule(obj):
        names = getattr(obj, "__all__", None)
        if names is None:
            # the module's own public functions, not what it imported
            names = [n for n, f in vars(obj).items()
                     if not n.startswith("_") and inspect.isfunction(f)
                     and f.__module__ == obj.__name__]
        for n in names:
            f = getattr(obj, n)
            if callable(f):
                server.register_function(f, n)
    elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
        server.register_function(obj)
    else:
        server.register_instance(obj)
    exposed = [m for m in server.methods if not m.startswith("system.")]
    if not exposed:
        raise _UsageError("the target exposes no public functions or methods")
    return exposed


def _server_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.tls_cert is None and args.tls_key is None and args.tls_ca is None:
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise _UsageError("a TLS server needs --tls-cert and --tls-key")
    from fastnet.tls import server_context
    try:
        return server_context(args.tls_cert, args.tls_key, cafile=args.tls_ca,
                              require_client_cert=args.tls_ca is not None)
    except (OSError, ValueError) as e:
        raise _UsageError(f"TLS setup failed: {e}") from None


def _serve_rpc(args: argparse.Namespace) -> int:
    import fastnet

    obj, what = _load_target(args.target)
    address = _address(args.address)
    ctx = _server_tls(args)
    try:
        server = fastnet.RPCServer(address, authkey=_authkey(args), codec=args.codec.split(","),
                                   ssl_context=ctx, workers=args.workers,
                                   blocking=args.blocking,
                                   allow_insecure_pickle=args.allow_insecure_pickle)
    except (ValueError, TypeError, KeyError) as e:
        raise _UsageError(str(e).strip("'\"")) from None
    try:
        exposed = _register_target(server, obj)
        print(f"serving {what} on {server.address!r} ({', '.join(server.codecs)}): "
              f"{', '.join(exposed)}", flush=True)
        server.serve_forever()
    finally:
        server.server_close()
    return 0


# -- call ----------------------------------------------------------------------------


def _client_tls(args: argparse.Namespace, address: str | tuple[str, int]) -> ssl.SSLContext | None:
    if args.tls_ca is None and args.tls_cert is None:
        return None
    from fastnet.tls import client_context
    try:
        return client_context(cafile=args.tls_ca, certfile=args.tls_cert, keyfile=args.tls_key,
                              check_hostname=not isinstance(address, str))
    except (OSError, ValueError) as e:
        raise _UsageError(f"TLS setup failed: {e}") from None


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text     # a bare word is a string: `fastnet call ADDR greet world`


def _printable(obj: object) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"bytes": bytes(obj).hex()}
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    return repr(obj)


def _call(args: argparse.Namespace) -> int:
    import fastnet
    from fastnet.errors import RemoteError

    address = _address(args.address)
    call_args = [_json_arg(a) for a in args.args]
    try:
        kwargs = json.loads(args.kwargs) if args.kwargs else {}
    except ValueError as e:
        raise _UsageError(f"--kwargs is not JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise _UsageError("--kwargs must be a JSON object")
    proxy = fastnet.RPCProxy(address, authkey=_authkey(args), codec=args.codec,
                             ssl_context=_client_tls(args, address), timeout=args.timeout,
                             connect_timeout=args.timeout or 10.0)
    with proxy:
        try:
            result = proxy.invoke(args.method, call_args, kwargs)
        except Exception as e:
            # with pickle a remote exception arrives as its own type, caused by the RemoteError
            if isinstance(e.__cause__, RemoteError):
                raise e.__cause__ from None
            raise
    print(json.dumps(result, indent=args.indent, default=_printable, ensure_ascii=False))
    return 0


# -- entry point ---------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastnet", description="fast, safe message transport")
    parser.add_argument("--version", action="version", version=f"fastnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("bench", help="compare fastnet with the stdlib and its peers (fastnet bench --help)",
                   add_help=False)
    sub.add_parser("info", help="version, active kernels and event-loop backends")
    p = sub.add_parser("serve-rpc", help="expose a module's functions or an object's methods over RPC")
    p.add_argument("target", help="MODULE or MODULE:OBJECT (a class is instantiated with no arguments)")
    p.add_argument("--address", required=True, help="HOST:PORT, a path, or a tcp:// / unix:// URL")
    p.add_argument("--workers", type=int, default=1, help="prefork worker processes (default 1)")
    p.add_argument("--blocking", action="store_true",
                   help="run every method on worker threads (for methods that block)")
    p.add_argument("--allow-insecure-pickle", action="store_true",
                   help="accept pickle without authentication (trusted networks only)")
    _add_common(p)
    p = sub.add_parser("call", help="call one RPC method and print its result as JSON")
    p.add_argument("address", help="HOST:PORT, a path, or a tcp:// / unix:// URL")
    p.add_argument("method")
    p.add_argument("args", nargs="*", help="arguments, each JSON (a bare word is a string)")
    p.add_argument("--kwargs", help="keyword arguments as a JSON object")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    p.add_argument("--indent", type=int, default=None, help="indent the JSON output")
    _add_common(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastnet`` console script and ``python -m fastnet``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":
        from fastnet.bench import main as bench_main
        return bench_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="fastnet: %(message)s")
    handler = {"info": _info, "serve-rpc": _serve_rpc, "call": _call}[args.command]
    from fastnet.errors import FastnetError, RemoteError
    try:
        return handler(args)
    except _UsageError as e:
        print(f"fastnet {args.command}: {e}", file=sys.stderr)
        return 2
    except RemoteError as e:
        print(f"fastnet {args.command}: remote {e.type_name}: {e.message}", file=sys.stderr)
        return 1
    except (FastnetError, OSError, EOFError, ValueError, TypeError) as e:
        print(f"fastnet {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
