"""Same-host arrays through shared memory (AF_UNIX connections, Linux).

Over AF_UNIX the socket itself is the copy: every byte of an array crosses
the kernel twice. With ``send_array(arr, shm=True)`` (or ``shm=True`` on the
connection, for arrays of at least :data:`THRESHOLD` bytes) the sender copies
the array once into a ``memfd`` segment and passes the segment's descriptor
on the connection; ``recv_array()`` maps it and returns an array over the
mapping, ``recv_array(out=)`` copies it into ``out``. Opt-in, never automatic:
a stdlib peer reading the header frame would get the descriptor dropped by
its kernel and bytes it cannot use.

Wire: one ordinary frame, the array header of :mod:`fastnet.zerocopy` with
version 2 (``fastnet.zerocopy.SHM_VERSION``; a fastnet peer that predates it
refuses the header as an unsupported version and closes that connection), the
segment's descriptor riding on it as SCM_RIGHTS. There is no payload frame.
Over TCP or TLS the same call sends the ordinary two frames.

Ownership: a segment belongs to the receiver from the moment it is sent until
every mapping of it there is gone (the arrays over it collected, or the
process dead). The sender passes each segment as a fresh open file
description holding a shared ``flock``; the lock lives as long as that
description, that is while the message is in flight, while the receiver
holds the descriptor and while any of its mappings exists. The sender's pool
reuses a segment (its pages already faulted in) only once an exclusive
``flock`` on its own description succeeds: never while the receiver can still
see it. Segments are nameless (``memfd_create``, close-on-exec): nothing is
left in ``/dev/shm`` whichever side is killed, and the memory goes back to
the system with the last mapping.

The receiver accepts a descriptor only if it is a memfd sealed against
shrinking (so a mapping can never fault with SIGBUS), at least as large as
the array, and the array within ``max_message_size``; anything else raises
ProtocolError or MessageTooLarge, closes the descriptor and that connection.
A received array keeps no descriptor open, so a process may hold any number
of them: the segment is mapped through libc with ctypes (without numpy or
ctypes, through ``mmap.mmap``, which before Python 3.13 keeps one descriptor
open per array until it is collected). When the last array over a mapping
of at least :data:`UNMAP_IN_BACKGROUND` bytes is collected, a thread of the
module unmaps it, so the thread that dropped the array (a Dask worker's
event loop) does not wait while the kernel tears down its page tables; the
segment goes back to its sender a moment later.

No copy at all: an array made by :func:`empty` lives in a segment from the
start, and sending it (``shm=True``) passes that segment as it is. The two
processes then share the memory: what the sender writes into the array after
sending, the receiver sees. Write the next message into a new :func:`empty`
array (the pool hands back segments no receiver holds), or only once the
receiver has said it is done. The segment returns to the pool when the
sender's array and every view of it are collected.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import queue
import stat
import sys
import threading
import weakref
from typing import Any

from fastnet import zerocopy as _zc
from fastnet.errors import MessageTooLarge, ProtocolError

__all__ = ["THRESHOLD", "POOL_BYTES", "UNMAP_IN_BACKGROUND", "available", "empty", "SegmentPool", "pool", "pack", "map_segment"]

#: With ``shm=True`` on a connection, arrays of at least this many bytes go
#: through shared memory (below it, mapping a segment costs more than the
#: socket's two copies).
THRESHOLD = 1 << 20
#: Bytes of segments the sender's pool keeps mapped for reuse.
POOL_BYTES = 1 << 30
#: Received mappings of at least this many bytes are unmapped on a thread of
#: this module once their last array is collected (unmapping 256 MiB takes
#: about 7 ms of the caller's time otherwise; below a few MiB, less than the
#: handoff).
UNMAP_IN_BACKGROUND = 16 << 20

# Linux names; elsewhere available() is False and nothing here runs
_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0)
_SEALS = _SEAL_SHRINK | getattr(fcntl, "F_SEAL_GROW", 0) | getattr(fcntl, "F_SEAL_SEAL", 0)
_PAGE = mmap.PAGESIZE
# Python's mmap dups the descriptor unless told not to (3.13+)
_MMAP_KW: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}


def available() -> bool:
    """True where segments can be made (Linux ``memfd_create`` with sealing)."""
    return hasattr(os, "memfd_create") and hasattr(os, "MFD_ALLOW_SEALING") and hasattr(fcntl, "F_ADD_SEALS")


class _Segment:
    __slots__ = ("fd", "size", "map", "lockable")

    def __init__(self, size: int) -> None:
        fd = os.memfd_create("fastnet-shm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, **_MMAP_KW)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.size = size
        self.lockable = True    # False once handed over without a lock: never reused

    def free(self) -> bool:
        """True if no receiver holds the segment (its handover lock is gone)."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        return True

    def handover(self) -> int:
        """A new open file description of the segment, holding a shared flock, for sending."""
        try:
            fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            # no /proc: the receiver gets our own description, and the pool
            # can never tell when it is done, so the segment is not reused
            self.lockable = False
            return os.dup(self.fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self) -> None:
        # a receiver's mapping keeps the memory alive on its own
        self.map.close()
        os.close(self.fd)


class SegmentPool:
    """The sender's segments, kept mapped so repeated transfers skip the page faults.

    ``acquire(n)`` returns a segment of at least ``n`` bytes (and at most
    about twice that) that no receiver holds, or a new one. At most
    ``max_bytes`` stay mapped; beyond, the least recently used are unmapped
    (a receiver's mapping of one is unaffected). Thread-safe; a forked child
    starts with an empty pool, never writing into its parent's segments.
    """

    def __init__(self, max_bytes: int = POOL_BYTES) -> None:
        self.max_bytes = max_bytes
        self._segs: list[_Segment] = []    # least recently used first
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> _Segment:
        """A segment of at least ``nbytes`` that no receiver holds, out of the pool."""
        want = max(_PAGE, -(-nbytes // _PAGE) * _PAGE)
        with self._lock:
            for i, seg in enumerate(self._segs):
                if want <= seg.size <= 2 * want and seg.free():
                    return self._segs.pop(i)
        return _Segment(want)

    def release(self, seg: _Segment) -> None:
        """Give a segment back after sending it (most recently used)."""
        if not seg.lockable:
            seg.close()
            return
        with self._lock:
            self._segs.append(seg)
            total = sum(s.size for s in self._segs)
            while total > self.max_bytes and len(self._segs) > 1:
                old = self._segs.pop(0)
                total -= old.size
                old.close()

    def clear(self) -> None:
        """Unmap every segment of the pool."""
        with self._lock:
            segs, self._segs = self._segs, []
        for s in segs:
            s.close()

    def _forget(self) -> None:
        # in a forked child: the mappings are the parent's; drop them unused
        self._segs = []
        self._lock = threading.Lock()

    @property
    def segments(self) -> int:
        """Segments the pool holds mapped."""
        return len(self._segs)

    def idle(self) -> int:
        """Segments of the pool no receiver holds."""
        with self._lock:
            return sum(1 for s in self._segs if s.free())


#: The process's pool, shared by its connections.
pool = SegmentPool()
os.register_at_fork(after_in_child=pool._forget)

# id(mapping) -> (segment, address) of the arrays empty() made, while they live
_lent: dict[int, tuple[_Segment, int]] = {}


def _give_back(key: int, seg: _Segment) -> None:
    _lent.pop(key, None)
    pool.release(seg)


def empty(shape: int | tuple[int, ...], dtype: Any = float, order: str = "C") -> Any:
    """A new numpy array in a shared-memory segment: ``send_array(arr, shm=True)`` sends it without a copy.

    The receiver maps the same memory (see the module docstring on sharing).
    """
    np = _zc._numpy()
    if np is None:
        raise ImportError("fastnet.shm.empty needs numpy")
    dt = np.dtype(dtype)
    shp = (shape,) if isinstance(shape, int) else tuple(shape)
    n = _zc.nbytes_of(shp, dt.itemsize)
    seg = pool.acquire(n)
    try:
        # a mapping of its own, so the segment goes back to the pool only
        # when no array views it any more
        mm = mmap.mmap(seg.fd, seg.size, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                       mmap.PROT_READ | mmap.PROT_WRITE, **_MMAP_KW)
    except BaseException:
        pool.release(seg)
        raise
    arr = np.ndarray(shp, dt, buffer=mm, order=order)
    key = id(mm)
    _lent[key] = (seg, arr.ctypes.data)
    weakref.finalize(mm, _give_back, key, seg)
    return arr


def _lent_segment(arr: Any) -> _Segment | None:
    """The segment an empty() array fills from its first byte, if ``arr`` is one."""
    base = getattr(arr, "base", None)
    if type(base) is not mmap.mmap:
        return None
    got = _lent.get(id(base))
    if got is None or got[0].map.closed:
        return None
    if not (arr.flags.c_contiguous or arr.flags.f_contiguous) or arr.ctypes.data != got[1]:
        return None
    return got[0]


def shm_header(header: bytes) -> bytes:
    """The shared-memory form of an array header made by ``zerocopy.encode_array``."""
    return header[:4] + bytes((_zc.SHM_VERSION,)) + header[5:]


def is_shm_header(header: bytes) -> bool:
    """True if an array header frame says its payload is in an attached segment."""
    return header[:4] == _zc.MAGIC and header[4:5] == bytes((_zc.SHM_VERSION,))


def send(ch: Any, arr: Any, header: bytes, payload: Any) -> None:
    """Send an encoded array on channel ``ch`` as one header frame carrying a segment."""
    lent = _lent_segment(arr)
    if lent is not None:
        # the array is in a segment already: hand it over as it is
        fd = lent.handover()
        try:
            ch.send_frame_fds(shm_header(header), [fd])
        finally:
            os.close(fd)
        return
    m = memoryview(payload)
    # a Fortran-ordered plain buffer has no flat byte view: its bytes in memory order
    src = m.cast("B") if m.c_contiguous else memoryview(m.tobytes("A"))
    try:
        seg = pack([src])
    finally:
        src.release()
    try:
        fd = seg.handover()
        try:
            ch.send_frame_fds(shm_header(header), [fd])
        finally:
            os.close(fd)
    finally:
        pool.release(seg)


def pack(buffers: list[Any]) -> _Segment:
    """A segment out of the pool holding the bytes of ``buffers`` (C-contiguous) one after another.

    Send ``seg.handover()`` (close that descriptor after sending), then
    ``pool.release(seg)``: the ownership protocol of the module docstring.
    """
    views = [memoryview(b).cast("B") for b in buffers]
    seg = pool.acquire(sum(v.nbytes for v in views))
    try:
        np = _zc._np
        off = 0
        for v in views:
            n = v.nbytes
            if np is not None and n:
                # numpy copies with the GIL released; a memoryview assignment holds it
                np.copyto(np.frombuffer(seg.map, np.uint8, n, off), np.frombuffer(v, np.uint8))
            else:
                seg.map[off:off + n] = v
            off += n
    except BaseException:
        pool.release(seg)
        raise
    finally:
        for v in views:
            v.release()
    return seg


def _check_segment(fd: int, nbytes: int) -> None:
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise ProtocolError("the descriptor sent with a shared-memory array is not a memfd segment") from None
    if not seals & _SEAL_SHRINK:
        raise ProtocolError("the shared-memory segment is not sealed against shrinking")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size < nbytes:
        raise ProtocolError(f"the shared-memory segment holds {st.st_size} bytes, the array needs {nbytes}")


def map_segment(fd: int, nbytes: int) -> Any:
    """A writeable mapping of the first ``nbytes`` of a received segment (an empty bytearray for 0).

    ProtocolError unless ``fd`` is a memfd sealed against shrinking and at
    least ``nbytes`` long. The caller still owns ``fd``; the mapping lives
    as long as the objects that view it.
    """
    _check_segment(fd, nbytes)
    if nbytes == 0:
        return bytearray()
    try:
        if _zc._np is None or _libc_map() is None:
            return mmap.mmap(fd, nbytes, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                             mmap.PROT_READ | mmap.PROT_WRITE, **_MMAP_KW)
        return _zc._np.asarray(_Mapping(fd, nbytes))
    except OSError as exc:
        raise ProtocolError(f"cannot map the shared-memory segment: {exc}") from None


_libc: Any = None


def _libc_map() -> Any:
    """libc's (mmap, munmap) through ctypes, or None where ctypes cannot reach them."""
    global _libc
    if _libc is None:
        try:
            import ctypes
            lib = ctypes.CDLL(None, use_errno=True)
            m, u = lib.mmap, lib.munmap
            m.restype = ctypes.c_void_p
            m.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
            u.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            _libc = (m, u, ctypes.get_errno, ctypes.c_void_p(-1).value)
        except (ImportError, OSError, AttributeError):
            _libc = False
    return _libc or None


class _Mapping:
    """A read-write shared mapping of a received segment that keeps no descriptor open.

    Before Python 3.13 an ``mmap.mmap`` holds a duplicate of its descriptor
    for as long as it lives, so a process keeping many received segments
    (a Dask worker's chunks) would run out of descriptors. numpy views this
    one through ``__array_interface__``; the memory is unmapped when the
    last array over it is collected (on the unmapping thread if it is large,
    unless ``unmap_inline()`` was called).
    """

    __slots__ = ("__array_interface__", "__weakref__", "_inline")

    def __init__(self, fd: int, nbytes: int) -> None:
        mmap_, munmap, get_errno, failed = _libc_map()
        addr = mmap_(None, nbytes, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), fd, 0)
        if addr is None or addr == failed:
            err = get_errno()
            raise OSError(err, os.strerror(err))
        self.__array_interface__ = {"data": (addr, False), "shape": (nbytes,), "typestr": "|u1", "version": 3}
        reaper = _reaper() if nbytes >= UNMAP_IN_BACKGROUND else None
        self._inline = [reaper is None]
        weakref.finalize(self, _unmap, addr, nbytes, self._inline, reaper).atexit = False

    def unmap_inline(self) -> None:
        """Unmap in the thread that drops the last array, not on the unmapping thread."""
        global _live
        if not self._inline[0]:
            self._inline[0] = True
            with _reaper_lock:
                _live -= 1


# The unmapping thread runs while mappings it is to unmap are alive (_live
# counts them), and ends after _REAPER_IDLE seconds without any: a process
# that stops receiving large segments keeps no thread (distributed's test
# fixtures, among others, count threads left behind).
_reaped: queue.SimpleQueue[tuple[int, int]] | None = None
_live = 0
_reaper_lock = threading.Lock()
_REAPER_IDLE = 0.5


def _unmap(addr: int, nbytes: int, inline: list[bool], reaper: queue.SimpleQueue[tuple[int, int]] | None) -> None:
    # a finalizer: it may run in any thread, in the middle of anything, so
    # it takes no lock; it only unmaps or puts on the queue (SimpleQueue.put
    # is safe there). The thread cannot have ended while this mapping lived,
    # unless the process forked since: then the queue is another one's.
    if inline[0] or reaper is None or reaper is not _reaped:
        _libc[1](addr, nbytes)
    else:
        reaper.put((addr, nbytes))


def _reaper() -> queue.SimpleQueue[tuple[int, int]]:
    """Count one more mapping for the unmapping thread; its queue, the thread started if need be."""
    global _reaped, _live
    with _reaper_lock:
        _live += 1
        if _reaped is None:
            q: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
            threading.Thread(target=_reap, args=(q,), name="fastnet-shm-unmap", daemon=True).start()
            _reaped = q
        return _reaped


def _reap(q: queue.SimpleQueue[tuple[int, int]]) -> None:
    global _reaped, _live
    munmap = _libc[1]
    while True:
        try:
            addr, nbytes = q.get(timeout=_REAPER_IDLE)
        except queue.Empty:
            with _reaper_lock:
                if _live == 0:
                    _reaped = None
                    return
            continue
        munmap(addr, nbytes)     # ctypes releases the GIL for the call
        with _reaper_lock:
            _live -= 1


def _reaper_after_fork() -> None:
    # the thread did not come along: unmap here what was left for it; the
    # mappings inherited alive unmap inline (their queue is not _reaped)
    global _reaped, _live
    q, _reaped, _live = _reaped, None, 0
    while q is not None and not q.empty():
        _libc[1](*q.get_nowait())


os.register_at_fork(after_in_child=_reaper_after_fork)


def _is_mapping(obj: Any) -> bool:
    """True if ``obj`` (an array, a memoryview, or what they view) is over a mapped segment."""
    while True:
        if isinstance(obj, (mmap.mmap, _Mapping)):
            return True
        if isinstance(obj, memoryview):
            obj = obj.obj
        elif getattr(obj, "base", None) is not None:
            obj = obj.base
        else:
            return False


def receive(header: bytes, fds: list[int], out: Any, max_size: int | None) -> Any:
    """Map the segment of a shared-memory array header; return an array over it, or copy it into ``out``.

    Takes ownership of ``fds`` (closed whatever happens).
    """
    try:
        if len(fds) != 1:
            raise ProtocolError(f"a shared-memory array header came with {len(fds)} descriptors, not 1")
        kind, tname, shape, order = _zc.decode_array_header(header, version=_zc.SHM_VERSION)
        nbytes = _zc.nbytes_of(shape, _zc.itemsize_of(kind, tname))
        if max_size is not None and nbytes > max_size:
            raise MessageTooLarge(f"array of {nbytes} bytes exceeds max_message_size={max_size}")
        mm = map_segment(fds[0], nbytes)
    finally:
        for fd in fds:
            os.close(fd)
    np = _zc._np
    if np is not None:
        arr = np.ndarray(shape, _zc.dtype_of(kind, tname), buffer=mm, order=order)
    else:
        arr = memoryview(mm).cast("B").cast(tname, shape) if shape else memoryview(mm)  # type: ignore[call-overload]
    if out is None:
        # the mapping lives as long as the arrays that view it
        return arr
    try:
        return _copy_into(out, arr, kind, tname, shape)
    finally:
        del arr
        # the segment goes back to its sender now, not a moment later
        if isinstance(mm, mmap.mmap):
            mm.close()
        elif isinstance(getattr(mm, "base", None), _Mapping):
            mm.base.unmap_inline()
        del mm


def _copy_into(out: Any, arr: Any, kind: int, tname: str, shape: tuple[int, ...]) -> Any:
    np = _zc._np
    if np is not None and isinstance(out, np.ndarray):
        if out.shape != tuple(shape) or out.dtype != arr.dtype:
            raise ValueError(f"out is {out.dtype}{list(out.shape)}, message is {arr.dtype}{list(shape)}")
        if not out.flags.writeable:
            raise ValueError("out is read-only")
        np.copyto(out, arr)
        return out
    m = memoryview(out)
    src = memoryview(arr)
    if m.nbytes != src.nbytes or (kind == 1 and m.format != tname) or tuple(m.shape) != tuple(shape):  # type: ignore[arg-type]
        raise ValueError(f"out does not match the message ({tname}{list(shape)})")
    m.cast("B")[:] = src.cast("B")
    return out
