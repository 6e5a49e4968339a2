# The readiness backends (epoll, poll, select) and the wake-up descriptor:
# handing interest to the kernel and collecting what became ready. Plain C
# functions on the Reactor, called from reactor_loop.pxi (included by reactor.pyx).

cdef int _open_wake(Reactor self) except -1:
    cdef _FdEntry e
    fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
    if fd >= 0:
        self._wake_r = self._wake_w = fd
        self._wake_is_eventfd = True
    else:
        a, b = _socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        self._wake_socks = (a, b)
        self._wake_r = a.fileno()
        self._wake_w = b.fileno()
    e = self._entry(self._wake_r)
    e.wake = True
    self._update(e)
    return 0


cdef int _drain_wake(Reactor self) except -1:
    cdef uint64_t v
    cdef char buf[256]
    if self._wake_is_eventfd:
        c_read(self._wake_r, &v, 8)
    else:
        while c_read(self._wake_r, buf, 256) > 0:
            pass
    self._woken = False
    return 0


cdef int _wakeup(Reactor self) except -1:
    # Called with the GIL held and never releasing it between the check
    # and the write, so close() cannot slip in and free the descriptor.
    cdef uint64_t one = 1
    if self._closed:
        raise _closed_error()
    if not self._woken:
        self._woken = True
        if self._wake_is_eventfd:
            c_write(self._wake_w, &one, 8)
        else:
            c_write(self._wake_w, b"x", 1)
    return 0


cdef int _ctl_epoll(Reactor self, _FdEntry e, int want) except -1:
    cdef epoll_event ev
    cdef int op, rc
    ev.events = 0
    if want & _READ:
        ev.events |= EPOLLIN
    if want & _WRITE:
        ev.events |= EPOLLOUT
    if e.stream is not None:
        ev.events |= EPOLLET | EPOLLRDHUP
    ev.data.u64 = 0
    ev.data.fd = e.fd
    if e.mask == 0:
        op = EPOLL_CTL_ADD
    elif want == 0:
        op = EPOLL_CTL_DEL
    else:
        op = EPOLL_CTL_MOD
    rc = epoll_ctl(self._epfd, op, e.fd, &ev)
    if rc < 0:
        if op == EPOLL_CTL_DEL and (errno == ENOENT or errno == EBADF):
            return 0    # closed behind our back: the kernel dropped it already
        if op == EPOLL_CTL_ADD and errno == EEXIST:
            rc = epoll_ctl(self._epfd, EPOLL_CTL_MOD, e.fd, &ev)
        elif op == EPOLL_CTL_MOD and errno == ENOENT:
            rc = epoll_ctl(self._epfd, EPOLL_CTL_ADD, e.fd, &ev)
        if rc < 0:
            PyErr_SetFromErrno(OSError)
            return -1
    return 0


cdef int _ctl_poll(Reactor self, _FdEntry e, int want) except -1:
    cdef short ev = 0
    cdef pollfd* np
    cdef Py_ssize_t last
    cdef _FdEntry moved
    if want & _READ:
        ev |= POLLIN
    if want & _WRITE:
        ev |= POLLOUT
    if e.mask == 0:
        if self._npfds == self._pcap:
            np = <pollfd*>PyMem_Realloc(self._pfds, 2 * self._pcap * sizeof(pollfd))
            if np == NULL:
                raise MemoryError()
            self._pfds = np
            self._pcap *= 2
        e.pidx = self._npfds
        self._pfds[e.pidx].fd = e.fd
        self._pfds[e.pidx].events = ev
        self._pfds[e.pidx].revents = 0
        self._npfds += 1
        if self._npfds > self._rcap:
            _grow_ready(self, self._pcap)
    elif want == 0:
        last = self._npfds - 1
        if e.pidx != last:
            self._pfds[e.pidx] = self._pfds[last]
            moved = self._lookup(self._pfds[e.pidx].fd)
            if moved is not None:
                moved.pidx = e.pidx
        self._npfds -= 1
        e.pidx = -1
    else:
        self._pfds[e.pidx].events = ev
    return 0


cdef int _grow_ready(Reactor self, Py_ssize_t cap) except -1:
    cdef int* a = <int*>PyMem_Realloc(self._rfd, cap * sizeof(int))
    if a == NULL:
        raise MemoryError()
    self._rfd = a
    a = <int*>PyMem_Realloc(self._rmask, cap * sizeof(int))
    if a == NULL:
        raise MemoryError()
    self._rmask = a
    self._rcap = cap
    return 0


cdef int _ctl_select(Reactor self, _FdEntry e, int want) except -1:
    if want & _READ:
        FD_SET(e.fd, &self._rset)
    else:
        FD_CLR(e.fd, &self._rset)
    if want & _WRITE:
        FD_SET(e.fd, &self._wset)
    else:
        FD_CLR(e.fd, &self._wset)
    if want and e.fd > self._maxfd:
        self._maxfd = e.fd
    elif not want and e.fd == self._maxfd:
        while self._maxfd >= 0 and not (FD_ISSET(self._maxfd, &self._rset) or
                                        FD_ISSET(self._maxfd, &self._wset)):
            self._maxfd -= 1
    return 0


cdef inline int _ms(double timeout) noexcept nogil:
    """A wait in seconds (< 0: forever) as epoll's and poll's milliseconds, rounded up."""
    if timeout < 0:
        return -1
    if timeout == 0:
        return 0
    if timeout > 86400.0:
        return 86400000
    return <int>ceil(timeout * 1000.0)


cdef int _spin(Reactor self, double* timeout, fd_set* r, fd_set* w) noexcept:
    """Busy-poll before a wait that would block (``spin``).

    Polls the backend with a zero timeout, the GIL released, until something
    is ready or min(spin, *timeout) has passed (*timeout < 0: forever, so the
    spin's whole budget). Returns what the last poll returned: its events
    are where the backend's blocking call would have left them (select's in
    r and w). With nothing ready, *timeout becomes what is left of the wait,
    so a timer never fires late for the spin nor early for the wait after it.
    """
    cdef double start = _now(), now = start, budget = self._spin_s, until
    cdef int n, kind = self._kind, epfd = self._epfd, nevents = self._nevents
    cdef int nfds = self._maxfd + 1
    cdef epoll_event* events = self._events
    cdef pollfd* pfds = self._pfds
    cdef unsigned long npfds = <unsigned long>self._npfds
    cdef fd_set* rset = &self._rset
    cdef fd_set* wset = &self._wset
    cdef timeval tv
    if 0 <= timeout[0] < budget:
        budget = timeout[0]
    until = start + budget
    with nogil:
        while True:
            if kind == _K_EPOLL:
                n = _sys_epoll_wait(epfd, events, nevents, 0)
            elif kind == _K_POLL:
                n = poll(pfds, npfds, 0)
            else:
                r[0] = rset[0]
                w[0] = wset[0]
                tv.tv_sec = 0
                tv.tv_usec = 0
                n = select(nfds, r, w, NULL, &tv)
            if n != 0:
                break
            sched_yield()       # as _spin_on: a peer sharing this CPU answers first
            now = _now()
            if now >= until:
                break
    if n == 0 and timeout[0] > 0:
        timeout[0] = start + timeout[0] - now
        if timeout[0] < 0:
            timeout[0] = 0.0
    return n


cdef int _poll(Reactor self, double timeout) except -1:
    cdef int ms = _ms(timeout), n, i, fd, m
    cdef uint32_t ev
    cdef epoll_event* np
    if self._kind == _K_EPOLL:
        # A zero timeout (callbacks are ready) returns at once: keep the GIL
        # rather than pay for releasing it around a call that cannot block.
        if ms == 0:
            n = _sys_epoll_wait(self._epfd, self._events, self._nevents, 0)
        else:
            n = 0
            if self._spin_s > 0.0:
                n = _spin(self, &timeout, NULL, NULL)
                ms = _ms(timeout)
            if n == 0:
                with nogil:
                    n = _sys_epoll_wait(self._epfd, self._events, self._nevents, ms)
        if n < 0:
            if errno == EINTR:
                PyErr_CheckSignals()
                return 0
            PyErr_SetFromErrno(OSError)
            return -1
        for i in range(n):
            ev = self._events[i].events
            m = 0
            if ev & (EPOLLIN | EPOLLERR | EPOLLHUP):
                m = _READ
            if ev & (EPOLLOUT | EPOLLERR | EPOLLHUP):
                m |= _WRITE
            if ev & (EPOLLRDHUP | EPOLLERR | EPOLLHUP):
                m |= _HUP
            self._dispatch(self._events[i].data.fd, m)
        if n == self._nevents and self._nevents < _MAX_EVENTS:
            np = <epoll_event*>PyMem_Realloc(self._events, 2 * self._nevents * sizeof(epoll_event))
            if np != NULL:
                self._events = np
                self._nevents *= 2
        return 0
    if self._kind == _K_POLL:
        n = _poll_poll(self, timeout, ms)
    else:
        n = _poll_select(self, timeout)
    for i in range(n):
        self._dispatch(self._rfd[i], self._rmask[i])
    return 0


cdef int _poll_poll(Reactor self, double timeout, int ms) except -1:
    cdef int n, i, k = 0, m
    cdef short rev
    if ms == 0:
        n = poll(self._pfds, self._npfds, 0)
    else:
        n = 0
        if self._spin_s > 0.0:
            n = _spin(self, &timeout, NULL, NULL)
            ms = _ms(timeout)
        if n == 0:
            with nogil:
                n = poll(self._pfds, self._npfds, ms)
    if n < 0:
        if errno == EINTR:
            PyErr_CheckSignals()
            return 0
        PyErr_SetFromErrno(OSError)
        return -1
    i = 0
    while k < n and i < self._npfds:
        rev = self._pfds[i].revents
        if rev:
            m = 0
            if rev & (POLLIN | POLLERR | POLLHUP | POLLNVAL):
                m = _READ
            if rev & (POLLOUT | POLLERR | POLLHUP | POLLNVAL):
                m |= _WRITE
            self._rfd[k] = self._pfds[i].fd
            self._rmask[k] = m
            k += 1
        i += 1
    return k


cdef int _poll_select(Reactor self, double timeout) except -1:
    cdef fd_set r, w
    cdef timeval tv
    cdef timeval* tvp = NULL
    cdef int n, nfds = self._maxfd + 1
    if self._spin_s > 0.0 and timeout != 0:
        n = _spin(self, &timeout, &r, &w)
        if n != 0:
            return _select_ready(self, n, nfds, &r, &w)
    r = self._rset
    w = self._wset
    if timeout >= 0:
        if timeout > 86400.0:
            timeout = 86400.0
        tv.tv_sec = <long>timeout
        tv.tv_usec = <long>((timeout - tv.tv_sec) * 1e6) + 1
        if timeout == 0:
            tv.tv_usec = 0
        if tv.tv_usec >= 1000000:
            tv.tv_sec += 1
            tv.tv_usec -= 1000000
        tvp = &tv
    if timeout == 0:
        n = select(nfds, &r, &w, NULL, tvp)
    else:
        with nogil:
            n = select(nfds, &r, &w, NULL, tvp)
    return _select_ready(self, n, nfds, &r, &w)


cdef int _select_ready(Reactor self, int n, int nfds, fd_set* r, fd_set* w) except -1:
    """Collect select()'s result (n, the sets it left) into _rfd/_rmask; returns how many."""
    cdef int fd = 0, k = 0, m
    if n < 0:
        if errno == EINTR:
            PyErr_CheckSignals()
            return 0
        PyErr_SetFromErrno(OSError)
        return -1
    while k < n and fd < nfds:
        m = 0
        if FD_ISSET(fd, r):
            m = _READ
        if FD_ISSET(fd, w):
            m |= _WRITE
        if m:
            self._rfd[k] = fd
            self._rmask[k] = m
            k += 1
        fd += 1
    return k
