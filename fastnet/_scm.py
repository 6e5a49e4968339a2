"""SCM_RIGHTS ancillary data, for sockets driven from Python.

A leaf module: the pure kernels (the framing channel, fdpass) and
``fastnet.aio`` build and read descriptor-passing control messages with it.
"""
from __future__ import annotations

import array
import socket
from collections.abc import Iterable
from typing import Any, SupportsInt

__all__ = ["MAX_FDS", "INT_SIZE", "CTRL_SPACE", "CLOEXEC", "CTRUNC", "scm_fds", "scm_rights"]

#: Most descriptors one message may carry (Linux's SCM_MAX_FD).
MAX_FDS = 253
INT_SIZE = array.array("i").itemsize
#: Room for MAX_FDS descriptors in one control message (recvmsg's ancbufsize).
CTRL_SPACE = socket.CMSG_SPACE(MAX_FDS * INT_SIZE)
# plain ints: or-ing the socket module's IntFlag members costs enum calls per receive
CLOEXEC = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0))
CTRUNC = int(socket.MSG_CTRUNC)
_SOL_SOCKET = socket.SOL_SOCKET
_SCM_RIGHTS = socket.SCM_RIGHTS


def scm_fds(anc: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors of the SCM_RIGHTS messages in recvmsg's ancillary data, in order."""
    fds = array.array("i")
    for level, kind, data in anc:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % INT_SIZE])
    return list(fds)


def scm_rights(fds: Iterable[SupportsInt]) -> list[tuple[int, int, Any]]:
    """sendmsg's ancillary data passing ``fds`` (an ``array('i')`` is used as it is)."""
    if not (isinstance(fds, array.array) and fds.typecode == "i"):
        fds = array.array("i", [int(f) for f in fds])
    return [(_SOL_SOCKET, _SCM_RIGHTS, fds)]
