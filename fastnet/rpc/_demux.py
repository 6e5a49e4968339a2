"""The proxy's reply demultiplexer: calls pending by message id, and whoever reads their replies.

Replies come back on the one connection in any order and are matched to
their calls by message id. There is no dedicated reading thread on the
fast path: the calling thread that finds the reader lock free takes it
(without blocking) and reads, handing every reply it meets to its slot;
the others wait on the condition until their slot is filled or the reader
lock is free for them. Futures nobody waits on (callbacks,
``concurrent.futures.wait``) are completed by one reader thread, which
takes over only when replies have stalled with nobody reading.

Two locks:

- ``lock``/``cv``: one lock shared with the :class:`Connector`, so that a
  dropped connection and the calls pending on it are swapped out together
  (a call registered against the old connection is seen and refused). It
  guards the counts below and the reader thread's state; ``cv`` wakes
  waiting callers and the parked reader thread.
- ``rlock``: held by the one thread reading replies, never waited on
  (``acquire(False)``): a thread that cannot take it waits on ``cv``.
  Whoever releases it closes the connections dropped while it read.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, RUNNING
from typing import TYPE_CHECKING, Any

from fastnet.errors import ConnectionLost, ProtocolError, TimeoutError
from fastnet.rpc._wire import ReplyReader, _remote_exception

if TYPE_CHECKING:
    from fastnet.codecs import Codec
    from fastnet.connection import Connection
    from fastnet.rpc._connector import Connector
    from fastnet.rpc.proxy import RPCProxy

# how long a reply-less asynchronous call waits for its caller to read before
# the proxy's reader thread takes over, and how often a waiting caller looks
# whether the reader left
_BG_GRACE = 0.002
_DRIVE_POLL = 0.05
# how often the reader thread, reading with coalescing on, looks whether a
# queued request is waited for through its future's condition
_QUEUE_LOOK = 0.01


class _Slot:
    """Where a synchronous call's reply lands."""
    __slots__ = ("done", "error", "value")
    error: BaseException | None
    value: Any

    def __init__(self) -> None:
        self.done = False

    def set(self, error: BaseException | None, value: Any) -> None:
        self.error = error
        self.value = value
        self.done = True

    def fail(self, exc: BaseException) -> None:
        self.set(exc, None)


_DONE = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED))
# guards the making of a future's condition against its completion without one
_cond_lock = threading.Lock()


class _CallFuture(concurrent.futures.Future[Any]):
    """The future of an asynchronous call: a ``concurrent.futures.Future`` made cheap.

    It makes its condition only when something waits through it (another
    thread's ``result``, ``concurrent.futures.wait``, a callback); a call
    whose reply arrives before anyone waits completes without one.

    Waiting on it (``result``/``exception``) reads replies on the waiting
    thread when no other thread is reading, so a caller that issues many
    calls and then collects them never hands work to another thread. Futures
    nobody waits on (callbacks, ``concurrent.futures.wait``) complete through
    the proxy's reader thread.
    """

    # Future.__init__ is not called: it would make the condition at once
    def __init__(self, proxy: RPCProxy, deadline: float | None) -> None:
        self._state = RUNNING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []
        self._cond: threading.Condition | None = None
        # the proxy, not only its demultiplexer: a pending future keeps the
        # proxy (whose finalizer closes the connection) alive
        self._proxy = proxy
        self._deadline = deadline

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        c = self._cond
        if c is None:
            with _cond_lock:
                c = self._cond
                if c is None:
                    c = self._cond = threading.Condition()
            # something waits through the condition (concurrent.futures.wait, a
            # callback): the reader thread writes the coalescing queue for it
            if self._proxy._link.queue:
                self._proxy._replies.flush_wanted = True
        return c

    def _complete(self, error: BaseException | None, value: Any) -> None:
        """Set the outcome once; a later one (after a timeout, say) is ignored."""
        if self._cond is None:
            with _cond_lock:
                if self._cond is None:
                    # nobody waits, and nobody can start to before this is set
                    if self._state not in _DONE:
                        self._result = value
                        self._exception = error
                        self._state = FINISHED
                    return
        with self._condition:
            if self._state in _DONE:
                return
        try:
            if error is None:
                super().set_result(value)
            else:
                super().set_exception(error)
        except concurrent.futures.InvalidStateError:
            pass    # completed meanwhile by another thread

    # as a pending call's slot in the demultiplexer
    set = _complete

    def fail(self, exc: BaseException) -> None:
        self._complete(exc, None)

    def done(self) -> bool:
        return self._state in _DONE

    def result(self, timeout: float | None = None) -> Any:
        if self._state is FINISHED:
            if self._exception is not None:
                raise self._exception
            return self._result
        self._flush()
        self._proxy._replies.drive(self, timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state is FINISHED:
            return self._exception
        self._flush()
        self._proxy._replies.drive(self, timeout)
        return super().exception(timeout)

    def _flush(self) -> None:
        # a coalesced request must leave before its reply is waited for
        link = self._proxy._link
        if link.queue:
            try:
                link.flush()
            except ConnectionLost:
                pass        # the drop failed the pending calls, this one among them


class ReplyDemux:
    """The pending calls of one proxy, and the reading of their replies (see the module's text)."""

    def __init__(self, link: Connector, codec: Codec) -> None:
        self.link = link
        self.codec = codec
        self.lock = link.lock
        self.cv = link.cv
        self.rlock = threading.Lock()       # held by the one thread reading replies
        self.ids = itertools.count(1)
        self.pending: dict[int, _Slot | _CallFuture] = {}
        self.waiters = 0
        self.async_calls = 0                # pending asynchronous calls
        self.timed_calls = 0                # ... of which have a deadline
        self.bg: threading.Thread | None = None
        self.bg_parked = False
        self.drivers = 0                    # threads waiting on an asynchronous call
        self.to_close: list[Connection] = []    # dropped connections a reader still holds
        self.reader = ReplyReader(codec)
        self.last_io = 0.0
        self.late_replies = 0
        self.flush_wanted = False           # a future waited on through its condition

    # -- the connection's turns (the connector calls these with the lock held) --
    def connected_locked(self) -> None:
        """A new connection: no message half read, and it counts as fresh."""
        self.reader.reset()
        self.last_io = time.monotonic()

    def detach_locked(self) -> dict[int, _Slot | _CallFuture]:
        """The connection is gone: take the calls pending on it, for the caller to fail."""
        pending = self.pending
        self.pending = {}
        self.async_calls = 0
        self.timed_calls = 0
        self.reader.reset()
        return pending

    def close_when_free(self, conn: Connection) -> None:
        """Close a dropped connection now, or when the thread reading it leaves."""
        if self.rlock.acquire(False):
            try:
                conn.close()
            finally:
                self.rlock.release()
        else:
            # the reading thread still uses its descriptor: it closes it on leaving
            self.to_close.append(conn)

    # -- registering calls ---------------------------------------------------
    def register(self, msgid: int, slot: _Slot | _CallFuture, gen: int) -> bool:
        """Add a pending call; False if the connection it was meant for is gone."""
        pending = self.pending
        pending[msgid] = slot
        link = self.link
        # a drop swaps the dict: a slot that landed in the old one would never complete
        if self.pending is pending and link.gen == gen and link.conn is not None:
            return True
        pending.pop(msgid, None)
        return False

    def register_async(self, msgid: int, slot: _CallFuture, gen: int, owner: object) -> None:
        """Add a pending asynchronous call, and make sure a reader thread can complete it.

        ``owner`` (the proxy) lives as long as the reader thread: its
        finalizer closes the connection the thread reads.
        """
        with self.cv:
            if not self.register(msgid, slot, gen):
                raise ConnectionLost("the connection was lost before the call was sent")
            self.async_calls += 1
            self.last_io = time.monotonic()
            if slot._deadline is not None:
                self.timed_calls += 1
            if self.bg is None:
                t = self.bg = threading.Thread(target=self.background, args=(owner,),
                                               name="fastnet-rpc-reader", daemon=True)
                t.start()
            elif self.bg_parked:
                self.cv.notify_all()

    def unregister_async(self, msgid: int, slot: _CallFuture) -> None:
        """Take back an asynchronous call whose request could not be sent."""
        with self.cv:
            if self.pending.pop(msgid, None) is not None:
                self.forget_async(slot)

    def forget_async(self, slot: _CallFuture) -> None:
        # with the lock held
        self.async_calls -= 1
        if slot._deadline is not None:
            self.timed_calls -= 1

    # -- a synchronous call waits --------------------------------------------
    def wait(self, slot: _Slot, msgid: int, deadline: float | None) -> None:
        """Until ``slot`` is done: read replies on this thread if nobody else does, else wait."""
        if self.rlock.acquire(False):
            self.read_as_reader(slot, msgid, deadline)
        else:
            self.wait_slow(slot, msgid, deadline)

    def release_reader(self) -> None:
        while self.to_close:
            try:
                self.to_close.pop().close()
            except (IndexError, OSError):
                pass
        self.rlock.release()
        if self.waiters or self.async_calls:
            with self.cv:
                self.cv.notify_all()

    def read_as_reader(self, slot: _Slot, msgid: int, deadline: float | None) -> None:
        """Holding the reader lock: read and dispatch replies until ``slot`` is done."""
        try:
            link = self.link
            ch = link.ch
            conn = link.conn
            if ch is None:
                if not slot.done:
                    slot.fail(ConnectionLost("the connection was lost"))
                return
            while not slot.done:
                if deadline is None:
                    left = None
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.timed_out(slot, msgid)
                        return
                try:
                    frames = ch.recv_frames(left)
                except TimeoutError:
                    continue
                except (EOFError, OSError) as e:
                    link.lost(conn, e)
                    break
                self.dispatch(frames, conn)
            if not slot.done:
                slot.fail(ConnectionLost("the connection was lost"))
        finally:
            self.release_reader()

    def timed_out(self, slot: _Slot, msgid: int) -> None:
        if self.pending.pop(msgid, None) is not None or not slot.done:
            slot.fail(TimeoutError("RPC call timed out waiting for its reply"))

    def wait_slow(self, slot: _Slot, msgid: int, deadline: float | None) -> None:
        """Another thread reads replies: wait for ours, or for the reader lock to read ourselves."""
        cv = self.cv
        link = self.link
        with cv:
            self.waiters += 1
            try:
                while not slot.done:
                    if self.rlock.acquire(False):
                        break
                    if link.conn is None:
                        if not slot.done:
                            slot.fail(ConnectionLost("the connection was lost"))
                        return
                    if deadline is None:
                        cv.wait()
                        continue
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.timed_out(slot, msgid)
                        return
                    cv.wait(left)
                else:
                    return
            finally:
                self.waiters -= 1
        self.read_as_reader(slot, msgid, deadline)

    # -- a thread waits on an asynchronous call's future -----------------------
    def drive(self, fut: concurrent.futures.Future[Any], timeout: float | None) -> None:
        """Wait for ``fut``, reading replies on this thread whenever nobody else is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            self.drivers += 1
        try:
            self.drive_loop(fut, deadline)
        finally:
            with self.lock:
                self.drivers -= 1

    def drive_loop(self, fut: concurrent.futures.Future[Any], deadline: float | None) -> None:
        while not fut.done():
            if self.rlock.acquire(False):
                try:
                    self.read_for(fut, deadline)
                finally:
                    self.release_reader()
            if fut.done():
                return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return                  # Future.result raises the timeout
            # someone else reads: wait for our reply, looking again now and then in
            # case that reader leaves before it arrives
            concurrent.futures.wait((fut,), _DRIVE_POLL if left is None else min(left, _DRIVE_POLL))

    def read_for(self, fut: concurrent.futures.Future[Any], deadline: float | None) -> None:
        link = self.link
        ch = link.ch
        conn = link.conn
        if ch is None:
            return
        while not fut.done():
            left = self.next_deadline()
            if deadline is not None:
                mine = deadline - time.monotonic()
                if mine <= 0:
                    return
                left = mine if left is None else min(left, mine)
            try:
                frames = ch.recv_frames(left)
            except TimeoutError:
                with self.cv:
                    self.expire_locked()
                continue
            except (EOFError, OSError) as e:
                link.lost(conn, e)
                return
            self.dispatch(frames, conn)

    def next_deadline(self) -> float | None:
        if not self.timed_calls:
            return None
        with self.cv:
            return self.next_deadline_locked()

    # -- replies to their calls -------------------------------------------------
    def dispatch(self, frames: list[bytes], conn: Connection | None) -> None:
        self.last_io = time.monotonic()
        codec = self.codec
        pending = self.pending
        woke = False
        reader = self.reader
        read_reply = reader.wire.read_reply
        done_async = done_timed = 0
        try:
            for f in frames:
                try:
                    if reader.partial is None and f[:1] != b"\xc1":
                        reply: tuple[Any, Any, Any] | None = read_reply((f,))   # a whole reply in one frame
                    else:
                        reply = reader.feed(f)
                    if reply is None:
                        continue
                except ProtocolError as e:
                    self.link.lost(conn, e)
                    return
                msgid, error, result = reply
                slot = pending.pop(msgid, None)
                if slot is None:
                    self.late_replies += 1     # its call timed out: nobody wants it
                    continue
                if type(slot) is _CallFuture:
                    done_async += 1
                    if slot._deadline is not None:
                        done_timed += 1
                else:
                    woke = True
                if error is None:
                    slot.set(None, result)
                else:
                    slot.set(_remote_exception(error, codec), None)
        finally:
            if done_async:
                with self.lock:
                    self.async_calls -= done_async
                    self.timed_calls -= done_timed
        if woke and self.waiters:
            with self.cv:
                self.cv.notify_all()

    def background(self, owner: object) -> None:
        """Reads replies for asynchronous calls nobody is waiting on (the reader thread's body)."""
        cv = self.cv
        link = self.link
        rlock = self.rlock
        while True:
            stalled_queue = False
            with cv:
                while True:
                    if link.closed:
                        return
                    self.expire_locked()
                    if not self.async_calls or link.conn is None:
                        self.bg_parked = True
                        cv.wait(self.next_deadline_locked())
                        self.bg_parked = False
                        continue
                    # a caller that issues calls and then waits reads its replies
                    # itself: take over only when replies have stalled a while
                    # with nobody reading or waiting
                    if self.flush_wanted:
                        # coalesced requests waited for otherwise than by result():
                        # write them, holding no lock a reader needs
                        self.flush_wanted = False
                        stalled_queue = True
                        break
                    quiet = time.monotonic() - self.last_io
                    if quiet < _BG_GRACE or self.drivers or self.waiters or rlock.locked():
                        cv.wait(max(_BG_GRACE - quiet, _BG_GRACE / 4))
                        continue
                    if rlock.acquire(False):
                        break
                conn = link.conn
                ch = link.ch
            if stalled_queue:
                try:
                    if not link.flush(wait=False) and not link.writing:
                        # another thread is queueing, briefly: try again. (A thread
                        # writing took the queue with it; waiting for it could
                        # block on a server that waits for its replies to be read.)
                        self.flush_wanted = True
                        time.sleep(_BG_GRACE / 4)
                except ConnectionLost:
                    pass        # the drop failed the pending calls
                continue
            try:
                while (self.async_calls and link.conn is conn and not self.waiters and not self.drivers
                       and not self.flush_wanted):
                    left = self.next_deadline()
                    if link.climit:
                        # look now and then whether a future with a queued request
                        # started to be waited on
                        left = _QUEUE_LOOK if left is None else min(left, _QUEUE_LOOK)
                    try:
                        frames = ch.recv_frames(left)  # type: ignore[union-attr]
                    except TimeoutError:
                        with cv:
                            self.expire_locked()
                        continue
                    except (EOFError, OSError) as e:
                        link.lost(conn, e)
                        break
                    self.dispatch(frames, conn)
            finally:
                self.release_reader()

    # -- deadlines of asynchronous calls (with the lock held) ---------------------
    def next_deadline_locked(self) -> float | None:
        if not self.timed_calls:
            return None
        soonest = None
        for slot in list(self.pending.values()):
            dl: float | None = getattr(slot, "_deadline", None)
            if dl is not None and (soonest is None or dl < soonest):
                soonest = dl
        if soonest is None:
            return None
        return max(0.0, soonest - time.monotonic())

    def expire_locked(self) -> None:
        if not self.timed_calls:
            return
        now = time.monotonic()
        expired = [k for k, s in list(self.pending.items())
                   if type(s) is _CallFuture and s._deadline is not None and s._deadline <= now]
        for k in expired:
            s = self.pending.pop(k)
            self.forget_async(s)  # type: ignore[arg-type]
            s.fail(TimeoutError("RPC call timed out waiting for its reply"))
