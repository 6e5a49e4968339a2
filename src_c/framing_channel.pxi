# Channel: blocking frames over a connected socket's descriptor, driving the
# FrameDecoder of framing.pyx (included by framing.pyx).

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
        if not _spin_on(until):
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
        if not _spin_on(until):
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
        # Up to the copy threshold, header and payload are copied into the
        # scratch buffer and leave in one send: a memcpy of that size costs
        # less than a second syscall or a vectored one. Above it, one
        # sendmsg of two iovecs sends the payload from the caller's memory.
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
            # Small frames and the headers of large ones are packed into the
            # scratch buffer; the iovecs alternate those packed runs with the
            # large payloads, so a batch is one send or one sendmsg.
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
        self._fdcheck()
        self._flush_first()
        return self._recv_frame(-1 if maxlength is None else maxlength, self._deadline(timeout))

    cdef object _recv_frame(self, long long limit, double deadline):
        cdef FrameDecoder d = self.decoder
        cdef object f
        d._check()
        while True:
            f = d._next(limit)
            if f is not None:
                return f
            self._fill(deadline)

    def recv_frame_peeking(self, Py_ssize_t frames, maxlength=None, timeout=None):
        """recv_frame, taking with it the whole frames that have arrived behind it, ``frames`` in all at most.

        For a caller that knows how many frames the peer has left to send
        in an exchange (the authkey handshake): the ones it pipelined come
        in one receive (peeked at, then taken exactly), and nothing past the
        exchange leaves the socket. Later receives return them.
        """
        cdef long long limit = -1 if maxlength is None else maxlength
        # the peer is usually still to answer: wait, then peek (no try first)
        return self._recv_frame(limit, self._peek_first(timeout, frames, limit, False))

    cdef double _peek_first(self, timeout, Py_ssize_t frames=-1, long long limit=-1,
                            bint tryfirst=True) except? -2.0:
        """Start a receive that peeks (see _peek_whole) when nothing is buffered; its deadline."""
        cdef FrameDecoder d = self.decoder
        cdef double deadline = self._deadline(timeout)
        self._fdcheck()
        self._flush_first()
        d._check()
        if frames != 0 and not self.ahead and d.target is None and d.cur < 0 and d.wpos == d.rpos:
            self._peek_whole(deadline, frames, limit, tryfirst)
        return deadline

    cdef Py_ssize_t _peek_whole(self, double deadline, Py_ssize_t frames=-1, long long limit=-1,
                                bint tryfirst=True) except -1:
        """Peek at what the socket holds; take exactly the whole frames at its head.

        Returns the bytes taken into the (empty) buffer, 0 if no whole frame
        has arrived yet. Two syscalls for any number of frames (at most
        ``frames`` of them, if >= 0), and nothing of a partial frame leaves
        the socket. A header the decoder would refuse (negative, the 12-byte
        form, over max_size or ``limit``) ends the scan: the exact path that
        follows receives or reports it.
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
            if tryfirst:
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
            tryfirst = True
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
        while frames != 0:
            h = parse_header(<const unsigned char*>(p + pos), r - pos, &n)
            if (h != 4 or (d.max_size >= 0 and n > d.max_size) or (limit >= 0 and n > limit)
                    or n > r - pos - 4):
                break
            pos += 4 + <Py_ssize_t>n
            frames -= 1
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
        cdef double deadline = self._peek_first(timeout)
        cdef list out = []
        cdef object f
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
