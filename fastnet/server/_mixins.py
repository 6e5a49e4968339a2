"""socketserver's mixins, and its names for the servers they make."""
from __future__ import annotations

import socketserver
from collections.abc import Callable
from typing import Any

from fastnet.server._base import BaseServer, TCPServer, UDPServer, UnixDatagramServer, UnixServer
from fastnet.server._util import _DEFERRING


def _own_or_stdlib(mixin: type, name: str) -> Callable[..., Any]:
    """A mixin method: on fastnet's servers, the server's own (past ``mixin``
    in the MRO); on a stdlib socketserver server, ``mixin``'s."""
    stdlib = getattr(mixin, name)

    def method(self: Any, *args: Any) -> Any:
        if isinstance(self, BaseServer):
            return getattr(super(mixin, self), name)(*args)
        return stdlib(self, *args)

    method.__name__ = name
    method.__doc__ = stdlib.__doc__
    _DEFERRING.add(method)
    return method


class ThreadingMixIn(socketserver.ThreadingMixIn):
    """Serve on threads (socketserver's name).

    On fastnet's servers it makes ``concurrency="thread"`` the default.
    Mixed into a stdlib ``socketserver`` server it is socketserver's own
    mixin (a thread per request), so the result serves concurrently too.
    """
    concurrency = "thread"
    process_request = _own_or_stdlib(socketserver.ThreadingMixIn, "process_request")
    server_close = _own_or_stdlib(socketserver.ThreadingMixIn, "server_close")


class ForkingMixIn(socketserver.ForkingMixIn):
    """Serve in child processes (socketserver's name).

    On fastnet's servers it makes ``concurrency="fork"`` the default
    (``max_children`` bounds the children). Mixed into a stdlib
    ``socketserver`` server it is socketserver's own mixin (a process per
    request).
    """
    concurrency = "fork"
    process_request = _own_or_stdlib(socketserver.ForkingMixIn, "process_request")
    server_close = _own_or_stdlib(socketserver.ForkingMixIn, "server_close")
    handle_timeout = _own_or_stdlib(socketserver.ForkingMixIn, "handle_timeout")
    service_actions = _own_or_stdlib(socketserver.ForkingMixIn, "service_actions")


class PreforkMixIn:
    """Make a server class default to ``concurrency="prefork"`` (fastnet's servers only)."""
    concurrency = "prefork"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if issubclass(cls, socketserver.BaseServer):
            raise TypeError(f"{cls.__name__}: PreforkMixIn needs one of fastnet's servers "
                            "(fastnet.server.TCPServer, UnixServer), not a socketserver one")


class ThreadingTCPServer(ThreadingMixIn, TCPServer):
    pass


class ForkingTCPServer(ForkingMixIn, TCPServer):
    pass


class PreforkTCPServer(PreforkMixIn, TCPServer):
    pass


class ThreadingUDPServer(ThreadingMixIn, UDPServer):
    pass


class ForkingUDPServer(ForkingMixIn, UDPServer):
    pass


class ThreadingUnixStreamServer(ThreadingMixIn, UnixServer):
    pass


class ThreadingUnixDatagramServer(ThreadingMixIn, UnixDatagramServer):
    pass


class ForkingUnixStreamServer(ForkingMixIn, UnixServer):
    pass


class ForkingUnixDatagramServer(ForkingMixIn, UnixDatagramServer):
    pass
