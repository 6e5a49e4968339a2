# cython: language_level=3
"""Framing: multiprocessing.connection's length-prefixed frames.

A frame is a 4-byte big-endian signed length and the payload; payloads over
0x7fffffff use length -1 and an 8-byte big-endian unsigned length. The decoder
never allocates what a header claims before checking it against the limit,
keeps one reusable buffer for small frames (many frames per read), and fills
large frames straight into their final bytes object so they are copied once.

FrameDecoder is sans-I/O (fed bytes by whoever reads: the event loop, an
asyncio protocol, a TLS layer). Channel drives the same decoder with blocking
syscalls on a socket descriptor for Connection. It owns no socket: it borrows
the descriptor of a socket object the Connection keeps alive. Sends try the
syscall at once with the GIL held and wait with the GIL released only on
EAGAIN. Receives take from the socket no more than the frame they return (a
header, then its payload), as multiprocessing does, so select() on the
descriptor stays truthful and a socket shared by several readers loses
nothing; ``readahead=True`` reads as much as the socket has into the
decoder's reusable buffer instead (many frames per syscall). Large frames are
received straight into their final object or the caller's buffer.

Two opt-ins trade resources for speed. ``coalesce`` (a byte threshold)
queues small frames in user space and writes them in one syscall once the
queue passes the threshold, before any receive or poll, and on ``flush()``.
``spin`` (microseconds) makes a receive that would block poll the socket
with non-blocking reads, the GIL released, for up to that long first: it
burns CPU to skip the scheduler's wake-up.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE, PyBUF_ANY_CONTIGUOUS
from cpython.mem cimport PyMem_Malloc, PyMem_Realloc, PyMem_Free
from cpython.object cimport PyObject
from libc.string cimport memcpy, memmove, memset

from fastnet.errors import (ProtocolError, MessageTooLarge, TruncatedFrameError,
                            BufferTooShort, TimeoutError as FastnetTimeout)

include "sockio.pxi"

import sys

# the header codec every compiled kernel shares
from framing cimport write_header, parse_header, header_error

cdef extern from "Python.h":
    # on a borrowed pointer: Cython's own Py_REFCNT(obj) counts the temporary it makes
    Py_ssize_t _refcnt "Py_REFCNT"(PyObject* o)

# The receive buffer doubles up to what it must hold; beyond this the
# doubling would overflow Py_ssize_t (PY_SSIZE_T_MAX // 2).
DEF _MAX_BUFFER = 0x3fffffffffffffff

HEADER_SIZE = 4
LARGE_HEADER_SIZE = 12
#: Frames at least this large are received straight into their own object.
LARGE_FRAME = 65536
DEFAULT_BUFSIZE = 262144


def encode_header(Py_ssize_t n):
    """Return the frame header for an n-byte payload."""
    cdef char tmp[12]
    if n < 0:
        raise ValueError("negative payload length")
    return PyBytes_FromStringAndSize(tmp, write_header(tmp, n))


cdef class _Block:
    """The decoder's receive buffer, shared with the get_buffer() regions over it.

    A region may outlive the decoder's use of the memory (the buffer grew
    while a caller still held the region): the block is freed only when the
    last of them lets go, so a late write lands in dead bytes, not freed ones.
    """
    cdef char* ptr

    def __dealloc__(self):
        PyMem_Free(self.ptr)


cdef _Block _new_block(Py_ssize_t size):
    cdef _Block b = _Block.__new__(_Block)
    b.ptr = <char*>PyMem_Malloc(size)
    if b.ptr == NULL:
        raise MemoryError()
    return b


cdef class _UserBuffer:
    """A caller's writable buffer a frame is being received into (next_frame_into).

    Holds the buffer export, so the memory stays put (a bytearray cannot be
    resized) while the decoder or a get_buffer() region still points into it.
    """
    cdef Py_buffer view
    cdef bint held
    cdef object obj
    cdef Py_ssize_t offset

    def __dealloc__(self):
        if self.held:
            PyBuffer_Release(&self.view)


cdef class FrameDecoder:
    """Incremental decoder of length-prefixed frames.

    Feed bytes with :meth:`feed` (or write into :meth:`get_buffer` and call
    :meth:`buffer_updated`), then take complete frames with :meth:`next_frame`,
    :meth:`frames` or by iterating. ``max_size`` (None: unlimited) is checked
    when a header arrives, before anything is allocated for the payload.
    """
    cdef _Block mem              # owns buf
    cdef char* buf
    cdef Py_ssize_t cap
    cdef Py_ssize_t rpos
    cdef Py_ssize_t wpos
    cdef Py_ssize_t cur          # length of the frame whose header was consumed, -1 if none
    cdef object target           # bytes object (or _UserBuffer) being filled for a large frame, or None
    cdef bint user               # target is a caller's buffer (next_frame_into)
    cdef char* tptr
    cdef Py_ssize_t tpos
    cdef readonly long long max_size
    cdef readonly Py_ssize_t large_threshold
    cdef readonly unsigned long long received     # bytes taken from the stream so far
    cdef readonly unsigned long long frame_start  # stream offset of the last parsed header
    cdef readonly int frame_hdr                   # its header length, 4 or 12
    cdef object broken           # the exception that desynchronised the stream, or None


    def __cinit__(self):
        self.buf = NULL
        self.cap = 0
        self.rpos = 0
        self.wpos = 0
        self.cur = -1
        self.target = None
        self.user = False
        self.tptr = NULL
        self.tpos = 0
        self.received = 0
        self.frame_start = 0
        self.broken = None

    def __init__(self, max_size=None, Py_ssize_t bufsize=DEFAULT_BUFSIZE,
                 Py_ssize_t large_threshold=LARGE_FRAME):
        if bufsize < 64:
            bufsize = 64
        if self.buf == NULL:
            self.mem = _new_block(bufsize)
            self.buf = self.mem.ptr
            self.cap = bufsize
        self.max_size = -1 if max_size is None else max_size
        if self.max_size < -1:
            raise ValueError("max_size must be None or >= 0")
        self.large_threshold = max(large_threshold, 16)

    cdef Py_ssize_t _avail(self) noexcept:
        return self.wpos - self.rpos

    cdef void _consume(self, Py_ssize_t n) noexcept:
        self.rpos += n
        if self.rpos == self.wpos:
            self.rpos = self.wpos = 0

    cdef int _check(self) except -1:
        if self.broken is not None:
            raise self.broken
        return 0

    cdef int _parse_header(self, long long limit) except -1:
        """Consume a header if one is complete: 1 if a frame length is known, 0 if more bytes are needed."""
        cdef long long n
        cdef Py_ssize_t avail
        cdef int h
        if self.cur >= 0:
            return 1
        avail = self.wpos - self.rpos
        if avail < 4:
            return 0
        self.frame_start = self.received - <unsigned long long>avail
        h = parse_header(<const unsigned char*>(self.buf + self.rpos), avail, &n)
        if h == 0:
            return 0
        if h < 0:
            self.broken = header_error(h, n)
            raise self.broken
        self.frame_hdr = h
        self._consume(h)
        if self.max_size >= 0 and n > self.max_size:
            self.broken = MessageTooLarge(
                f"frame of {n} bytes exceeds max_message_size={self.max_size}")
            raise self.broken
        if limit >= 0 and n > limit:
            self.broken = MessageTooLarge(f"bad message length: {n} bytes exceeds maxlength={limit}")
            raise self.broken
        self.cur = <Py_ssize_t>n
        return 1

    cdef int _reserve(self, Py_ssize_t need) except -1:
        """Make room for `need` contiguous unread+free bytes from rpos."""
        cdef Py_ssize_t avail = self.wpos - self.rpos
        cdef char* nb
        cdef Py_ssize_t ncap
        cdef _Block blk
        if need > _MAX_BUFFER:
            raise MemoryError("receive buffer cannot grow that large")
        if self.rpos > 0 and (self.cap - self.rpos < need or self.wpos == self.cap):
            memmove(self.buf, self.buf + self.rpos, avail)
            self.rpos = 0
            self.wpos = avail
        if self.cap < need:
            ncap = self.cap
            while ncap < need:
                ncap *= 2
            if _refcnt(<PyObject*>self.mem) == 1:
                nb = <char*>PyMem_Realloc(self.buf, ncap)
                if nb == NULL:
                    raise MemoryError()
                self.mem.ptr = nb
            else:
                # a get_buffer() region still points into the old block: leave it to them
                blk = _new_block(ncap)
                memcpy(blk.ptr, self.buf, avail)
                self.mem = blk
            self.buf = self.mem.ptr
            self.cap = ncap
        return 0

    cdef int _switch_to_target(self) except -1:
        """Move the buffered part of a large frame into its own bytes object."""
        cdef Py_ssize_t avail = self.wpos - self.rpos
        try:
            self.target = PyBytes_FromStringAndSize(NULL, self.cur)
        except (MemoryError, OverflowError):
            # only a header claiming more than this process can hold gets here
            self.broken = MessageTooLarge(f"frame of {self.cur} bytes cannot be allocated")
            raise self.broken from None
        self.tptr = PyBytes_AS_STRING(self.target)
        memcpy(self.tptr, self.buf + self.rpos, avail)
        self.tpos = avail
        self.rpos = self.wpos = 0
        return 0

    cdef object _next(self, long long limit):
        """Return the next complete frame or None; switch to direct fill for large frames."""
        cdef Py_ssize_t avail, n
        cdef object frame
        if limit >= 0 and self.cur > limit:
            # the header was parsed earlier (has_frame, poll, a timed-out receive)
            self.broken = MessageTooLarge(f"bad message length: {self.cur} bytes exceeds maxlength={limit}")
            raise self.broken
        if self.user:
            self._detach()
        if self.target is not None:
            if self.tpos < self.cur:
                return None
            frame = self.target
            self.target = None
            self.tptr = NULL
            self.cur = -1
            return frame
        if not self._parse_header(limit):
            return None
        n = self.cur
        avail = self.wpos - self.rpos
        if avail >= n:
            frame = PyBytes_FromStringAndSize(self.buf + self.rpos, n)
            self.cur = -1
            self._consume(n)
            return frame
        if n >= self.large_threshold:
            self._switch_to_target()
        return None

    cdef int _detach(self) except -1:
        """Move the part of a frame received into a caller's buffer into a bytes object of its own."""
        cdef object t
        try:
            t = PyBytes_FromStringAndSize(NULL, self.cur)
        except (MemoryError, OverflowError):
            self.broken = MessageTooLarge(f"frame of {self.cur} bytes cannot be allocated")
            raise self.broken from None
        memcpy(PyBytes_AS_STRING(t), self.tptr, self.tpos)
        self.target = t
        self.tptr = PyBytes_AS_STRING(t)
        self.user = False
        return 0

    # -- Python API ------------------------------------------------------

    def next_frame_into(self, buf, Py_ssize_t offset=0):
        """Receive the next frame into the writable buffer ``buf`` at ``offset``.

        Returns the frame's length once it is complete, else None: call
        again, with the same buffer and offset, after each buffer_updated().
        Once the header is parsed, what is buffered of the frame is copied
        into ``buf`` and get_buffer() hands out the rest of it, so the
        payload goes from the socket straight into ``buf``. A frame longer
        than the space is received whole and raised as BufferTooShort
        carrying it. :meth:`detach` (or any other receive) moves a frame
        left half-received into the decoder's own memory.
        """
        cdef _UserBuffer ub
        cdef Py_ssize_t n, avail
        cdef object f
        self._check()
        if self.user:
            ub = <_UserBuffer>self.target
            if ub.obj is not buf or ub.offset != offset:
                self._detach()
            elif self.tpos < self.cur:
                return None
            else:
                self.target = None
                self.tptr = NULL
                self.user = False
                n = self.cur
                self.cur = -1
                return n
        if self.target is None and not self._parse_header(-1):
            return None
        ub = _UserBuffer.__new__(_UserBuffer)
        PyObject_GetBuffer(buf, &ub.view, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
        ub.held = True
        if offset < 0 or offset > ub.view.len:
            raise ValueError("offset out of bounds")
        n = self.cur
        if n > ub.view.len - offset:
            f = self._next(-1)
            if f is None:
                return None
            raise BufferTooShort(f)
        ub.obj = buf
        ub.offset = offset
        if self.target is not None:
            memcpy(<char*>ub.view.buf + offset, self.tptr, self.tpos)
            if self.tpos >= n:
                self.target = None
                self.tptr = NULL
                self.cur = -1
                return n
        else:
            avail = self.wpos - self.rpos
            if avail >= n:
                memcpy(<char*>ub.view.buf + offset, self.buf + self.rpos, n)
                self.cur = -1
                self._consume(n)
                return n
            memcpy(<char*>ub.view.buf + offset, self.buf + self.rpos, avail)
            self.tpos = avail
            self.rpos = self.wpos = 0
        self.target = ub
        self.tptr = <char*>ub.view.buf + offset
        self.user = True
        return None

    def detach(self):
        """Stop receiving into the caller's buffer of next_frame_into(); keep the frame whole.

        What it holds of the frame so far is copied into the decoder's own
        memory and the frame is returned by a later next_frame(). Does
        nothing when no frame is being received into a caller's buffer.
        """
        if self.user:
            self._detach()

    def feed(self, data):
        """Append bytes received from the peer (any buffer-protocol object)."""
        cdef Py_buffer view
        cdef Py_ssize_t off = 0, k, avail
        self._check()
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            while off < view.len:
                k = view.len - off
                if self.target is not None:
                    if self.tpos < self.cur:
                        k = min(self.cur - self.tpos, k)
                        memcpy(self.tptr + self.tpos, <char*>view.buf + off, k)
                        self.tpos += k
                        off += k
                        self.received += k
                        continue
                else:
                    avail = self.wpos - self.rpos
                    if self.cur < 0 and avail < 12:
                        # stage just enough to read a header, so a large
                        # frame goes straight to its target
                        k = min(k, 12 - avail)
                    elif self.cur >= self.large_threshold and avail < self.cur:
                        self._switch_to_target()
                        continue
                self._reserve(self.wpos - self.rpos + k)
                memcpy(self.buf + self.wpos, <char*>view.buf + off, k)
                self.wpos += k
                off += k
                self.received += k
                if self.target is None and self.cur < 0:
                    self._parse_header(-1)
        finally:
            PyBuffer_Release(&view)

    def get_buffer(self, Py_ssize_t sizehint=-1):
        """Return a writable buffer to receive into; then call buffer_updated(n).

        Bytes written into a region after buffer_updated() (or after a later
        call on the decoder) may be lost or overwrite data received since;
        the region keeps alive whatever memory it covers, so they never land
        outside it.
        """
        cdef _MemRegion r = _MemRegion.__new__(_MemRegion)
        cdef Py_ssize_t need
        self._check()
        if self.target is None:
            self._parse_header(-1)
            if self.cur >= self.large_threshold and self.wpos - self.rpos < self.cur:
                self._switch_to_target()
        if self.target is not None and self.tpos < self.cur:
            # the region keeps the frame's memory alive even after the frame is returned
            r.owner = self.target
            r.ptr = self.tptr + self.tpos
            r.size = self.cur - self.tpos
            return memoryview(r)
        if sizehint > _MAX_BUFFER:
            raise MemoryError("receive buffer cannot grow that large")
        need = self.wpos - self.rpos + max(sizehint, 4096)
        if self.target is None and self.cur > need:
            need = self.cur
        self._reserve(need)
        r.owner = self.mem
        r.ptr = self.buf + self.wpos
        r.size = self.cap - self.wpos
        return memoryview(r)

    def buffer_updated(self, Py_ssize_t nbytes):
        """Record that nbytes were written into the last get_buffer() region."""
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        if self.target is not None and self.tpos < self.cur:
            if self.tpos + nbytes > self.cur:
                raise ValueError("buffer_updated beyond the region handed out")
            self.tpos += nbytes
        else:
            if self.wpos + nbytes > self.cap:
                raise ValueError("buffer_updated beyond the region handed out")
            self.wpos += nbytes
        self.received += nbytes

    def next_frame(self, maxlength=None):
        """Return the next complete frame as bytes, or None if none is complete.

        A frame longer than ``maxlength`` raises MessageTooLarge as soon as
        its header is parsed, before its payload is received (the asyncio
        face's ``recv_bytes(maxlength)``, the handshake's message limit).
        """
        cdef long long limit = -1 if maxlength is None else maxlength
        self._check()
        return self._next(limit)

    def frames(self):
        """Return every complete frame now buffered, as a list of bytes."""
        cdef list out = []
        cdef object f
        self._check()
        while True:
            f = self._next(-1)
            if f is None:
                return out
            out.append(f)

    def __iter__(self):
        return self

    def __next__(self):
        self._check()
        f = self._next(-1)
        if f is None:
            raise StopIteration
        return f

    def has_frame(self):
        """True if a complete frame is buffered."""
        self._check()
        if self.target is not None:
            return self.tpos >= self.cur
        if not self._parse_header(-1):
            return False
        return self.wpos - self.rpos >= self.cur

    @property
    def buffered(self):
        """Bytes received and not yet returned as frames (headers excluded once parsed)."""
        if self.target is not None:
            return self.tpos + (self.wpos - self.rpos)
        return self.wpos - self.rpos

    @property
    def needed(self):
        """Bytes still missing to complete the frame in progress (0 if none is).

        That is the last frame begun in the buffered bytes (complete frames
        not yet taken are skipped); for a partial header, the bytes the
        header still lacks.
        """
        return self._needed()

    cdef long long _needed(self):
        cdef Py_ssize_t pos = self.rpos, left
        cdef long long n = self.cur
        cdef int h
        if self.target is not None:
            if self.tpos < self.cur:
                return self.cur - self.tpos
            n = -1
        while True:
            left = self.wpos - pos
            if n < 0:
                if left == 0:
                    return 0
                h = parse_header(<const unsigned char*>(self.buf + pos), left, &n)
                if h == 0:
                    return n
                if h < 0:
                    return 0    # a bad header, reported when it is parsed
                pos += h
                left = self.wpos - pos
            if n > left:
                return n - left
            pos += n
            n = -1

    def eof(self):
        """Signal the end of the stream: raise TruncatedFrameError if a frame is incomplete."""
        self._check()
        cdef long long missing = self._needed()
        if missing > 0:
            self.broken = TruncatedFrameError(missing)
            raise self.broken


# The blocking Channel over a socket descriptor, which drives this decoder.
include "framing_channel.pxi"
