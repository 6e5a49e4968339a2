# cython: language_level=3
"""Reactor: readiness dispatch, timers and framed stream transports.

The readiness core under ``fastnet.EventLoop``. One ``Reactor`` owns a
backend (epoll through direct syscalls, poll or select), a table of watched
descriptors indexed by fd, a timer heap, a ready queue and a wake-up
descriptor (eventfd) for other threads. Interest is handed to the backend
only when it changes, so one event costs the same with ten or ten thousand
idle descriptors on epoll.

``FramedTransport`` is the hot path of message servers: on readability it
receives into one buffer shared by every connection of the reactor, cuts
whole frames out of it and hands each to ``protocol.message_received``; the
bytes of a partial frame go to a per-connection ``FrameDecoder``, which also
receives large frames straight into their final object. Sends try the
syscall at once and queue only what the kernel did not take; queued bytes
above a high-water mark pause reading on that connection.

Nothing here logs or chooses socket options: that is ``fastnet.loop``'s job.
"""
cimport cython
from cpython.bytes cimport (PyBytes_FromStringAndSize, PyBytes_AS_STRING,
                            PyBytes_GET_SIZE, PyBytes_CheckExact)
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE,
                             PyBUF_WRITABLE)
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from cpython.memoryview cimport PyMemoryView_GET_BUFFER
from libc.string cimport memcpy, strerror
from libc.stdint cimport uint32_t, uint64_t, int32_t
from libc.math cimport ceil
from posix.unistd cimport close as c_close, read as c_read, write as c_write

import collections
import socket as _socket
import sys
import traceback

from fastnet.errors import ProtocolError, MessageTooLarge, TruncatedFrameError
from fastnet._c.framing import FrameDecoder

include "sockio.pxi"

from framing cimport write_header, parse_header, header_error

cdef enum:
    _READ = 1
    _WRITE = 2
    _HUP = 4          # the peer shut down its side: read on until EOF
    _K_EPOLL = 0
    _K_POLL = 1
    _K_SELECT = 2

BACKENDS = ("epoll", "poll", "select")
#: select() cannot watch a descriptor at or above this number.
SELECT_FD_LIMIT = FD_SETSIZE
#: Payloads up to this size are copied next to their header and sent with one
#: send(); larger ones go out as a two-iovec sendmsg without a copy.
COPY_THRESHOLD = 65536
DEFAULT_HIGH_WATER = 1 << 20
#: Bytes one recv() may take for a connection; one buffer serves them all.
RECV_BUFSIZE = 262144

cdef Py_ssize_t _COPY = COPY_THRESHOLD
cdef Py_ssize_t _IOV_MAX = 1024
cdef int _MAX_EVENTS = 65536
# the decoder of a connection starts small: ten thousand idle peers must not
# each hold a large buffer
cdef Py_ssize_t _DECODER_BUFSIZE = 1024
# a frame still missing this much is received straight into the decoder
cdef Py_ssize_t _DIRECT_READ = 65536


def default_backend():
    """The backend "auto" picks: epoll on Linux."""
    return "epoll"


cdef object _closed_error():
    return RuntimeError("the event loop is closed")


cdef int _fd_of(obj) except -1:
    cdef long fd
    if isinstance(obj, int):
        fd = obj
    else:
        fd = obj.fileno()
    if fd < 0:
        raise ValueError(f"invalid file descriptor {fd}")
    return <int>fd


# One piece of the kernel per file; reactor.pxd declares the types they share.
include "reactor_handles.pxi"
include "reactor_timers.pxi"
include "reactor_poller.pxi"
include "reactor_loop.pxi"
include "reactor_flow.pxi"
include "reactor_transport.pxi"
