"""The ``fastnet`` command: ``fastnet bench`` and ``fastnet info``."""
import argparse
import platform
import sys

__all__ = ["main"]


def _info(args):
    import importlib
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


def main(argv=None):
    """Entry point of the ``fastnet`` console script and ``python -m fastnet``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="fastnet", description="fast, safe message transport")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("bench", help="compare fastnet with the stdlib and pyzmq (fastnet bench --help)",
                   add_help=False)
    sub.add_parser("info", help="version, active kernels and event-loop backends")
    if argv and argv[0] == "bench":
        from fastnet import benchmark
        return benchmark.main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info(args)
    parser.print_help()
    return 2
