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


#: Payloads up to this size are copied next to their header and sent in one
#: send(); larger ones go out as a two-iovec sendmsg without a copy.
COPY_THRESHOLD = 65536
cdef Py_ssize_t _COPY_THRESHOLD = COPY_THRESHOLD


cdef extern from "<sys/socket.h>" nogil:
    int _AF_UNIX "AF_UNIX"
    int MSG_PEEK


# Room for Linux's SCM_MAX_FD (253) descriptors in one control message.
DEF _MAX_FDS = 253
DEF _CTRL_SPACE = 1040


cdef object _region(const char* p, Py_ssize_t n, bint readonly=True):
    """A memoryview over p[0:n], valid while the caller keeps p alive."""
    cdef _MemRegion r = _MemRegion.__new__(_MemRegion)
    r.ptr = <char*>p
    r.size = n
    r.readonly = readonly
    return memoryview(r)


cdef object _ssl_want = None


cdef tuple _would_block():
    """The exceptions an io in non-blocking mode raises for 'not now' (ssl's WANT_* included)."""
    global _ssl_want
    if _ssl_want is None:
        import ssl
        _ssl_want = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
    return _ssl_want


cdef list _scm_fds(msghdr* m):
    cdef cmsghdr* c = CMSG_FIRSTHDR(m)
    cdef list out = []
    cdef size_t n, i
    cdef int* fdp
    while c != NULL:
        if c.cmsg_level == SOL_SOCKET and c.cmsg_type == SCM_RIGHTS:
            n = (c.cmsg_len - CMSG_LEN(0)) // sizeof(int)
            fdp = <int*>CMSG_DATA(c)
            for i in range(n):
                out.append(fdp[i])
        c = CMSG_NXTHDR(m, c)
    return out


cdef inline ssize_t _spin_recv(int fd, char* p, size_t n, int flags, double until) noexcept nogil:
    """Non-blocking recv in a loop until data, EOF, an error or time ``until``; -1 with EAGAIN when out of time."""
    cdef ssize_t r
    while True:
        r = recv(fd, p, n, flags | MSG_DONTWAIT)
        if r >= 0 or (errno != EAGAIN and errno != EWOULDBLOCK):
            return r
        if _now() >= until:
            return -1


cdef inline ssize_t _spin_recvmsg(int fd, msghdr* m, int flags, double until) noexcept nogil:
    """As _spin_recv, with recvmsg."""
    cdef ssize_t r
    cdef size_t clen = m.msg_controllen
    while True:
        m.msg_controllen = clen
        m.msg_flags = 0
        r = recvmsg(fd, m, flags | MSG_DONTWAIT)
        if r >= 0 or (errno != EAGAIN and errno != EWOULDBLOCK):
            return r
        if _now() >= until:
            return -1


#: The coalescing threshold ``coalesce=True`` means: queued frames are
#: written once they pass this many bytes (the measured knee of the one-way
#: 64-byte stream; larger buffers gain little and delay the first message).
COALESCE_THRESHOLD = 65536


cdef class Channel:
    """Length-prefixed frames over a connected stream socket's descriptor.

    ``Channel(sock, max_size=None, bufsize=..., *, readahead=False, io=None)``.
    Every receive accepts an optional ``timeout`` in seconds (None: block); a
    timeout raises :class:`fastnet.TimeoutError` and leaves what it received
    buffered, so the next receive resumes the frame.

    By default a receive takes from the socket exactly the frame it returns;
    ``recv_frames`` peeks at what has arrived and takes exactly the whole
    frames in it. ``readahead=True`` reads as much as the socket has instead:
    fewer syscalls, but select() on the descriptor no longer sees frames
    already buffered, another process reading the same socket loses them, and
    bytes that follow a frame (a descriptor sent by ``send_handle``) are taken.

    ``io``, when given, is an object with ``recv_into(buffer, nbytes)`` and
    ``sendall(data)`` (an ``ssl.SSLSocket`` fits, and is its own io when passed
    as ``sock``) that carries every byte in
    place of the socket's syscalls; ``sock`` is still what readiness is
    waited on. An ``io`` holding bytes of its own (``pending()``, as TLS
    decrypts whole records) makes ``readahead`` moot: the channel then reads
    as much as it gets, and ``poll``, ``has_frame`` and ``buffered`` count
    ``io.pending()``. With a timeout the io is set non-blocking
    (``settimeout(0.0)``) for each read.

    ``coalesce=n`` (bytes, 0: off; see :meth:`set_coalesce`) queues small
    frames and writes them together; ``spin=us`` busy-polls a receive that
    would block for up to ``us`` microseconds (no effect with an ``io``).
    """
    cdef int fd
    cdef readonly bint readahead  # read as much as the socket has, not exactly one frame
    cdef readonly object io       # carries the bytes instead of the syscalls, or None
    cdef bint ahead               # readahead, or an io (whose own buffering makes exact reads moot)
    cdef readonly FrameDecoder decoder
    cdef char* sbuf
    cdef Py_ssize_t scap
    cdef bint is_unix             # AF_UNIX: read with recvmsg so SCM_RIGHTS is never lost
    cdef list fd_batches         # [(start, end, fds)]: descriptors and the stream range of the read that brought them
    cdef char* cbuf               # frames queued by coalescing
    cdef Py_ssize_t clen
    cdef Py_ssize_t ccap
    cdef Py_ssize_t climit        # coalescing threshold, 0: off
    cdef double spin_s            # busy-poll budget of a receive, seconds
    cdef double spin_us           # ... as given, microseconds

    def __cinit__(self):
        self.fd = -1
        self.sbuf = NULL
        self.scap = 0
        self.cbuf = NULL
        self.clen = 0
        self.ccap = 0
        self.climit = 0
        self.spin_s = 0.0

    def __init__(self, sock, max_size=None, Py_ssize_t bufsize=262144, *, readahead=False, io=None,
                 Py_ssize_t coalesce=0, double spin=0.0):
        self.fd = sock.fileno()
        if self.fd < 0:
            raise ValueError("socket is closed")
        ssl = sys.modules.get("ssl")
        if io is None and ssl is not None and isinstance(sock, ssl.SSLSocket):
            io = sock   # its bytes are only readable through it
        if io is not None and not (hasattr(io, "recv_into") and hasattr(io, "sendall")):
            raise TypeError("io must have recv_into(buffer, nbytes) and sendall(data)")
        self.decoder = FrameDecoder(max_size, bufsize)
        self.readahead = bool(readahead)
        self.io = io
        self.ahead = self.readahead or io is not None
        # AF_UNIX without an io: recvmsg, so SCM_RIGHTS is never lost (an io has no recvmsg)
        self.is_unix = sock.family == _AF_UNIX and io is None
        self.fd_batches = []
        self.scap = _COPY_THRESHOLD + 64
        self.sbuf = <char*>PyMem_Malloc(self.scap)
        if self.sbuf == NULL:
            raise MemoryError()
        if not spin >= 0.0:
            raise ValueError("spin must be >= 0 microseconds")
        self.spin_us = spin
        self.spin_s = spin * 1e-6
        self.set_coalesce(coalesce)

    def __dealloc__(self):
        if self.sbuf != NULL:
            PyMem_Free(self.sbuf)
        PyMem_Free(self.cbuf)

    property coalesce:
        """The coalescing threshold in bytes (0: every frame is written at once)."""
        def __get__(self):
            return self.climit

    property spin:
        """Microseconds a receive that would block busy-polls first (0: none)."""
        def __get__(self):
            return self.spin_us

    def set_coalesce(self, Py_ssize_t limit):
        """Queue frames up to ``limit`` bytes before writing them (0: off, after a flush)."""
        cdef char* p
        if limit < 0:
            raise ValueError("coalesce must be >= 0 bytes")
        if limit == 0:
            if self.clen:
                self.flush()
            self.climit = 0
            return
        if limit + _COPY_THRESHOLD + 64 > self.ccap:
            # room for a queue just under the limit plus the largest frame copied into it
            p = <char*>PyMem_Realloc(self.cbuf, limit + _COPY_THRESHOLD + 64)
            if p == NULL:
                raise MemoryError()
            self.cbuf = p
            self.ccap = limit + _COPY_THRESHOLD + 64
        self.climit = limit
        if self.clen >= limit:
            self.flush()

    def unflushed(self):
        """Bytes of frames queued by coalescing and not yet written."""
        return self.clen

    def flush(self):
        """Write the frames queued by coalescing, in one syscall where the socket takes them.

        The queue is emptied before the write: if it fails, the error is
        raised and the queued frames are dropped (a prefix of them may have
        reached the peer).
        """
        cdef Py_ssize_t n = self.clen
        if n == 0:
            return
        self.clen = 0
        self._fdcheck()
        self._send_all(self.cbuf, n)

    cdef inline int _flush_first(self) except -1:
        # everything queued leaves before this end waits for the peer
        if self.clen:
            self.flush()
        return 0

    cdef int _queue(self, const char* p, Py_ssize_t n) except -1:
        """Append one frame to the coalescing queue; write the queue once it passes the limit."""
        cdef iovec iov[2]
        cdef Py_ssize_t q
        if n > _COPY_THRESHOLD:
            # a large payload goes without a copy, behind the queue, in one sendmsg
            self.clen += write_header(self.cbuf + self.clen, n)
            q = self.clen
            self.clen = 0
            iov[0].iov_base = self.cbuf
            iov[0].iov_len = q
            iov[1].iov_base = <void*>p
            iov[1].iov_len = n
            return self._sendv_all(iov, 2)
        q = self.clen + write_header(self.cbuf + self.clen, n)
        memcpy(self.cbuf + q, p, n)
        self.clen = q + n
        if self.clen >= self.climit:
            self.flush()
        return 0

    def release(self):
        """Forget the descriptor (its socket is being closed); close unclaimed received descriptors."""
        self.fd = -1
        self._close_batches(0, True)

    cdef int _close_batches(self, unsigned long long before, bint every) except -1:
        """Close descriptors whose frame has already been returned without them."""
        cdef list keep = []
        for batch in self.fd_batches:
            if every or <unsigned long long>batch[1] <= before:
                for f in batch[2]:
                    close(f)
            else:
                keep.append(batch)
        self.fd_batches = keep
        return 0

    property max_size:
        """The largest frame accepted (None: unlimited)."""
        def __get__(self):
            return None if self.decoder.max_size < 0 else self.decoder.max_size

    cdef inline int _fdcheck(self) except -1:
        if self.fd < 0:
            raise OSError(9, "handle is closed")
        return 0

    # -- sending ----------------------------------------------------------

    cdef inline int _send_all(self, const char* p, Py_ssize_t n) except -1:
        if self.io is not None:
            self.io.sendall(_region(p, n))
            return 0
        return _send_all(self.fd, p, n)

    cdef inline int _sendv_all(self, iovec* iov, Py_ssize_t cnt) except -1:
        cdef Py_ssize_t i
        if self.io is not None:
            for i in range(cnt):
                if iov[i].iov_len:
                    self.io.sendall(_region(<char*>iov[i].iov_base, iov[i].iov_len))
            return 0
        return _sendv_all(self.fd, iov, cnt)

    cdef int _send_frame_ptr(self, const char* p, Py_ssize_t n) except -1:
        cdef iovec iov[2]
        cdef char hdr[12]
        cdef Py_ssize_t h
        if n <= _COPY_THRESHOLD:
            h = write_header(self.sbuf, n)
            memcpy(self.sbuf + h, p, n)
            return self._send_all(self.sbuf, h + n)
        h = write_header(hdr, n)
        iov[0].iov_base = hdr
        iov[0].iov_len = h
        iov[1].iov_base = <void*>p
        iov[1].iov_len = n
        return self._sendv_all(iov, 2)

    def send_frame(self, buf, Py_ssize_t offset=0, size=None):
        """Send one frame holding buf[offset:offset+size] (any contiguous buffer)."""
        cdef Py_buffer view
        cdef Py_ssize_t n
        self._fdcheck()
        PyObject_GetBuffer(buf, &view, PyBUF_ANY_CONTIGUOUS)
        try:
            if offset < 0 or offset > view.len:
                raise ValueError("offset is out of range")
            n = view.len - offset if size is None else size
            if n < 0:
                raise ValueError("size is negative")
            if offset + n > view.len:
                raise ValueError("buffer length < offset + size")
            if self.climit:
                self._queue(<char*>view.buf + offset, n)
            else:
                self._send_frame_ptr(<char*>view.buf + offset, n)
        finally:
            PyBuffer_Release(&view)

    def send_frames(self, buffers):
        """Send every buffer in the iterable as its own frame, in as few syscalls as possible."""
        cdef list bufs = list(buffers)
        cdef Py_ssize_t nb = len(bufs), i, total = 0, pos, nio, h
        cdef Py_buffer* views
        cdef iovec* iov
        cdef char* p
        cdef Py_ssize_t got = 0
        self._fdcheck()
        if nb == 0:
            return
        self._flush_first()
        views = <Py_buffer*>PyMem_Malloc(nb * sizeof(Py_buffer))
        iov = <iovec*>PyMem_Malloc((2 * nb + 1) * sizeof(iovec))
        if views == NULL or iov == NULL:
            PyMem_Free(views)
            PyMem_Free(iov)
            raise MemoryError()
        try:
            for i in range(nb):
                PyObject_GetBuffer(bufs[i], &views[i], PyBUF_ANY_CONTIGUOUS)
                got += 1
                total += 12
                if views[i].len <= _COPY_THRESHOLD:
                    total += views[i].len
            if total > self.scap:
                p = <char*>PyMem_Realloc(self.sbuf, total)
                if p == NULL:
                    raise MemoryError()
                self.sbuf = p
                self.scap = total
            pos = 0
            nio = 0
            iov[0].iov_base = self.sbuf
            iov[0].iov_len = 0
            for i in range(nb):
                h = write_header(self.sbuf + pos, views[i].len)
                if views[i].len <= _COPY_THRESHOLD:
                    memcpy(self.sbuf + pos + h, views[i].buf, views[i].len)
                    h += views[i].len
                iov[nio].iov_len += h
                pos += h
                if views[i].len > _COPY_THRESHOLD:
                    nio += 1
                    iov[nio].iov_base = views[i].buf
                    iov[nio].iov_len = views[i].len
                    nio += 1
                    iov[nio].iov_base = self.sbuf + pos
                    iov[nio].iov_len = 0
            if iov[nio].iov_len:
                nio += 1
            if nio == 1:
                self._send_all(self.sbuf, iov[0].iov_len)
            else:
                self._sendv_all(iov, nio)
            # shrink a scratch buffer that one huge batch grew
            if self.scap > 4 * 1048576:
                p = <char*>PyMem_Realloc(self.sbuf, _COPY_THRESHOLD + 64)
                if p != NULL:
                    self.sbuf = p
                    self.scap = _COPY_THRESHOLD + 64
        finally:
            for i in range(got):
                PyBuffer_Release(&views[i])
            PyMem_Free(views)
            PyMem_Free(iov)

    # -- receiving --------------------------------------------------------

    cdef Py_ssize_t _read(self, char* p, Py_ssize_t n, double deadline, bint waitall,
                          bint tryfirst=False) except -1:
        cdef ssize_t r
        cdef double until
        if self.io is not None:
            return self._io_read(p, n, deadline, waitall)
        if self.spin_s > 0.0:
            until = _now() + self.spin_s
            if deadline >= 0 and deadline < until:
                until = deadline
            with nogil:
                r = _spin_recv(self.fd, p, n, 0, until)
            if r >= 0:
                return r
            if errno != EAGAIN and errno != EWOULDBLOCK and errno != EINTR:
                PyErr_SetFromErrno(OSError)
                return -1
        elif deadline < 0 and tryfirst:
            # Try the syscall first with the GIL held when the bytes have
            # almost surely arrived (a payload right after its header, frames
            # just peeked at): a recv that succeeds at once is cheaper than
            # releasing and retaking the GIL around one that blocks. Not for
            # a header, which a request/reply peer is usually still waiting
            # for: there the failed try would be a syscall more. A short
            # count is fine: every caller loops until its frame is complete.
            r = recv(self.fd, p, n, MSG_DONTWAIT)
            if r >= 0:
                return r
            if errno != EAGAIN and errno != EWOULDBLOCK and errno != EINTR:
                PyErr_SetFromErrno(OSError)
                return -1
        return _recv_some(self.fd, p, n, deadline, waitall)

    cdef Py_ssize_t _io_read(self, char* p, Py_ssize_t n, double deadline, bint waitall) except -1:
        """recv_into through the io; with a deadline, wait on the socket unless the io holds bytes."""
        cdef object io = self.io
        cdef object view = _region(p, n, False)
        cdef Py_ssize_t got, r
        if deadline < 0:
            got = io.recv_into(view, n)
            while waitall and 0 < got < n:
                r = io.recv_into(view[got:], n - got)
                if r == 0:
                    break
                got += r
            return got
        want = _would_block()
        while True:
            if not self._io_pending() and not _wait_fd(self.fd, POLLIN, deadline):
                raise FastnetTimeout("timed out waiting for data")
            # non-blocking for this read: a readable socket may hold only part
            # of what the io needs (a TLS record), or nothing for the caller
            io.settimeout(0.0)
            try:
                return io.recv_into(view, n)
            except want:
                continue
            finally:
                io.settimeout(None)

    cdef Py_ssize_t _io_pending(self) except -1:
        pending = getattr(self.io, "pending", None)
        return 0 if pending is None else pending()

    cdef unsigned long long _unreturned(self) noexcept:
        """Stream offset where the first frame not yet returned starts."""
        cdef FrameDecoder d = self.decoder
        if d.target is not None or d.cur >= 0:
            return d.frame_start
        return d.received - <unsigned long long>(d.wpos - d.rpos)

    cdef Py_ssize_t _readmsg(self, char* p, Py_ssize_t n, double deadline, bint waitall,
                             bint tryfirst=False) except -1:
        """recvmsg into p, keeping any SCM_RIGHTS descriptors with the stream range they came with."""
        cdef msghdr m
        cdef iovec iov
        cdef char ctrl[_CTRL_SPACE]
        cdef ssize_t r
        cdef int flags
        cdef list fds
        cdef FrameDecoder d = self.decoder
        cdef bint first = deadline < 0 and tryfirst
        cdef bint spin = self.spin_s > 0.0
        cdef double until
        while True:
            iov.iov_base = p
            iov.iov_len = n
            m.msg_name = NULL
            m.msg_namelen = 0
            m.msg_iov = &iov
            m.msg_iovlen = 1
            m.msg_control = ctrl
            m.msg_controllen = _CTRL_SPACE
            m.msg_flags = 0
            flags = MSG_CMSG_CLOEXEC
            if spin:
                # busy-poll first (see _read), once
                spin = False
                until = _now() + self.spin_s
                if deadline >= 0 and deadline < until:
                    until = deadline
                with nogil:
                    r = _spin_recvmsg(self.fd, &m, flags, until)
                if r >= 0:
                    break
                if errno == EAGAIN or errno == EWOULDBLOCK or errno == EINTR:
                    continue
                PyErr_SetFromErrno(OSError)
                return -1
            if deadline >= 0 or first:
                # tried first with the GIL held (see _read)
                first = False
                flags |= MSG_DONTWAIT
                r = recvmsg(self.fd, &m, flags)
            else:
                if waitall:
                    flags |= MSG_WAITALL
                with nogil:
                    r = recvmsg(self.fd, &m, flags)
            if r >= 0:
                break
            if errno == EINTR:
                PyErr_CheckSignals()
                continue
            if errno == EAGAIN or errno == EWOULDBLOCK:
                if deadline >= 0 and not _wait_fd(self.fd, POLLIN, deadline):
                    raise FastnetTimeout("timed out waiting for data")
                continue
            PyErr_SetFromErrno(OSError)
            return -1
        if m.msg_controllen:
            fds = _scm_fds(&m)
            if m.msg_flags & MSG_CTRUNC:
                for f in fds:
                    close(f)
                d.broken = ProtocolError(
                    f"control message truncated: the {len(fds)} descriptors that arrived were closed")
                raise d.broken
            if fds:
                if self.fd_batches:
                    self._close_batches(self._unreturned(), False)
                self.fd_batches.append((d.received, d.received + <unsigned long long>r, fds))
        return r

    cdef int _fill(self, double deadline) except -1:
        """One read into the decoder (buffer or large-frame target); EOF raises."""
        cdef FrameDecoder d = self.decoder
        cdef Py_ssize_t r, need
        cdef char* p
        cdef bint waitall = True
        # a payload has almost surely arrived with its header: try it first (see _read)
        cdef bint tryfirst = d.target is not None or d.cur >= 0
        if d.target is not None:
            p = d.tptr + d.tpos
            need = d.cur - d.tpos
        elif self.ahead:
            need = d.wpos - d.rpos + 4096
            if d.cur >= 0 and d.cur > need:
                need = d.cur
            d._reserve(need)
            p = d.buf + d.wpos
            need = d.cap - d.wpos
            waitall = False
        else:
            # exactly what the frame begun still lacks: its header, then its
            # payload; nothing of the next frame is taken from the socket
            need = d._needed()
            if need <= 0:
                need = 4
            d._reserve(d.wpos - d.rpos + need)
            p = d.buf + d.wpos
        if self.is_unix:
            r = self._readmsg(p, need, deadline, waitall, tryfirst)
        else:
            r = self._read(p, need, deadline, waitall, tryfirst)
        if r > 0:
            if d.target is not None:
                d.tpos += r
            else:
                d.wpos += r
        if r == 0:
            self._eof()
        d.received += r
        return 0

    cdef int _eof(self) except -1:
        cdef FrameDecoder d = self.decoder
        cdef Py_ssize_t missing
        if d.target is not None:
            missing = d.cur - d.tpos
        elif d.cur >= 0:
            missing = d.cur - (d.wpos - d.rpos)
        elif d.wpos > d.rpos:
            missing = d.needed  # a partial header: 4 bytes, or 12 after an 0xffffffff prefix
        else:
            raise EOFError
        d.broken = TruncatedFrameError(missing)
        raise d.broken

    cdef double _deadline(self, timeout) except? -2.0:
        if timeout is None:
            return -1.0
        if timeout < 0:
            raise ValueError("timeout must be >= 0 or None")
        return _now() + timeout

    def recv_frame(self, maxlength=None, timeout=None):
        """Receive one frame as bytes. EOFError on a clean close."""
        cdef FrameDecoder d = self.decoder
        cdef long long limit = -1 if maxlength is None else maxlength
        cdef double deadline = self._deadline(timeout)
        cdef object f
        self._fdcheck()
        self._flush_first()
        d._check()
        while True:
            f = d._next(limit)
            if f is not None:
                return f
            self._fill(deadline)

    cdef Py_ssize_t _peek_whole(self, double deadline) except -1:
        """Peek at what the socket holds; take exactly the whole frames at its head.

        Returns the bytes taken into the (empty) buffer, 0 if no whole frame
        has arrived yet. Two syscalls for any number of frames, and nothing
        of a partial frame leaves the socket. A header the decoder would
        refuse (negative, the 12-byte form, over max_size) ends the scan: the
        exact path that follows receives or reports it.
        """
        cdef FrameDecoder d = self.decoder
        cdef Py_ssize_t r, pos = 0, got = 0
        cdef long long n
        cdef int h
        cdef char* p
        cdef double until
        d._reserve(d.cap)
        p = d.buf + d.wpos
        if self.spin_s > 0.0:
            until = _now() + self.spin_s
            if deadline >= 0 and deadline < until:
                until = deadline
            with nogil:
                _spin_recv(self.fd, p, d.cap - d.wpos, MSG_PEEK, until)
        while True:
            # try first with the GIL held, as _read does
            r = recv(self.fd, p, d.cap - d.wpos, MSG_PEEK | MSG_DONTWAIT)
            if r >= 0:
                break
            if errno == EINTR:
                PyErr_CheckSignals()
                continue
            if errno != EAGAIN and errno != EWOULDBLOCK:
                PyErr_SetFromErrno(OSError)
                return -1
            if deadline >= 0:
                if not _wait_fd(self.fd, POLLIN, deadline):
                    raise FastnetTimeout("timed out waiting for data")
            else:
                with nogil:
                    r = recv(self.fd, p, d.cap - d.wpos, MSG_PEEK)
                if r >= 0:
                    break
                if errno == EINTR:
                    PyErr_CheckSignals()
                elif errno != EAGAIN and errno != EWOULDBLOCK:
                    PyErr_SetFromErrno(OSError)
                    return -1
        if r == 0:
            self._eof()
        while True:
            h = parse_header(<const unsigned char*>(p + pos), r - pos, &n)
            if h != 4 or (d.max_size >= 0 and n > d.max_size) or n > r - pos - 4:
                break
            pos += 4 + <Py_ssize_t>n
        while got < pos:
            # the bytes are there: these reads do not block (a reader sharing
            # the socket must serialise with us, as with multiprocessing)
            if self.is_unix:
                r = self._readmsg(p + got, pos - got, -1.0, True, True)
            else:
                r = self._read(p + got, pos - got, -1.0, True, True)
            if r == 0:
                self._eof()
            got += r
            d.wpos += r
            d.received += r
        return pos

    def recv_frames(self, timeout=None):
        """Receive every frame available now as a list, blocking for at least one.

        Without read-ahead: every whole frame that has arrived (peeked at,
        then taken exactly), or else the next frame as recv_frame does.
        """
        cdef FrameDecoder d = self.decoder
        cdef double deadline = self._deadline(timeout)
        cdef list out = []
        cdef object f
        self._fdcheck()
        self._flush_first()
        d._check()
        if not self.ahead and d.target is None and d.cur < 0 and d.wpos == d.rpos:
            self._peek_whole(deadline)
        while True:
            f = d._next(-1)
            if f is not None:
                out.append(f)
                continue
            if out:
                return out
            self._fill(deadline)

    def recv_frame_into(self, buf, Py_ssize_t offset=0):
        """Receive one frame into buf at offset and return its length.

        Whatever is already buffered is copied; the rest of a large frame is
        received straight into buf. A frame longer than the space raises
        BufferTooShort carrying the whole frame.
        """
        cdef FrameDecoder d = self.decoder
        cdef Py_buffer view
        cdef Py_ssize_t n, avail, k, r, space
        cdef char* p
        cdef object f
        self._fdcheck()
        self._flush_first()
        d._check()
        if d.target is not None:
            # a large frame was started by a timed-out recv_frame: finish it there
            f = self.recv_frame()
            return self._copy_out(buf, offset, f)
        while not d._parse_header(-1):
            self._fill(-1.0)
        PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
        try:
            if offset < 0 or offset > view.len:
                raise ValueError("offset out of bounds")
            n = d.cur
            space = view.len - offset
            if n > space:
                f = self.recv_frame()
                raise BufferTooShort(f)
            p = <char*>view.buf + offset
            avail = d.wpos - d.rpos
            if avail >= n or n < d.large_threshold:
                while d.wpos - d.rpos < n:
                    self._fill(-1.0)
                memcpy(p, d.buf + d.rpos, n)
                d.cur = -1
                d._consume(n)
                return n
            memcpy(p, d.buf + d.rpos, avail)
            d.rpos = d.wpos = 0
            k = avail
            try:
                while k < n:
                    r = self._read(p + k, n - k, -1.0, True)
                    if r == 0:
                        d.broken = TruncatedFrameError(n - k)
                        raise d.broken
                    k += r
                    d.received += r
            except BaseException as e:
                if d.broken is None:
                    d.broken = ProtocolError(
                        f"receive interrupted mid-frame ({k} of {n} bytes): connection state lost")
                raise
            d.cur = -1
            return n
        finally:
            PyBuffer_Release(&view)

    cdef Py_ssize_t _copy_out(self, buf, Py_ssize_t offset, bytes f) except -1:
        cdef Py_buffer view
        cdef Py_ssize_t n = len(f)
        PyObject_GetBuffer(buf, &view, PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS)
        try:
            if offset < 0 or offset > view.len:
                raise ValueError("offset out of bounds")
            if n > view.len - offset:
                raise BufferTooShort(f)
            memcpy(<char*>view.buf + offset, PyBytes_AS_STRING(f), n)
            return n
        finally:
            PyBuffer_Release(&view)

    def discard_frame(self):
        """Receive the next frame and drop it without allocating its size."""
        cdef FrameDecoder d = self.decoder
        cdef Py_ssize_t left, k, r
        cdef char tmp[65536]
        self._fdcheck()
        self._flush_first()
        d._check()
        if d.target is not None:
            self.recv_frame()
            return
        while not d._parse_header(-1):
            self._fill(-1.0)
        left = d.cur
        k = min(left, d.wpos - d.rpos)
        d._consume(k)
        left -= k
        try:
            while left > 0:
                r = self._read(tmp, min(left, 65536), -1.0, False)
                if r == 0:
                    d.broken = TruncatedFrameError(left)
                    raise d.broken
                left -= r
                d.received += r
        except BaseException:
            # the decoder still holds the whole frame's length: resuming would desynchronise
            if d.broken is None:
                d.broken = ProtocolError(
                    f"receive interrupted mid-frame ({d.cur - left} of {d.cur} bytes): connection state lost")
            raise
        d.cur = -1

    def send_frame_fds(self, buf, fds):
        """Send one frame whose first bytes carry ``fds`` as SCM_RIGHTS (AF_UNIX only)."""
        cdef Py_buffer view
        cdef list fdl = [int(f) for f in fds]
        cdef Py_ssize_t nfds = len(fdl), i, h, sent
        cdef char hdr[12]
        cdef iovec iov[2]
        cdef msghdr m
        cdef char ctrl[_CTRL_SPACE]
        cdef cmsghdr* c
        cdef int* fdp
        cdef ssize_t r
        self._fdcheck()
        self._flush_first()
        if not self.is_unix:
            raise ValueError("descriptors can only be passed over AF_UNIX connections")
        if nfds < 1 or nfds > _MAX_FDS:
            raise ValueError(f"send between 1 and {_MAX_FDS} descriptors")
        PyObject_GetBuffer(buf, &view, PyBUF_ANY_CONTIGUOUS)
        try:
            h = write_header(hdr, view.len)
            iov[0].iov_base = hdr
            iov[0].iov_len = h
            iov[1].iov_base = view.buf
            iov[1].iov_len = view.len
            memset(ctrl, 0, _CTRL_SPACE)
            m.msg_name = NULL
            m.msg_namelen = 0
            m.msg_iov = iov
            m.msg_iovlen = 2 if view.len else 1
            m.msg_control = ctrl
            m.msg_controllen = CMSG_SPACE(nfds * sizeof(int))
            m.msg_flags = 0
            c = CMSG_FIRSTHDR(&m)
            c.cmsg_level = SOL_SOCKET
            c.cmsg_type = SCM_RIGHTS
            c.cmsg_len = CMSG_LEN(nfds * sizeof(int))
            fdp = <int*>CMSG_DATA(c)
            for i in range(nfds):
                fdp[i] = fdl[i]
            while True:
                with nogil:
                    r = sendmsg(self.fd, &m, MSG_NOSIGNAL)
                if r >= 0:
                    break
                if errno == EINTR:
                    PyErr_CheckSignals()
                    continue
                if errno == EAGAIN or errno == EWOULDBLOCK:
                    _wait_fd(self.fd, POLLOUT, -1.0)
                    continue
                PyErr_SetFromErrno(OSError)
            # the descriptors went with the first byte; the rest is plain data
            sent = r
            if sent < h:
                self._send_all(hdr + sent, h - sent)
                sent = h
            if sent - h < view.len:
                self._send_all(<char*>view.buf + (sent - h), view.len - (sent - h))
        finally:
            PyBuffer_Release(&view)

    def recv_frame_fds(self, Py_ssize_t maxfds=_MAX_FDS, timeout=None, maxlength=None):
        """Receive one frame and the descriptors that rode on it: ``(bytes, fds)``.

        Descriptors are matched to the frame they were sent with even when
        the channel has read ahead: a read that brings descriptors ends with
        the sender's message that carried them, so they belong to the last
        frame starting inside that read. More than ``maxfds`` closes them
        all and raises ProtocolError; a frame over ``maxlength`` raises
        MessageTooLarge, as recv_frame does.
        """
        cdef FrameDecoder d = self.decoder
        cdef double deadline = self._deadline(timeout)
        cdef long long limit = -1 if maxlength is None else maxlength
        cdef object f
        cdef unsigned long long start, end
        cdef list fds = []
        cdef list keep = []
        self._fdcheck()
        self._flush_first()
        d._check()
        while True:
            f = d._next(limit)
            if f is not None:
                break
            self._fill(deadline)
        start = d.frame_start
        end = start + <unsigned long long>d.frame_hdr + <unsigned long long>len(f)
        for batch in self.fd_batches:
            if batch[0] <= start < batch[1] and end >= batch[1]:
                fds.extend(batch[2])
            elif batch[1] <= start:
                for x in batch[2]:
                    close(x)
            else:
                keep.append(batch)
        self.fd_batches = keep
        if len(fds) > maxfds:
            for x in fds:
                close(x)
            d.broken = ProtocolError(f"{len(fds)} descriptors arrived, at most {maxfds} were expected; closed them")
            raise d.broken
        return f, fds

    def pending_fds(self):
        """Number of received descriptors not yet claimed."""
        return sum(len(b[2]) for b in self.fd_batches)

    def has_frame(self):
        """True if a whole frame is already buffered (recv will not block).

        Bytes an io holds (``pending()``) are taken into the buffer to tell.
        """
        cdef FrameDecoder d = self.decoder
        if d.has_frame():
            return True
        if self.io is not None and self.fd >= 0:
            while self._io_pending() > 0 and not d.has_frame():
                self._fill(0.0)
        return d.has_frame()

    def buffered(self):
        """Number of received bytes not yet returned (with an io's pending() bytes)."""
        if self.io is not None and self.fd >= 0:
            return self.decoder.buffered + self._io_pending()
        return self.decoder.buffered

    def poll(self, timeout=0.0):
        """True if a frame is buffered or the socket has data, waiting up to timeout."""
        cdef FrameDecoder d = self.decoder
        cdef double deadline
        self._fdcheck()
        self._flush_first()
        if d.broken is not None:
            return True
        if d.buffered > 0:
            return True
        deadline = self._deadline(timeout)
        if self.io is None:
            return bool(_wait_fd(self.fd, POLLIN, deadline))
        # a readable socket may carry only bytes the io keeps to itself (TLS
        # 1.3 session tickets): read into the buffer to know
        try:
            self._fill(deadline)
        except FastnetTimeout:
            return False
        except (EOFError, OSError):
            return True     # the receive that follows reports it
        return True
