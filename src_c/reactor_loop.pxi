# The Reactor: the descriptor table, the readiness API, call_soon/call_later,
# the run loop and dispatch (included by reactor.pyx).

cdef class Reactor:
    """Readiness dispatch, timers and a ready queue on one thread.

    ``Reactor(backend="auto", spin=0.0)``; backend is "epoll", "poll" or
    "select". ``spin`` (microseconds, 0: off) busy-polls before each wait
    that would block: the backend is polled with a zero timeout, the GIL
    released, until something is ready or ``min(spin, timeout)`` has passed,
    and only then does the reactor sleep for what is left of the timeout.
    Every method except ``call_soon_threadsafe`` and ``stop`` belongs to the
    thread that runs the reactor.
    """

    def __cinit__(self, *args, **kwargs):
        self._epfd = -1
        self._wake_r = -1
        self._wake_w = -1
        self._events = NULL
        self._pfds = NULL
        self._rfd = NULL
        self._rmask = NULL
        self._rbuf = NULL
        self._wbuf = NULL
        self._iov = NULL
        self._maxfd = -1
        self._closed = True   # until __init__ succeeds

    def __init__(self, backend="auto", double spin=0.0):
        if self._ready_init:
            raise RuntimeError("Reactor.__init__ called twice")
        if backend == "auto":
            backend = default_backend()
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use 'auto', 'epoll', 'poll' or 'select'")
        if not spin >= 0.0:
            raise ValueError("spin must be >= 0 microseconds")
        self.backend = backend
        self.spin = spin
        self._spin_s = spin * 1e-6
        self._fds = []
        self._ready = collections.deque()
        self._heap = []
        self._streams = set()
        cdef _MemRegion region = _MemRegion.__new__(_MemRegion)
        region.readonly = True
        self._region = region
        self._rbufsize = RECV_BUFSIZE
        self._rbuf = <char*>PyMem_Malloc(self._rbufsize)
        self._wbuf = <char*>PyMem_Malloc(_COPY + 16)
        self._iov = <iovec*>PyMem_Malloc(_IOV_MAX * sizeof(iovec))
        if self._rbuf == NULL or self._wbuf == NULL or self._iov == NULL:
            raise MemoryError()
        if backend == "epoll":
            self._kind = _K_EPOLL
            self._epfd = epoll_create1(EPOLL_CLOEXEC)
            if self._epfd < 0:
                PyErr_SetFromErrno(OSError)
            self._nevents = 1024
            self._events = <epoll_event*>PyMem_Malloc(self._nevents * sizeof(epoll_event))
            if self._events == NULL:
                raise MemoryError()
        elif backend == "poll":
            self._kind = _K_POLL
            self._pcap = 64
            self._pfds = <pollfd*>PyMem_Malloc(self._pcap * sizeof(pollfd))
            self._rcap = 64
        else:
            self._kind = _K_SELECT
            FD_ZERO(&self._rset)
            FD_ZERO(&self._wset)
            self._rcap = FD_SETSIZE
        if self._kind != _K_EPOLL:
            self._rfd = <int*>PyMem_Malloc(self._rcap * sizeof(int))
            self._rmask = <int*>PyMem_Malloc(self._rcap * sizeof(int))
            if self._rfd == NULL or self._rmask == NULL or (self._kind == _K_POLL and self._pfds == NULL):
                raise MemoryError()
        self._ready_init = True
        self._closed = False
        _open_wake(self)

    def __dealloc__(self):
        if self._epfd >= 0:
            c_close(self._epfd)
        if self._wake_is_eventfd and self._wake_r >= 0:
            c_close(self._wake_r)
        PyMem_Free(self._events)
        PyMem_Free(self._pfds)
        PyMem_Free(self._rfd)
        PyMem_Free(self._rmask)
        PyMem_Free(self._rbuf)
        PyMem_Free(self._wbuf)
        PyMem_Free(self._iov)

    # -- descriptor table and interest ----------------------------------------

    cdef _FdEntry _entry(self, int fd):
        """The entry for fd, created if missing."""
        cdef _FdEntry e
        cdef Py_ssize_t n = len(self._fds)
        if self._kind == _K_SELECT and fd >= FD_SETSIZE:
            raise ValueError(
                f"the select backend cannot watch descriptor {fd}: select() is limited to "
                f"descriptors below FD_SETSIZE={FD_SETSIZE}; use backend='epoll' or 'poll'")
        if fd < n:
            obj = self._fds[fd]
            if obj is not None:
                return <_FdEntry>obj
        else:
            self._fds.extend([None] * (fd + 1 - n + 16))
        e = _FdEntry.__new__(_FdEntry)
        e.fd = fd
        e.pidx = -1
        self._fds[fd] = e
        return e

    cdef inline _FdEntry _lookup(self, int fd):
        if fd < 0 or fd >= len(self._fds):
            return None
        return <_FdEntry>self._fds[fd]

    cdef int _update(self, _FdEntry e) except -1:
        """Hand the entry's interest to the backend if it changed."""
        cdef int want = 0
        cdef FramedTransport s = e.stream
        if e.wake or e.reader is not None or (s is not None and _want_read(s)):
            want |= _READ
        if e.writer is not None or (s is not None and s._writing):
            want |= _WRITE
        if want != e.mask:
            if self._kind == _K_EPOLL:
                _ctl_epoll(self, e, want)
            elif self._kind == _K_POLL:
                _ctl_poll(self, e, want)
            else:
                _ctl_select(self, e, want)
            e.mask = want
            self.ctl_calls += 1
        if want == 0 and e.reader is None and e.writer is None and s is None and not e.wake:
            if e.fd < len(self._fds) and self._fds[e.fd] is e:
                self._fds[e.fd] = None
        return 0

    cdef int _check_open(self) except -1:
        if self._closed:
            raise _closed_error()
        return 0

    # -- readiness API ----------------------------------------------------

    def add_reader(self, fd, callback, *args):
        """Call ``callback(*args)`` whenever fd is readable (replaces a previous reader)."""
        cdef int f = _fd_of(fd)
        cdef _FdEntry e
        self._check_open()
        if not callable(callback):
            raise TypeError("callback must be callable")
        e = self._entry(f)
        if e.stream is not None or e.wake:
            raise ValueError(f"descriptor {f} is owned by a transport of this loop")
        e.reader = _new_handle(callback, args)
        self._update(e)

    def add_writer(self, fd, callback, *args):
        """Call ``callback(*args)`` whenever fd is writable (replaces a previous writer)."""
        cdef int f = _fd_of(fd)
        cdef _FdEntry e
        self._check_open()
        if not callable(callback):
            raise TypeError("callback must be callable")
        e = self._entry(f)
        if e.stream is not None or e.wake:
            raise ValueError(f"descriptor {f} is owned by a transport of this loop")
        e.writer = _new_handle(callback, args)
        self._update(e)

    def remove_reader(self, fd):
        """Stop watching fd for reading; True if it was watched."""
        cdef _FdEntry e
        if self._closed:
            return False
        e = self._lookup(_fd_of(fd))
        if e is None or e.reader is None:
            return False
        e.reader = None
        self._update(e)
        return True

    def remove_writer(self, fd):
        """Stop watching fd for writing; True if it was watched."""
        cdef _FdEntry e
        if self._closed:
            return False
        e = self._lookup(_fd_of(fd))
        if e is None or e.writer is None:
            return False
        e.writer = None
        self._update(e)
        return True

    def interest(self, fd):
        """The events registered for fd now: a subset of {"read", "write"}."""
        cdef _FdEntry e = self._lookup(_fd_of(fd))
        out = set()
        if e is not None:
            if e.mask & _READ:
                out.add("read")
            if e.mask & _WRITE:
                out.add("write")
        return out

    @property
    def registered(self):
        """Number of descriptors the backend watches now (the wake-up one included)."""
        cdef Py_ssize_t n = 0
        for obj in self._fds:
            if obj is not None and (<_FdEntry>obj).mask:
                n += 1
        return n

    # -- time and callbacks ---------------------------------------------------

    def time(self):
        """The reactor's clock: monotonic seconds (time.monotonic())."""
        return _now()

    def call_soon(self, callback, *args):
        """Run ``callback(*args)`` on the next iteration, in call order; returns a Handle."""
        cdef Handle h
        self._check_open()
        if not callable(callback):
            raise TypeError("callback must be callable")
        h = _new_handle(callback, args)
        self._ready.append(h)
        return h

    def call_soon_threadsafe(self, callback, *args):
        """call_soon from any thread: queues the callback and wakes the reactor."""
        cdef Handle h
        if not callable(callback):
            raise TypeError("callback must be callable")
        h = _new_handle(callback, args)
        if self._closed:
            raise _closed_error()
        self._ready.append(h)
        _wakeup(self)
        return h

    def call_later(self, double delay, callback, *args):
        """Run ``callback(*args)`` after delay seconds; returns a cancellable TimerHandle."""
        return self._call_at(_now() + delay, callback, args)

    def call_at(self, double when, callback, *args):
        """Run ``callback(*args)`` at ``when`` on the reactor's clock (see time())."""
        return self._call_at(when, callback, args)

    cdef TimerHandle _call_at(self, double when, callback, tuple args):
        cdef TimerHandle t
        self._check_open()
        if not callable(callback):
            raise TypeError("callback must be callable")
        t = TimerHandle.__new__(TimerHandle)
        t._callback = callback
        t._args = args
        t._when = when
        t._seq = self._seq
        self._seq += 1
        t._scheduled = True
        t._loop = self
        _heap_push(self, t)
        return t

    @property
    def timers(self):
        """Number of timers scheduled and not cancelled."""
        return len(self._heap) - self._timer_cancelled

    # -- running ------------------------------------------------------------

    def is_running(self):
        return self._running

    def is_closed(self):
        return self._closed

    def stop(self):
        """Return from run_forever/run_until after the current iteration (any thread)."""
        self._stopping = True
        if not self._closed:
            _wakeup(self)

    cdef int _enter(self) except -1:
        self._check_open()
        if self._running:
            raise RuntimeError("the event loop is already running")
        self._running = True
        return 0

    def run_forever(self):
        """Dispatch events, timers and callbacks until stop() is called."""
        self._enter()
        try:
            while True:
                self._run_once(-1.0)
                if self._stopping:
                    break
        finally:
            self._stopping = False
            self._running = False

    def run_until(self, predicate=None, timeout=None, interval=0.05):
        """Run until ``predicate()`` is true or ``timeout`` seconds pass.

        ``run_until(5.0)`` runs for five seconds. The predicate is checked
        after every iteration and at least every ``interval`` seconds, so it
        may watch things the loop does not (a thread, a child process).
        Returns True if the predicate became true (or, without one, if
        stop() was called) and False if the timeout passed first.
        """
        cdef double deadline = -1.0, left = -1.0, wait, step
        if predicate is not None and not callable(predicate):
            if timeout is not None:
                raise TypeError("predicate must be callable")
            timeout, predicate = predicate, None
        if timeout is not None:
            deadline = _now() + max(float(timeout), 0.0)
        step = -1.0 if predicate is None or interval is None else max(float(interval), 0.0)
        self._enter()
        try:
            while True:
                if predicate is not None and predicate():
                    return True
                if self._stopping:
                    return predicate is None
                wait = step
                if deadline >= 0:
                    left = deadline - _now()
                    if left <= 0:
                        return False
                    if wait < 0 or left < wait:
                        wait = left
                self._run_once(wait)
        finally:
            self._stopping = False
            self._running = False

    def run_once(self, timeout=None):
        """One iteration: wait up to timeout (None: until something happens), dispatch."""
        self._enter()
        try:
            self._run_once(-1.0 if timeout is None else max(float(timeout), 0.0))
        finally:
            self._running = False

    cdef int _run_once(self, double max_timeout) except -1:
        cdef double timeout, now, when
        cdef TimerHandle t
        cdef Handle h
        cdef Py_ssize_t ntodo, i
        cdef list heap
        self.iterations += 1
        if self._timer_cancelled > 64 and 2 * self._timer_cancelled > len(self._heap):
            _compact_timers(self)
        heap = self._heap
        while heap and (<TimerHandle>heap[0])._cancelled:
            _heap_pop(self)
            self._timer_cancelled -= 1
            heap = self._heap
        if self._ready or self._stopping:
            timeout = 0.0
        elif heap:
            timeout = (<TimerHandle>heap[0])._when - _now()
            if timeout < 0:
                timeout = 0.0
            if max_timeout >= 0 and max_timeout < timeout:
                timeout = max_timeout
        else:
            timeout = max_timeout
        _poll(self, timeout)
        heap = self._heap
        if heap:
            now = _now()
            while heap:
                t = <TimerHandle>heap[0]
                if t._cancelled:
                    _heap_pop(self)
                    self._timer_cancelled -= 1
                elif t._when <= now:
                    _heap_pop(self)
                    self._ready.append(t)
                else:
                    break
                heap = self._heap
        ntodo = len(self._ready)
        for i in range(ntodo):
            h = <Handle>self._ready.popleft()
            if not h._cancelled:
                self._run_handle(h)
        return 0

    cdef int _run_handle(self, Handle h) except -1:
        try:
            h._callback(*h._args)
        except Exception as exc:
            self._report(exc, "exception in callback", h)
        return 0

    cdef int _report(self, exc, str message, obj) except -1:
        try:
            self.call_exception_handler({"message": message, "exception": exc, "object": obj})
        except Exception:
            traceback.print_exc()
        return 0

    def call_exception_handler(self, context):
        """Report an exception a callback raised (the loop logs; this prints)."""
        exc = context.get("exception")
        print(f"fastnet reactor: {context.get('message')} ({context.get('object')!r})", file=sys.stderr)
        if exc is not None:
            traceback.print_exception(type(exc), exc, exc.__traceback__)

    cdef int _dispatch(self, int fd, int m) except -1:
        cdef _FdEntry e = self._lookup(fd)
        cdef FramedTransport s
        cdef Handle h
        if e is None:
            return 0
        s = e.stream
        if s is not None:
            try:
                if m & _READ and _want_read(s):
                    s._read_ready(m & _HUP)
                if m & _WRITE and s._writing and not s._closed:
                    s._write_ready()
            except Exception as exc:
                self._report(exc, "exception in transport", s)
                s._finalize(exc)
            return 0
        if e.wake:
            _drain_wake(self)
            return 0
        if m & _READ:
            h = e.reader
            if h is not None:
                self._run_handle(h)
        if m & _WRITE:
            h = e.writer
            if h is not None:
                self._run_handle(h)
        return 0

    # -- streams ------------------------------------------------------------

    def add_stream(self, sock, protocol, max_message_size=None, high_water=None, low_water=None):
        """Run a framed ``protocol`` on a connected stream socket; returns its FramedTransport.

        The transport owns the socket from here on (it is made non-blocking
        and closed with the transport). ``protocol.message_received(bytes)``
        is called per frame; ``connection_made(transport)``,
        ``connection_lost(exc)``, ``pause_writing()`` and ``resume_writing()``
        are called when the protocol has them.
        """
        cdef FramedTransport t
        cdef _FdEntry e
        cdef int fd
        self._check_open()
        on_message = protocol.message_received
        sock.setblocking(False)
        fd = _fd_of(sock)
        e = self._entry(fd)
        if e.reader is not None or e.writer is not None or e.stream is not None or e.wake:
            raise ValueError(f"descriptor {fd} is already watched by this loop")
        t = FramedTransport.__new__(FramedTransport)
        t._setup(self, sock, fd, protocol, max_message_size, high_water, low_water)
        t._on_message = on_message
        t._wq = []
        t._entry = e
        e.stream = t
        self._streams.add(t)
        made = getattr(protocol, "connection_made", None)
        if made is not None:
            try:
                made(t)
            except Exception as exc:
                self._report(exc, "exception in connection_made", t)
                t._finalize(exc)
                return t
        if not t._closed:
            self._update(e)
        return t

    @property
    def transports(self):
        """The open transports of this reactor (a new list)."""
        return list(self._streams)

    def close(self):
        """Abort every transport, drop callbacks and timers, release the backend."""
        cdef FramedTransport t
        if self._running:
            raise RuntimeError("cannot close a running event loop")
        if self._closed:
            return
        for obj in list(self._streams):
            t = <FramedTransport>obj
            t._finalize(None)
        # the transports' connection_lost callbacks are the last to run
        ntodo = len(self._ready)
        for i in range(ntodo):
            h = <Handle>self._ready.popleft()
            if not h._cancelled and isinstance(h._callback, _LostCall):
                self._run_handle(h)
        self._closed = True
        self._ready.clear()
        for obj in self._heap:
            (<TimerHandle>obj)._scheduled = False
            (<TimerHandle>obj)._loop = None
        self._heap = []
        self._fds = []
        if self._epfd >= 0:
            c_close(self._epfd)
            self._epfd = -1
        if self._wake_socks is not None:
            for s in self._wake_socks:
                s.close()
            self._wake_socks = None
        elif self._wake_r >= 0:
            c_close(self._wake_r)
        self._wake_r = self._wake_w = -1
        self._npfds = 0
        self._maxfd = -1

    def __repr__(self):
        state = "closed" if self._closed else ("running" if self._running else "idle")
        return f"<{type(self).__name__} backend={self.backend} {state}>"
