"""The proxy's connection manager: connect, reconnect with backoff, and drop a broken connection.

Every connection the proxy makes has a generation number. A call notes the
generation it was registered and sent under, so a call meant for a
connection that was dropped meanwhile is refused (it was never sent) rather
than sent on the next one, where its reply could never come back.
"""
from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fastnet._kernels import framing, rpcwire
from fastnet.connection import _LOOP_UNIX_SNDBUF, Client, _unix_sndbuf
from fastnet.errors import AuthenticationError, ConnectionLost, ProtocolError, TimeoutError
from fastnet.rpc._demux import ReplyDemux
from fastnet.rpc._wire import _MAX_HELLO, HELLO_CLOSED, check_hello_reply, hello_frame

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from fastnet._c.framing import Channel as _CChannel
    from fastnet.tls import TLSChannel
    from fastnet.codecs import Codec
    from fastnet.connection import Connection

send_framed = rpcwire.send_framed
HEADER_SIZE = framing.HEADER_SIZE

# an idle connection is checked for a close by the server before it is reused
_STALE_AFTER = 0.02


class _NotSent(ConnectionLost):
    """A send failed: the request did not leave whole, so it cannot have run."""


class Connector:
    """The connection of one proxy, made again after a drop; owns the proxy's :class:`ReplyDemux`.

    ``conn``/``ch``/``gen``/``closed`` change only under ``cv`` (the lock
    shared with the demultiplexer); a new connection's ``conn`` is set
    last, so a thread that sees it without the lock also sees its channel
    and generation.
    """

    def __init__(self, address: Any, family: str | int | None, authkey: bytes | None, codec: Codec,
                 ssl_context: ssl.SSLContext | None, connect_timeout: float, max_size: int | None,
                 strict: bool, backoff: tuple[float, float], keepalive: float | None,
                 spin: float = 0.0, coalesce: int = 0) -> None:
        self.address = address
        self.family = family
        self.authkey = authkey
        self.codec = codec
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self.max_size = max_size
        self.strict = strict
        self.backoff = backoff
        self.keepalive = keepalive
        if not spin >= 0:
            raise ValueError(f"spin must be a number of microseconds >= 0, not {spin!r}")
        self.spin = spin
        # coalescing (0: off): requests held back until they pass this many bytes or
        # someone waits; the queue and its generation change only under send_lock
        self.climit = coalesce
        self.queue: list[bytes | list[Buffer]] = []
        self.qbytes = 0
        self.qgen = 0
        self.writing = False    # a thread holding send_lock is writing (the queue taken with it)
        self.conn: Connection | None = None
        self.ch: _CChannel | TLSChannel | None = None
        # the socket of a plain channel (no TLS, no coalescing): framed messages go straight to it
        self.raw: socket.socket | None = None
        self.wire = rpcwire.Wire(codec)
        self.gen = 0
        self.closed = False
        self.lock = lock = threading.Lock()
        self.cv = threading.Condition(lock)
        self.send_lock = threading.Lock()
        self.connect_lock = threading.Lock()
        self.replies = ReplyDemux(self, codec)

    def checked(self) -> Connection:
        """The open connection, reconnecting first if it is gone or went stale while idle."""
        conn = self.conn
        if conn is not None and time.monotonic() - self.replies.last_io > _STALE_AFTER:
            self.stale()
            conn = self.conn
        if conn is None:
            conn = self.ensure()
        return conn

    def ensure(self, retry: bool = True) -> Connection:
        """The open connection, or a new one (retried with backoff for ``connect_timeout`` if ``retry``)."""
        conn = self.conn
        if conn is not None:
            return conn
        if self.closed:
            raise ConnectionLost("the proxy is closed")
        with self.connect_lock:
            conn = self.conn
            if conn is not None:
                return conn
            deadline = time.monotonic() + self.connect_timeout
            delay, cap = self.backoff
            while True:
                try:
                    conn = self.open(deadline)
                    break
                except AuthenticationError as e:
                    # a peer that vanished mid-handshake is a connection failure, not a refusal
                    if not isinstance(e.__cause__, (EOFError, OSError)):
                        raise
                    err: BaseException = e
                except EOFError as e:
                    # the peer closed mid-handshake (or mid-frame): a connection failure
                    err = e
                except (ProtocolError, ValueError, TypeError):
                    raise
                except OSError as e:
                    err = e
                left = deadline - time.monotonic()
                if left <= 0 or not retry:
                    raise ConnectionLost(f"cannot connect to {self.address!r}: {err}") from err
                time.sleep(min(delay, left))
                delay = min(delay * 2, cap)
            with self.cv:
                if self.closed:
                    conn.close()
                    raise ConnectionLost("the proxy is closed")
                ch = self.ch = conn._ch
                self.raw = conn._sock if (type(ch) is framing.Channel and ch.io is None
                                          and not ch.coalesce) else None
                self.replies.connected_locked()
                self.gen += 1
                self.conn = conn
            return conn

    def open(self, deadline: float) -> Connection:
        """Connect, authenticate and exchange the RPC hello."""
        left = max(0.001, deadline - time.monotonic())
        # the proxy owns this socket and no one else watches it, so replies may
        # be read ahead: one syscall per burst of replies instead of two per reply
        conn = Client(self.address, self.family, self.authkey, timeout=left,
                      max_message_size=self.max_size, strict=self.strict,
                      ssl_context=self.ssl_context, keepalive=self.keepalive, readahead=True,
                      spin=self.spin)
        try:
            # the server's event loop reads what this socket queues: a small
            # buffer wakes it for every 208 KiB of a large request
            if conn._sock is not None:
                _unix_sndbuf(conn._sock, _LOOP_UNIX_SNDBUF)
            conn.send_bytes(hello_frame(self.codec.name))
            left = max(0.001, deadline - time.monotonic())
            try:
                data = conn._ch.recv_frame(_MAX_HELLO, left)  # type: ignore[union-attr]  # open
            except EOFError:
                raise ConnectionLost(HELLO_CLOSED) from None
            check_hello_reply(data, self.codec.name)
        except BaseException:
            conn.close()
            raise
        return conn

    def stale(self) -> None:
        """Drop an idle connection the server closed meanwhile, so the next call reconnects first."""
        replies = self.replies
        if replies.pending or not replies.rlock.acquire(False):
            return
        conn = self.conn
        ch = self.ch
        try:
            if ch is not None and ch.poll(0.0):
                replies.late_replies += len(ch.recv_frames(0.0))
        except TimeoutError:
            pass
        except (EOFError, OSError):
            self.drop(conn, ConnectionLost("the server closed the idle connection"))
        finally:
            replies.release_reader()

    def drop(self, conn: Connection | None, exc: BaseException) -> None:
        """Forget a broken connection and fail every call pending on it."""
        replies = self.replies
        with self.cv:
            if self.conn is not conn:
                return
            self.conn = None
            self.ch = None
            self.raw = None
            pending = replies.detach_locked()
            self.cv.notify_all()
        try:
            # wakes a thread blocked reading it, which then sees end of file
            conn._sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
        except (OSError, AttributeError):
            pass
        replies.close_when_free(conn)  # type: ignore[arg-type]
        for slot in list(pending.values()):
            slot.fail(exc)

    def lost(self, conn: Connection | None, e: BaseException) -> None:
        """Drop ``conn`` after reading it failed with ``e``."""
        if isinstance(e, EOFError):
            why = "the server closed the connection"
        else:
            why = f"the connection failed ({type(e).__name__}: {e})"
        self.drop(conn, ConnectionLost(f"{why}; the call may or may not have run"))

    def send(self, msg: bytes | list[Buffer], gen: int, hold: bool = False) -> None:
        """Send one message of :class:`~fastnet._pure.rpcwire.Wire` on connection ``gen`` (see :meth:`send_many`)."""
        if hold and self.climit and type(msg) is bytes:
            # the common case of coalescing: one more request joins the queue
            with self.send_lock:
                n = self.qbytes + len(msg)
                if n < self.climit and self.ch is not None and self.gen == gen and (
                        self.qgen == gen or not self.queue):
                    self.queue.append(msg)
                    self.qbytes = n
                    self.qgen = gen
                    return
        self.send_many((msg,), gen, hold)

    def send_many(self, msgs: Sequence[bytes | list[Buffer]], gen: int, hold: bool = False) -> None:
        """Send messages of :class:`~fastnet._pure.rpcwire.Wire` on connection ``gen``, in one write if they fit.

        The coalescing queue goes first, in the same write. ``hold`` (with
        coalescing on) queues them instead, writing the queue only once it
        passes the threshold. _NotSent if the last of them did not leave.
        """
        with self.send_lock:
            ch = self.ch
            conn = self.conn
            if ch is None or self.gen != gen:
                raise ConnectionLost("the connection was lost before the call was sent")
            q = self.queue
            if q:
                if self.qgen != gen:
                    # queued for a connection since dropped: its calls failed with it
                    q = self.queue = []
                    self.qbytes = 0
                else:
                    msgs = q + list(msgs)
            if hold and self.climit:
                n = self.qbytes
                for m in msgs[len(q):]:
                    # a message with out-of-band buffers is large: it leaves at once
                    n += len(m) if type(m) is bytes else self.climit
                if n < self.climit:
                    if q:
                        self.queue = msgs  # type: ignore[assignment]
                    else:
                        self.queue = list(msgs)
                    self.qbytes = n
                    self.qgen = gen
                    return
            if q:
                self.queue = []
            self.qbytes = 0
            try:
                self.write(ch, msgs)
                return
            except OSError as e:
                err = e
        self.drop(conn, ConnectionLost(f"the connection to {self.address!r} was lost: {err}"))
        raise _NotSent(f"sending the call failed: {err}") from err

    def flush(self, wait: bool = True) -> bool:
        """Write the coalescing queue now; False if ``wait`` is false and another thread holds the send lock.

        ConnectionLost if the write failed: the connection is dropped and the
        calls pending on it, the queued ones among them, fail with it.
        """
        if not self.queue:
            return True
        if not self.send_lock.acquire(wait):
            return False
        try:
            msgs = self.queue
            ch = self.ch
            conn = self.conn
            self.queue = []
            self.qbytes = 0
            if not msgs or ch is None or self.gen != self.qgen:
                return True     # nothing, or queued for a connection since dropped (its calls failed with it)
            try:
                self.write(ch, msgs)
                return True
            except OSError as e:
                err = e
        finally:
            self.send_lock.release()
        exc = ConnectionLost(f"the connection to {self.address!r} was lost while writing queued calls: {err}; "
                             "they may or may not have run")
        self.drop(conn, exc)
        raise exc from err

    def write(self, ch: _CChannel | TLSChannel, msgs: Sequence[bytes | list[Buffer]]) -> None:
        # with send_lock held
        self.writing = True
        try:
            self.write_locked(ch, msgs)
        finally:
            self.writing = False

    def write_locked(self, ch: _CChannel | TLSChannel, msgs: Sequence[bytes | list[Buffer]]) -> None:
        raw = self.raw
        if len(msgs) == 1:
            msg = msgs[0]
            if not isinstance(msg, bytes):
                ch.send_frames(msg)
            elif raw is not None:
                send_framed(raw, msg)
            else:
                ch.send_frame(msg, HEADER_SIZE)
        elif raw is not None and all(type(m) is bytes for m in msgs):
            send_framed(raw, b"".join(msgs))  # type: ignore[arg-type]
        else:
            frames: list[Buffer] = []
            for m in msgs:
                if isinstance(m, bytes):
                    frames.append(memoryview(m)[HEADER_SIZE:])
                else:
                    frames.extend(m)
            ch.send_frames(frames)

    def close(self) -> None:
        """Write the coalescing queue, then close for good; pending calls fail with ConnectionLost.

        A failed write is raised once the proxy is closed.
        """
        err: ConnectionLost | None = None
        try:
            self.flush()
        except ConnectionLost as e:
            err = e
        with self.cv:
            self.closed = True
            conn = self.conn
            self.cv.notify_all()
        if conn is not None:
            self.drop(conn, ConnectionLost("the proxy was closed"))
        if err is not None:
            raise err
