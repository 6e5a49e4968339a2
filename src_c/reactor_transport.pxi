# FramedTransport: length-prefixed frames over a non-blocking stream socket
# on a Reactor (included by reactor.pyx).

# Write-queue entries are bytes or, for large buffers handed to send_many,
# a C-contiguous memoryview cast to "B": those go out without a copy.
cdef inline char* _qptr(object o):
    if PyBytes_CheckExact(o):
        return PyBytes_AS_STRING(o)
    return <char*>PyMemoryView_GET_BUFFER(o).buf


cdef inline Py_ssize_t _qlen(object o):
    if PyBytes_CheckExact(o):
        return PyBytes_GET_SIZE(o)
    return PyMemoryView_GET_BUFFER(o).len


cpdef object as_frame(object b):
    """bytes as they are; another buffer as a flat byte view of it, copied only if not contiguous.

    What a transport queues for a frame's payload (the TLS transport too).
    """
    cdef object mv
    if PyBytes_CheckExact(b):
        return b
    mv = memoryview(b)
    if not mv.c_contiguous:
        return mv.tobytes()
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


cdef class FramedTransport(TransportBase):
    """Length-prefixed frames over a non-blocking stream socket on a Reactor.

    Created by ``Reactor.add_stream``. ``send_bytes`` / ``send_many`` try the
    send syscall at once and queue only what the kernel did not take; more
    than the high-water mark queued pauses reading until the queue drains to
    the low-water mark. ``close()`` sends what is queued, then closes;
    ``abort()`` closes now. ``protocol.connection_lost(exc)`` is called once,
    with the error (a bad frame from the peer, a socket error) or None.
    """

    def __init__(self, *a, **k):
        raise TypeError("FramedTransport is created by Reactor.add_stream")

    # -- reading ------------------------------------------------------------

    cdef int _read_ready(self, bint hup) except -1:
        # Streams are edge-triggered on epoll (one readiness check per event
        # in the kernel instead of two): read on while a recv filled the
        # buffer, since no new edge comes for bytes already queued, and after
        # the peer's FIN (hup) until recv says EOF, since the FIN's edge may
        # have come with the data just read.
        cdef int rounds = 0, r
        while True:
            if self._dirty and self._decoder.needed >= _DIRECT_READ:
                r = self._read_direct()
            else:
                r = self._read_once()
            if r == 2 or (r == 0 and not hup) or self._closed or not _want_read(self):
                return 0
            rounds += 1
            if rounds == 16:
                # let other connections run; finish on the next iteration
                self._loop._ready.append(_new_handle(self._read_later, (hup,)))
                return 0

    def _read_later(self, hup):
        if not self._closed and _want_read(self):
            try:
                self._read_ready(hup)
            except Exception as exc:
                self._loop._report(exc, "exception in transport", self)
                self._finalize(exc)

    cdef int _read_once(self) except -1:
        """One recv into the shared buffer: 1 if it filled the buffer, 0 if not, 2 on EAGAIN or EOF."""
        cdef Reactor loop = self._loop
        cdef ssize_t n
        cdef int err
        # No readiness check of our own: epoll just said readable, and EAGAIN
        # (return 2) is how the edge-triggered read loop learns it is done.
        # The GIL stays held: the shared buffer is the loop's, and a recv of
        # what already arrived is shorter than releasing and retaking it.
        n = _sys_recv(self._fd, loop._rbuf, loop._rbufsize)
        if n > 0:
            self.bytes_received += n
            self._process(loop._rbuf, n)
            return 1 if n == loop._rbufsize else 0
        if n == 0:
            self._on_eof()
            return 2
        err = errno
        if err == EAGAIN or err == EWOULDBLOCK:
            return 2
        if err == EINTR:
            return 1
        self._finalize(OSError(err, strerror(err).decode("utf-8", "replace")))
        return 2

    cdef int _read_direct(self) except -1:
        """Receive the rest of a large frame straight into the decoder's target."""
        cdef Py_buffer view
        cdef ssize_t n
        cdef Py_ssize_t want
        cdef int err
        region = self._decoder.get_buffer()
        PyObject_GetBuffer(region, &view, PyBUF_SIMPLE | PyBUF_WRITABLE)
        want = view.len
        try:
            # up to a whole large frame's remainder: a copy long enough to
            # let other threads run meanwhile
            with nogil:
                n = _sys_recv(self._fd, view.buf, view.len)
            err = errno
        finally:
            PyBuffer_Release(&view)
        if n > 0:
            self.bytes_received += n
            self._decoder.buffer_updated(n)
            self._drain()
            return 1 if n == want else 0
        if n == 0:
            self._on_eof()
            return 2
        if err == EAGAIN or err == EWOULDBLOCK:
            return 2
        if err == EINTR:
            return 1
        self._finalize(OSError(err, strerror(err).decode("utf-8", "replace")))
        return 0

    cdef int _process(self, char* p, Py_ssize_t n) except -1:
        """Deliver every whole frame in p[0:n]; keep the rest in the decoder."""
        cdef Py_ssize_t off = 0, hdr
        cdef long long length
        if self._dirty:
            if self._feed(p, n) < 0:
                return 0
            return self._drain()
        # whole frames are cut straight out of the read buffer; only a tail
        # goes through the decoder
        while True:
            hdr = parse_header(<const unsigned char*>(p + off), n - off, &length)
            if hdr == 0:
                break
            if hdr < 0:
                self._finalize(header_error(<int>hdr, length))
                return 0
            if self._max_size >= 0 and length > self._max_size:
                self._finalize(MessageTooLarge(
                    f"frame of {length} bytes exceeds max_message_size={self._max_size}"))
                return 0
            if n - off - hdr < length:
                break
            frame = PyBytes_FromStringAndSize(p + off + hdr, <Py_ssize_t>length)
            off += hdr + <Py_ssize_t>length
            self.messages_received += 1
            self._deliver(frame)
            if not _want_read(self):
                break
        if off < n and not self._closed:
            self._feed(p + off, n - off)
        return 0

    cdef int _feed(self, char* p, Py_ssize_t n) except -2:
        """Give bytes to the decoder; -1 if they broke the stream (transport finalized)."""
        cdef _MemRegion r = <_MemRegion>self._loop._region
        if self._decoder is None:
            self._decoder = FrameDecoder(None if self._max_size < 0 else self._max_size,
                                         _DECODER_BUFSIZE)
        r.ptr = p
        r.size = n
        self._dirty = True
        try:
            self._decoder.feed(r)
        except (ProtocolError, MessageTooLarge) as exc:
            self._finalize(exc)
            return -1
        finally:
            r.ptr = NULL
            r.size = 0
        return 0

    cdef int _drain(self) except -1:
        """Deliver the decoder's whole frames while reading is wanted."""
        d = self._decoder
        while _want_read(self):
            try:
                frame = d.next_frame()
            except (ProtocolError, MessageTooLarge) as exc:
                self._finalize(exc)
                return 0
            if frame is None:
                break
            self.messages_received += 1
            self._deliver(frame)
        if not self._closed and d.buffered == 0 and d.needed == 0:
            self._dirty = False
        return 0

    def _drain_later(self):
        self._drain_scheduled = False
        if self._dirty and not self._closed and _want_read(self):
            try:
                self._drain()
            except Exception as exc:
                self._loop._report(exc, "exception in transport", self)
                self._finalize(exc)

    cdef int _deliver(self, frame) except -1:
        try:
            self._on_message(frame)
        except Exception as exc:
            self._loop._report(exc, "exception in message_received", self)
            self._finalize(exc)
        return 0

    cdef int _on_eof(self) except -1:
        self._eof = True
        if self._dirty:
            try:
                self._decoder.eof()
            except TruncatedFrameError as exc:
                self._finalize(exc)
                return 0
        if self._wq:
            self._closing = True
            self._loop._update(self._entry)
        else:
            self._finalize(None)
        return 0

    # -- writing ------------------------------------------------------------

    def send_bytes(self, data):
        """Send one frame holding the bytes of ``data`` (any contiguous buffer)."""
        cdef Py_buffer view
        if self._closing or self._closed:
            raise ConnectionError("send on a closed transport")
        if PyBytes_CheckExact(data):
            self._send_frame(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), data)
            return
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._send_frame(<char*>view.buf, view.len, None)
        finally:
            PyBuffer_Release(&view)

    cdef int _send_frame(self, char* p, Py_ssize_t n, owner) except -1:
        cdef Reactor loop = self._loop
        cdef char hdr[12]
        cdef Py_ssize_t h, total
        cdef ssize_t r
        cdef iovec* iov
        self.messages_sent += 1
        if n <= _COPY:
            # A small frame is copied behind its header into the loop's
            # scratch buffer: one send() and no Python object on the common
            # path. Bytes go out in order, so with a queue we must join it.
            h = write_header(loop._wbuf, n)
            memcpy(loop._wbuf + h, p, n)
            total = h + n
            if self._wq:
                return self._enqueue(PyBytes_FromStringAndSize(loop._wbuf, total), 0)
            # Try the syscall first: the socket buffer is almost always
            # free, so most sends finish here without a writer registration
            # (an epoll_ctl) and a later wake-up. Only the unsent tail is
            # queued, as an object of its own: the scratch buffer is reused.
            r = self._try_send(loop._wbuf, total)
            if r >= 0 and r < total:
                self._enqueue(PyBytes_FromStringAndSize(loop._wbuf + r, total - r), 0)
            return 0
        # A large frame is not copied: header and payload go out as one
        # vectored write, tried at once for the same reason as above; what
        # the kernel did not take is queued, the payload by reference to
        # its owner when there is one (bytes are immutable), else copied.
        h = write_header(hdr, n)
        if not self._wq:
            iov = loop._iov
            iov[0].iov_base = hdr
            iov[0].iov_len = h
            iov[1].iov_base = p
            iov[1].iov_len = n
            r = self._try_sendv(2)
            if r < 0:
                return 0
            total = h + n
            if r == total:
                return 0
        else:
            r = 0
        if r < h:
            self._enqueue(PyBytes_FromStringAndSize(hdr + r, h - r), 0)
            r = h
        if owner is not None:
            self._enqueue(owner, r - h)
        else:
            self._enqueue(PyBytes_FromStringAndSize(p + (r - h), n - (r - h)), 0)
        return 0

    def send_many(self, buffers):
        """Send each buffer of ``buffers`` as its own frame, in one syscall when they fit.

        Large buffers other than bytes are sent from their own memory, not
        copied: leave them unchanged until they are sent.
        """
        cdef Reactor loop = self._loop
        cdef list items = []
        cdef Py_ssize_t total = 0, h, n, k, i, cnt
        cdef char* w
        cdef ssize_t r
        if self._closing or self._closed:
            raise ConnectionError("send on a closed transport")
        for b in buffers:
            b = as_frame(b)
            items.append(b)
            n = _qlen(b)
            total += n + (4 if n <= 0x7fffffff else 12)
        if not items:
            return
        self.messages_sent += len(items)
        if total <= _COPY:
            # the whole batch in the scratch buffer: one send() for many frames
            w = loop._wbuf
            k = 0
            for b in items:
                n = _qlen(b)
                k += write_header(w + k, n)
                memcpy(w + k, _qptr(b), n)
                k += n
            # as in _send_frame: behind a queue, join it; else send at once
            # and queue only the tail the kernel did not take
            if self._wq:
                return self._enqueue(PyBytes_FromStringAndSize(w, k), 0)
            r = self._try_send(w, k)
            if r >= 0 and r < k:
                self._enqueue(PyBytes_FromStringAndSize(w + r, k - r), 0)
            return
        # Large batches: headers as small bytes objects, then one vectored
        # write (at most IOV_MAX pieces) tried at once when nothing is
        # queued; the pieces the kernel did not take, the first possibly
        # from an offset, are queued by reference, not copied.
        pieces = []
        for b in items:
            h = write_header(loop._wbuf, _qlen(b))
            pieces.append(PyBytes_FromStringAndSize(loop._wbuf, h))
            pieces.append(b)
        r = 0
        if not self._wq:
            cnt = min(len(pieces), _IOV_MAX)
            for i in range(cnt):
                loop._iov[i].iov_base = _qptr(pieces[i])
                loop._iov[i].iov_len = _qlen(pieces[i])
            r = self._try_sendv(cnt)
            if r < 0:
                return
        i = 0
        while i < len(pieces) and r >= _qlen(pieces[i]):
            r -= _qlen(pieces[i])
            i += 1
        first = True
        while i < len(pieces):
            self._enqueue(pieces[i], r if first else 0)
            first = False
            i += 1

    cdef ssize_t _try_send(self, char* p, Py_ssize_t n) except -2:
        """send() once; bytes taken, 0 on EAGAIN, -1 if the transport failed.

        MSG_DONTWAIT, not the socket's mode: the descriptor may be shared
        with code that made it blocking, and the loop must never block.
        MSG_NOSIGNAL turns a closed peer into EPIPE for this transport
        instead of a SIGPIPE for the process. Small sends keep the GIL: the
        syscall is shorter than releasing and retaking it.
        """
        cdef ssize_t r
        cdef int err
        while True:
            r = _sys_send(self._fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT)
            if r >= 0:
                self.bytes_sent += r
                return r
            err = errno
            if err == EINTR:
                continue
            if err == EAGAIN or err == EWOULDBLOCK:
                return 0
            self._finalize(OSError(err, strerror(err).decode("utf-8", "replace")))
            return -1

    cdef ssize_t _try_sendv(self, Py_ssize_t cnt) except -2:
        """sendmsg() of the loop's iovecs once, as _try_send; large, so without the GIL."""
        cdef msghdr m
        cdef ssize_t r
        cdef int err
        m.msg_name = NULL
        m.msg_namelen = 0
        m.msg_iov = self._loop._iov
        m.msg_iovlen = cnt
        m.msg_control = NULL
        m.msg_controllen = 0
        m.msg_flags = 0
        while True:
            with nogil:
                r = _sys_sendmsg(self._fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT)
            if r >= 0:
                self.bytes_sent += r
                return r
            err = errno
            if err == EINTR:
                continue
            if err == EAGAIN or err == EWOULDBLOCK:
                return 0
            self._finalize(OSError(err, strerror(err).decode("utf-8", "replace")))
            return -1

    cdef int _enqueue(self, object b, Py_ssize_t off) except -1:
        # Only here, when the queue becomes non-empty, is write interest
        # handed to the backend: a send the kernel took whole costs no
        # epoll_ctl. _write_ready withdraws it once the queue is empty.
        if self._closed:
            return 0
        if not self._wq:
            self._wq_off = off
        self._wq.append(b)
        self._wq_bytes += _qlen(b) - off
        if not self._writing:
            self._writing = True
            self._loop._update(self._entry)
        # tested here first: the common case pays no call
        if not self._bp_paused and self._wq_bytes > self._high:
            self._check_high()
        return 0

    cdef int _write_ready(self) except -1:
        # Edge-triggered: write until the queue is empty or the kernel takes
        # less than offered (then its buffer is full and a new edge will come).
        cdef Reactor loop = self._loop
        cdef list wq
        cdef Py_ssize_t cnt, i, sz, off, offered
        cdef ssize_t r
        cdef object b
        cdef bint took_all
        while True:
            wq = self._wq
            cnt = min(len(wq), _IOV_MAX)
            if cnt == 0:
                break
            off = self._wq_off
            offered = 0
            for i in range(cnt):
                b = wq[i]
                loop._iov[i].iov_base = _qptr(b) + off
                loop._iov[i].iov_len = _qlen(b) - off
                offered += _qlen(b) - off
                off = 0
            r = self._try_sendv(cnt)
            if r <= 0:
                return 0
            took_all = r == offered
            self._wq_bytes -= r
            off = self._wq_off
            i = 0
            while i < len(wq):
                sz = _qlen(wq[i]) - off
                if r >= sz:
                    r -= sz
                    off = 0
                    i += 1
                else:
                    off += r
                    break
            del wq[:i]
            self._wq_off = off
            if self._bp_paused and self._wq_bytes <= self._low:
                self._check_low()
                if self._closed:
                    return 0
            if not took_all:
                break
        if not self._wq and not self._closed:
            self._writing = False
            self._wq_off = 0
            if self._closing:
                self._finalize(None)
                return 0
            loop._update(self._entry)
        return 0

    cpdef _schedule_drain(self):
        if self._dirty and not self._drain_scheduled and not self._closed:
            self._drain_scheduled = True
            self._loop._ready.append(_new_handle(self._drain_later, ()))

    cpdef _reading_changed(self):
        self._loop._update(self._entry)

    # -- control ------------------------------------------------------------

    cpdef _flush_then_close(self):
        if not self._wq:
            self._finalize(None)
        else:
            self._loop._update(self._entry)

    cpdef _finalize(self, exc):
        cdef Reactor loop = self._loop
        cdef _FdEntry e = self._entry
        cdef _LostCall lost
        if self._closed:
            return
        self._closed = True
        self._closing = True
        self._writing = False
        self._wq = []
        self._wq_bytes = 0
        self._decoder = None
        self._dirty = False
        if e is not None:
            e.stream = None
            if not loop._closed:
                loop._update(e)
            self._entry = None
        loop._streams.discard(self)
        try:
            self._sock.close()
        except OSError:
            pass
        self._on_message = None
        lost = _LostCall.__new__(_LostCall)
        lost.protocol = self.protocol
        lost.exc = exc
        loop._ready.append(_new_handle(lost, ()))

    def __repr__(self):
        state = "closed" if self._closed else ("closing" if self._closing else f"fd={self._fd}")
        return f"<FramedTransport {state} queued={self._wq_bytes}>"
