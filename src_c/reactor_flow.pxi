# TransportBase: the state and flow control every transport on a Reactor
# shares (included by reactor.pyx). FramedTransport extends it in C;
# fastnet.tls.TLSTransport extends it in Python.
#
# Where the two differ, the base calls a hook: _reading_changed (how
# reading is turned on or off), _schedule_drain (how input held back while
# paused is delivered later), _flush_then_close (what close() does with
# what is queued) and _finalize (closing for good). The hooks are cpdef so
# that a Python subclass can override them; on FramedTransport, a static
# type without a __dict__, Cython's override check is two flag tests, and
# none of the hooks is on the send or receive path anyway. What counts as
# buffered needs no hook: _wq_bytes is all a transport holds that the
# kernel has not taken (for TLS, plaintext not yet encrypted as well as
# ciphertext not yet sent), and each subclass keeps it so.


cdef class TransportBase:
    """What the loop's transports share: flow control, state and the protocol's callbacks.

    Queued bytes above the high-water mark pause reading and call the
    protocol's ``pause_writing()``; at or below the low-water mark reading
    resumes and ``resume_writing()`` is called. Not made directly: see
    ``Reactor.add_stream`` and ``fastnet.tls.TLSTransport``.
    """

    def __init__(self, *a, **k):
        raise TypeError("TransportBase is the base of the loop's transports, not one itself")

    def _setup(self, Reactor loop, sock, int fd, protocol, max_message_size, high_water, low_water):
        """Attach to ``loop`` and ``sock``; the subclass's constructor calls this first."""
        self._loop = loop
        self._sock = sock
        self._fd = fd
        self.protocol = protocol
        self._max_size = -1 if max_message_size is None else max_message_size
        self.set_write_buffer_limits(high_water, low_water)

    # -- the hooks ------------------------------------------------------------

    cpdef _reading_changed(self):
        """Hand the wish to read (pause flags, closing) to the loop."""
        raise NotImplementedError

    cpdef _schedule_drain(self):
        """Deliver later what was received while reading was paused."""
        raise NotImplementedError

    cpdef _flush_then_close(self):
        """close() was called: send what is queued, then finalize."""
        raise NotImplementedError

    cpdef _finalize(self, exc):
        """Close the socket now and call connection_lost(exc) once."""
        raise NotImplementedError

    # -- flow control ---------------------------------------------------------

    def _report(self, exc, message):
        """Hand an exception from a callback to the loop's exception handler."""
        self._loop._report(exc, message, self)

    cpdef _check_high(self):
        """Pause reading and the protocol's writing if more than the high-water mark is queued."""
        if self._bp_paused or self._closed or self._wq_bytes <= self._high:
            return
        self._bp_paused = True
        self._pauses += 1
        self._reading_changed()
        pw = getattr(self.protocol, "pause_writing", None)
        if pw is not None:
            try:
                pw()
            except Exception as exc:
                self._loop._report(exc, "exception in pause_writing", self)

    cpdef _check_low(self):
        """Undo _check_high once the queue is down to the low-water mark."""
        if not self._bp_paused or self._closed or self._wq_bytes > self._low:
            return
        self._bp_paused = False
        self._reading_changed()
        rw = getattr(self.protocol, "resume_writing", None)
        if rw is not None:
            try:
                rw()
            except Exception as exc:
                self._loop._report(exc, "exception in resume_writing", self)
        self._schedule_drain()

    def pause_reading(self):
        """Stop calling message_received until resume_reading()."""
        if self._closed or self._user_paused:
            return
        self._user_paused = True
        self._reading_changed()

    def resume_reading(self):
        """Undo pause_reading(); frames received meanwhile are delivered first."""
        if self._closed or not self._user_paused:
            return
        self._user_paused = False
        self._reading_changed()
        self._schedule_drain()

    def set_write_buffer_limits(self, high=None, low=None):
        """Queued bytes above ``high`` pause reading; at or below ``low`` it resumes."""
        if high is None:
            high = DEFAULT_HIGH_WATER if low is None else max(4 * low, DEFAULT_HIGH_WATER)
        if low is None:
            low = high // 4
        if not 0 <= low <= high:
            raise ValueError(f"need 0 <= low ({low}) <= high ({high})")
        self._high = high
        self._low = low

    def get_write_buffer_limits(self):
        return (self._low, self._high)

    def get_write_buffer_size(self):
        """Bytes queued and not yet taken by the kernel."""
        return self._wq_bytes

    @property
    def reading_paused(self):
        """True while reading is paused (by pause_reading or by backpressure)."""
        return self._user_paused or self._bp_paused

    @property
    def _reading_wanted(self):
        """Whether the transport reads now, for Python subclasses: one attribute, not four, on their read path."""
        return _want_read(self)

    # -- state ------------------------------------------------------------------

    @property
    def pauses(self):
        """Times the write queue went over the high-water mark and paused the protocol's writing."""
        return self._pauses

    @property
    def max_message_size(self):
        return None if self._max_size < 0 else self._max_size

    @property
    def socket(self):
        return self._sock

    @property
    def loop(self):
        return self._loop

    def fileno(self):
        return self._fd if not self._closed else -1

    def get_extra_info(self, name, default=None):
        """'peername', 'sockname' or 'socket', as asyncio transports."""
        if name == "socket":
            return self._sock
        if self._closed:
            return default
        try:
            if name == "peername":
                return self._sock.getpeername()
            if name == "sockname":
                return self._sock.getsockname()
        except OSError:
            return default
        return default

    def is_closing(self):
        return self._closing or self._closed

    @property
    def closed(self):
        return self._closed

    def close(self):
        """Stop reading, send what is queued, then close."""
        if self._closing or self._closed:
            return
        self._closing = True
        self._flush_then_close()

    def abort(self):
        """Close now, dropping queued bytes."""
        self._finalize(None)
