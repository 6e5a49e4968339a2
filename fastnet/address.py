"""Address parsing: the forms multiprocessing accepts, plus URLs.

``(host, port)`` is TCP (IPv6 when the host is an IPv6 literal), a string is
an AF_UNIX path (``"\\0name"`` is Linux's abstract namespace), and the URL
forms ``tcp://host:port``, ``tcp://[::1]:port``, ``unix:///path`` and
``unix://@name`` (abstract) name the same things.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import stat
import socket
import tempfile
import itertools
from typing import Any, Union

# The address forms parse_address accepts: a (host, port) or (host, port,
# flowinfo, scope_id) tuple, an AF_UNIX path (str, bytes or path-like), a URL.
Address = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]", tuple[Any, ...]]

__all__ = ["parse_address", "address_type", "arbitrary_address", "format_address", "bind"]

_FAMILIES = {
    "AF_INET": socket.AF_INET,
    "AF_INET6": socket.AF_INET6,
    "AF_UNIX": socket.AF_UNIX,
}
_counter = itertools.count()


def _family_of(family: str | int | None) -> int | None:
    if family is None:
        return None
    if family == "AF_PIPE":
        raise ValueError("Family AF_PIPE is not recognized.")   # the stdlib's words, off Windows
    if isinstance(family, str):
        try:
            return _FAMILIES[family]
        except KeyError:
            raise ValueError(f"unrecognized family {family!r}") from None
    if family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
        return family
    raise ValueError(f"unrecognized family {family!r}")


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address)
    except ValueError:
        return False


def _parse_url(url: str) -> tuple[int, str | tuple[str, int]]:
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    if scheme == "unix":
        if rest.startswith("@"):
            return socket.AF_UNIX, "\0" + rest[1:]
        if not rest:
            raise ValueError(f"empty AF_UNIX path in {url!r}")
        return socket.AF_UNIX, rest
    if scheme in ("tcp", "tcp4", "tcp6"):
        if rest.startswith("["):
            host, sep, port_text = rest[1:].partition("]:")
            if not sep:
                raise ValueError(f"bad address {url!r}: expected tcp://[v6addr]:port")
        else:
            host, sep, port_text = rest.rpartition(":")
            if not sep:
                raise ValueError(f"bad address {url!r}: expected tcp://host:port")
        port_text = port_text.rstrip("/")
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"bad port in {url!r}") from None
        if not 0 <= port <= 65535:
            raise ValueError(f"port out of range in {url!r}")
        fam = socket.AF_INET6 if (scheme == "tcp6" or _is_ipv6(host)) else socket.AF_INET
        return fam, (host, port)
    raise ValueError(f"unsupported address scheme in {url!r} (use tcp:// or unix://)")


def parse_address(address: Address, family: str | int | None = None) -> tuple[int, Any]:
    """Return ``(family, sockaddr)`` for any accepted address form."""
    if isinstance(address, str) and address.startswith("\\\\"):
        # a Windows named pipe (\\.\pipe\name): the stdlib refuses it off
        # Windows rather than binding a file of that name
        _family_of("AF_PIPE")
    fam = _family_of(family)
    if isinstance(address, str) and "://" in address:
        ufam, addr = _parse_url(address)
        if fam is not None and fam != ufam:
            raise ValueError(f"address {address!r} does not match family {family!r}")
        return ufam, addr
    if isinstance(address, tuple):
        if len(address) not in (2, 4):
            raise ValueError(f"bad address {address!r}")
        if fam is None:
            fam = socket.AF_INET6 if (len(address) == 4 or _is_ipv6(address[0])) else socket.AF_INET
        if fam == socket.AF_UNIX:
            raise ValueError(f"address {address!r} does not match family {family!r}")
        return fam, address
    if isinstance(address, (str, bytes, os.PathLike)):
        if fam not in (None, socket.AF_UNIX):
            raise ValueError(f"address {address!r} does not match family {family!r}")
        return socket.AF_UNIX, os.fspath(address)
    raise ValueError(f"address type of {address!r} unrecognized")


def address_type(address: Address) -> str:
    """The family name of an address, as multiprocessing.connection.address_type.

    ``"AF_PIPE"`` for a Windows pipe name, which no other function accepts.
    """
    if isinstance(address, str) and address.startswith("\\\\"):
        return "AF_PIPE"
    fam = parse_address(address)[0]
    names: dict[int, str] = {socket.AF_INET: "AF_INET", socket.AF_INET6: "AF_INET6", socket.AF_UNIX: "AF_UNIX"}
    return names[fam]


def arbitrary_address(family: str | int) -> str | tuple[str, int]:
    """A fresh address to listen on for the given family."""
    fam = _family_of(family)
    if fam == socket.AF_INET:
        return ("localhost", 0)
    if fam == socket.AF_INET6:
        return ("::1", 0)
    if fam == socket.AF_UNIX:
        return os.path.join(tempfile.gettempdir(), f"fastnet-{os.getpid()}-{next(_counter)}.sock")
    raise ValueError(f"unrecognized family {family!r}")


def format_address(family: int, addr: Any) -> str:
    """A URL for a bound or peer address (for logs and ``fastnet call``)."""
    if family == socket.AF_UNIX:
        if isinstance(addr, bytes):
            addr = addr.decode("utf-8", "surrogateescape")
        path: str = addr
        return "unix://@" + path[1:] if path.startswith("\0") else "unix://" + path
    host, port = addr[0], addr[1]
    return f"tcp://[{host}]:{port}" if family == socket.AF_INET6 else f"tcp://{host}:{port}"


def _listed_in_proc(path: str) -> bool:
    """Whether Linux lists a socket bound to path (so without connecting to a live server)."""
    names = {path, os.path.abspath(path)}
    try:
        with open("/proc/net/unix", "rb") as f:
            next(f, None)
            for line in f:
                fields = line.rstrip(b"\n").split(None, 7)
                if len(fields) == 8 and os.fsdecode(fields[7]) in names:
                    return True
    except OSError:
        pass
    return False


def _stale_unix_socket(path: str, kind: int) -> bool:
    """Whether path is a socket file that no one listens on any more."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    if _listed_in_proc(path):
        return False
    # Not listed (no /proc, or bound from another network namespace): ask the
    # socket itself. A live server then sees one connection that closes at once.
    probe = socket.socket(socket.AF_UNIX, kind)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


def bind(sock: socket.socket, addr: Any) -> None:
    """``sock.bind(addr)``; an AF_UNIX path left behind by a dead server is replaced.

    A server that was killed leaves its socket file; binding to it again fails
    with EADDRINUSE though nothing listens. The file is removed only when it
    is a socket and connecting to it is refused, so a live server's address
    is never taken over: that still raises EADDRINUSE.
    """
    try:
        sock.bind(addr)
    except OSError as exc:
        if (exc.errno != errno.EADDRINUSE or sock.family != socket.AF_UNIX
                or not isinstance(addr, str) or addr.startswith("\0")
                or not _stale_unix_socket(addr, sock.type)):
            raise
        try:
            os.unlink(addr)
        except FileNotFoundError:
            pass
        sock.bind(addr)
