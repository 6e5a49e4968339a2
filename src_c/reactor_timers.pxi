# Timers: TimerHandle and the reactor's binary heap, ordered by (when, seq) so
# timers due at the same instant run in the order they were scheduled.
# A cancelled timer stays in the heap until it surfaces, or until more than
# 64 and over half of the heap are cancelled and _compact_timers rebuilds it
# (included by reactor.pyx).

cdef class TimerHandle(Handle):
    """A callback scheduled for a point on the reactor's monotonic clock."""

    def __init__(self, *a):
        raise TypeError("TimerHandle is created by call_later/call_at")

    def when(self):
        """The monotonic time the callback is due."""
        return self._when

    def cancel(self):
        if not self._cancelled and self._scheduled and self._loop is not None:
            self._loop._timer_cancelled += 1
        Handle.cancel(self)


cdef inline bint _tlt(TimerHandle a, TimerHandle b) noexcept:
    return a._when < b._when or (a._when == b._when and a._seq < b._seq)


cdef int _heap_push(Reactor self, TimerHandle t) except -1:
    cdef list heap = self._heap
    cdef Py_ssize_t i, parent
    cdef TimerHandle p
    heap.append(t)
    i = len(heap) - 1
    while i > 0:
        parent = (i - 1) >> 1
        p = <TimerHandle>heap[parent]
        if not _tlt(t, p):
            break
        heap[i] = p
        i = parent
    heap[i] = t
    return 0


cdef int _sift_down(Reactor self, Py_ssize_t i) except -1:
    cdef list heap = self._heap
    cdef Py_ssize_t n = len(heap), c
    cdef TimerHandle t = <TimerHandle>heap[i]
    cdef TimerHandle ch
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and _tlt(<TimerHandle>heap[c + 1], <TimerHandle>heap[c]):
            c += 1
        ch = <TimerHandle>heap[c]
        if not _tlt(ch, t):
            break
        heap[i] = ch
        i = c
    heap[i] = t
    return 0


cdef TimerHandle _heap_pop(Reactor self):
    cdef list heap = self._heap
    cdef TimerHandle top = <TimerHandle>heap[0]
    last = heap.pop()
    if heap:
        heap[0] = last
        _sift_down(self, 0)
    top._scheduled = False
    top._loop = None
    return top


cdef int _compact_timers(Reactor self) except -1:
    cdef list keep = []
    cdef TimerHandle t
    cdef Py_ssize_t i
    for obj in self._heap:
        t = <TimerHandle>obj
        if t._cancelled:
            t._scheduled = False
            t._loop = None
        else:
            keep.append(t)
    self._heap = keep
    self._timer_cancelled = 0
    i = len(keep) // 2 - 1
    while i >= 0:
        _sift_down(self, i)
        i -= 1
    return 0
