# Callbacks on the ready queue (handles, the deferred connection_lost call) and
# the per-descriptor table entry (included by reactor.pyx).

@cython.freelist(256)
cdef class Handle:
    """A callback scheduled on a reactor; ``cancel()`` keeps it from running."""

    def __init__(self, callback, args=()):
        self._callback = callback
        self._args = tuple(args)

    def cancel(self):
        """Do not run the callback (a no-op once it ran)."""
        if not self._cancelled:
            self._cancelled = True
            self._callback = None
            self._args = None

    def cancelled(self):
        return self._cancelled

    @property
    def callback(self):
        return self._callback

    @property
    def args(self):
        return self._args

    def __repr__(self):
        state = " cancelled" if self._cancelled else ""
        return f"<{type(self).__name__} {self._callback!r}{state}>"


cdef inline Handle _new_handle(callback, tuple args):
    cdef Handle h = Handle.__new__(Handle)
    h._callback = callback
    h._args = args
    return h


@cython.final
cdef class _FdEntry:
    """A watched descriptor: its reader and writer or its stream, and the backend's interest."""


cdef class _LostCall:
    """Calls protocol.connection_lost(exc) once, then forgets the protocol."""

    def __call__(self):
        p = self.protocol
        exc = self.exc
        self.protocol = None
        self.exc = None
        lost = getattr(p, "connection_lost", None)
        if lost is not None:
            lost(exc)
