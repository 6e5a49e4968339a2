"""Message connections: a drop-in, wire-compatible multiprocessing.connection.

``Listener``, ``Client``, ``Connection``, ``Pipe`` and ``wait`` keep the
stdlib's signatures and behaviour; the frames and the authkey handshake are
the stdlib's byte for byte, so either end may be a stdlib peer. Beyond the
stdlib: arrays and buffers without copies (``send_array``/``recv_array``),
many frames in one syscall (``send_many``/``recv_many``), timeouts on
connect and handshake, and a limit on message size.

A receive takes from the socket exactly the message it returns, as the
stdlib does: ``select``/``poll``/``add_reader`` on ``fileno()`` stay truthful,
a connection end shared by several processes loses nothing, and a descriptor
sent with ``multiprocessing.reduction.send_handle`` after a message is left
for ``recv_handle``. ``readahead=True`` (on ``Connection``, ``Client``,
``Listener`` and ``Pipe``) reads as much as the socket has instead: fewer
syscalls for many small messages, at the price of those three guarantees.

Three more opt-ins, each off by default: ``coalesce=True`` queues small
outgoing messages and writes them together (see :meth:`Connection.coalescing`);
``spin=microseconds`` busy-polls a receive before it sleeps; ``shm=True``
sends large arrays over AF_UNIX through shared memory (:mod:`fastnet.shm`).

``recv()`` unpickles what the peer sent, exactly as multiprocessing does: on
a connection that did not authenticate, that trusts the peer with arbitrary
code execution. Use an ``authkey`` (or ``recv_bytes``) with untrusted peers.
"""
from __future__ import annotations

import contextlib
import math
import os
import select
import socket
import ssl
import struct
import time
from _socket import inet_pton as _inet_pton
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import reduction as _reduction, util as _util
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING, Any, SupportsInt

from fastnet import auth as _auth
from fastnet import shm as _shm
from fastnet import zerocopy as _zc
from fastnet._kernels import framing as _framing
from fastnet.handshake import _TCP, _family
from fastnet.defaults import HANDSHAKE_TIMEOUT, MAX_MESSAGE_SIZE_CONNECTION
from fastnet.address import arbitrary_address, parse_address, format_address, bind as _bind
from fastnet.errors import (MessageTooLarge, ProtocolError, TimeoutError, BufferTooShort,
                            AuthenticationError)

if TYPE_CHECKING:
    from typing_extensions import Buffer, TypeAlias

    from fastnet.address import Address
    from fastnet.tls import TLSChannel

    # the active kernels' channel, or a TLSChannel (frames inside TLS)
    _Channel: TypeAlias = "_framing.Channel | TLSChannel"

__all__ = ["Connection", "Listener", "Client", "Pipe", "wait", "set_keepalive", "DEFAULT_MAX_MESSAGE_SIZE",
           "DEFAULT_HANDSHAKE_TIMEOUT"]

#: Largest message a connection accepts unless told otherwise (1 GiB). A
#: header claiming more is refused before anything is allocated. Pass
#: ``max_message_size=None`` to lift the limit for a trusted peer.
DEFAULT_MAX_MESSAGE_SIZE = MAX_MESSAGE_SIZE_CONNECTION
#: Seconds a Listener gives a new peer to finish the authkey handshake.
DEFAULT_HANDSHAKE_TIMEOUT = HANDSHAKE_TIMEOUT
# Per-connection receive buffer; grows for a frame that needs more.
_BUFSIZE = 65536

_dumps = ForkingPickler.dumps
_loads = ForkingPickler.loads


# The send buffer event loops ask for on AF_UNIX streams (the kernel caps it at
# net.core.wmem_max): at the default 208 KiB, a 256 MiB message costs both
# loops 1,300 wake-ups. Blocking connections keep the default.
_LOOP_UNIX_SNDBUF = 1 << 20


def _tune(sock: socket.socket, nodelay: bool = True, keepalive: float | None = None, unix_sndbuf: int = 0) -> None:
    fam = _family(sock)
    if fam in _TCP:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if nodelay else 0)
        if keepalive is not None:
            set_keepalive(sock, keepalive)
    elif unix_sndbuf:
        _unix_sndbuf(sock, unix_sndbuf)


def _unix_sndbuf(sock: socket.socket, nbytes: int) -> None:
    # an AF_UNIX sender may queue only its send buffer in the peer's socket
    # (208 KiB by default): each refill is a wake-up of both ends
    if _family(sock) == socket.AF_UNIX:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, nbytes)


def _keepalive_seconds(keepalive: float | None) -> float | None:
    if keepalive is not None and not keepalive > 0:
        raise ValueError(f"keepalive must be a positive number of seconds or None, not {keepalive!r}")
    return keepalive


def set_keepalive(sock: socket.socket, seconds: float) -> None:
    """Make a TCP socket fail within about ``seconds`` once its peer has vanished.

    A peer whose host crashed or dropped off the network sends no FIN and no
    RST, so without this a blocking ``recv`` waits for ever. Idle, the socket
    sends keepalive probes (``TCP_KEEPIDLE``/``TCP_KEEPINTVL``/``TCP_KEEPCNT``)
    and gives up when the last one goes unanswered; with data waiting for an
    acknowledgement, ``TCP_USER_TIMEOUT`` gives up after ``seconds``. Either way
    the next receive or send raises ``OSError`` (``ETIMEDOUT``). ``seconds`` is
    rounded up to whole seconds, at least 2. A live peer is never affected: its
    kernel answers the probes even while the program is stopped. Does nothing
    on a socket that is not TCP.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    total = max(2, math.ceil(seconds))
    idle = total // 2
    # the probes fit in what is left: idle + count * interval <= total
    count = min(3, total - idle)
    interval = max(1, (total - idle) // count)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # Linux and the BSDs name the idle option differently; macOS has only TCP_KEEPALIVE
    idle_opt = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)
    if idle_opt is not None:
        sock.setsockopt(socket.IPPROTO_TCP, idle_opt, idle)
    if hasattr(socket, "TCP_KEEPINTVL"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    if hasattr(socket, "TCP_KEEPCNT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, total * 1000)


#: The coalescing threshold in bytes that ``coalesce=True`` means.
COALESCE_THRESHOLD: int = _framing.COALESCE_THRESHOLD


def _coalesce_limit(coalesce: bool | int) -> int:
    """The threshold in bytes a ``coalesce`` option means (0: off)."""
    if coalesce is True:
        return COALESCE_THRESHOLD
    if coalesce is False or coalesce is None:
        return 0
    if not isinstance(coalesce, int) or coalesce < 0:
        raise ValueError(f"coalesce must be True, False or a number of bytes, not {coalesce!r}")
    return coalesce


def _spin_us(spin: float) -> float:
    if not spin >= 0:
        raise ValueError(f"spin must be a number of microseconds >= 0, not {spin!r}")
    return float(spin)


def _send_size(n: int, offset: int, size: int | None) -> int:
    """The size of send_bytes' slice of an n-byte buffer, checked as multiprocessing checks it."""
    if offset < 0:
        raise ValueError("offset is negative")
    if n < offset:
        raise ValueError("buffer length < offset")
    if size is None:
        return n - offset
    if size < 0:
        raise ValueError("size is negative")
    if offset + size > n:
        raise ValueError("buffer length < offset + size")
    return size


def _tls_wrap(ctx: ssl.SSLContext, sock: socket.socket, timeout: float | None,
              server_hostname: str | None = None, server_side: bool = False) -> ssl.SSLSocket:
    """Wrap sock with ctx and finish the TLS handshake within timeout; on failure close it."""
    try:
        s = ctx.wrap_socket(sock, server_side=server_side, server_hostname=server_hostname,
                            do_handshake_on_connect=False)
    except BaseException:
        sock.close()
        raise
    try:
        s.settimeout(timeout)
        s.do_handshake()
        s.setblocking(True)
    except (socket.timeout, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        # a timeout already spent leaves the socket non-blocking: WANT_* means out of time
        s.close()
        raise TimeoutError("TLS handshake timed out") from None
    except (ssl.SSLError, ConnectionError) as e:
        s.close()
        raise AuthenticationError(f"TLS handshake failed: {e}") from e
    except BaseException:
        s.close()
        raise
    return s


def _tls_channel(sock: socket.socket, max_size: SupportsInt | None, bufsize: int) -> TLSChannel:
    from fastnet.tls import TLSChannel
    return TLSChannel(sock, max_size, bufsize)


class Connection:
    """A framed, bidirectional message connection over a stream socket.

    Wraps a connected socket object (or a descriptor, which it then owns);
    an ``ssl.SSLSocket`` gets its frames inside TLS. Frames are
    multiprocessing's; see the module docstring about ``recv()``.

    ``readahead=True`` lets a receive read as much as the socket has (see the
    module docstring for what that costs); it has no effect under TLS, whose
    records are read ahead anyway. A Connection pickles as the stdlib's does
    (a duplicated descriptor, for a child process or over another
    connection), unless it holds read-ahead bytes or runs TLS.

    ``coalesce`` (True, or a threshold in bytes) queues outgoing messages:
    see :meth:`coalescing`. ``spin`` (microseconds) makes a receive that
    would block poll the socket without sleeping for up to that long first,
    trading CPU for the scheduler's wake-up (no effect under TLS). ``shm=True``
    sends arrays of at least :data:`fastnet.shm.THRESHOLD` bytes through
    shared memory over AF_UNIX (see :meth:`send_array`).
    """

    def __init__(self, sock: socket.socket | int, readable: bool = True, writable: bool = True, *,
                 max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE, readahead: bool = False,
                 coalesce: bool | int = False, spin: float = 0.0, shm: bool = False,
                 _channel_factory: Callable[[socket.socket, int | None, int], _Channel] | None = None) -> None:
        if not readable and not writable:
            raise ValueError("at least one of `readable` and `writable` must be True")
        if isinstance(sock, int):
            sock = socket.socket(fileno=sock)
        sock.setblocking(True)
        self._sock = sock
        if _channel_factory is None and isinstance(sock, ssl.SSLSocket):
            # e.g. the request of a blocking handler on a TLS server: frame
            # inside TLS, never on the ciphertext under it
            _channel_factory = _tls_channel
        if _channel_factory is None:
            self._ch: _Channel | None = _framing.Channel(sock, max_message_size, _BUFSIZE, readahead=readahead,
                                                         spin=spin)
        else:
            self._ch = _channel_factory(sock, max_message_size, _BUFSIZE)
        if coalesce or not isinstance(coalesce, int):    # False and 0 are off; anything else is checked
            self._ch.set_coalesce(_coalesce_limit(coalesce))
        self._readahead = bool(readahead)
        self._shm = bool(shm)
        self._readable = readable
        self._writable = writable

    def __repr__(self) -> str:
        state = "closed" if self._ch is None else f"fd={self._sock.fileno()}"
        return f"<fastnet.Connection {state}>"

    # -- state -------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True if the connection is closed."""
        return self._ch is None

    @property
    def readable(self) -> bool:
        """True if the connection can receive."""
        return self._readable

    @property
    def writable(self) -> bool:
        """True if the connection can send."""
        return self._writable

    @property
    def max_message_size(self) -> int | None:
        """The largest message this end accepts (None: unlimited)."""
        return None if self._ch is None else self._ch.max_size

    @property
    def readahead(self) -> bool:
        """True if receives may read beyond the message they return."""
        return self._readahead

    @property
    def coalesce(self) -> int:
        """The coalescing threshold in bytes (0: every message is written at once)."""
        return 0 if self._ch is None else self._ch.coalesce

    @property
    def spin(self) -> float:
        """Microseconds a blocking receive busy-polls before it sleeps (0: none)."""
        return 0.0 if self._ch is None else self._ch.spin

    @property
    def shm(self) -> bool:
        """True if large arrays go through shared memory by default (see :meth:`send_array`)."""
        return self._shm

    @property
    def family(self) -> int:
        """The socket family (``socket.AF_INET``, ``AF_INET6`` or ``AF_UNIX``)."""
        return self._sock.family

    def fileno(self) -> int:
        """The socket's file descriptor."""
        self._check_closed()
        return self._sock.fileno()

    def close(self) -> None:
        """Close the connection, writing queued messages first. Closing twice is harmless.

        If writing the queued messages fails, the connection is closed all
        the same and the error raised.
        """
        ch = self._ch
        if ch is not None:
            try:
                ch.flush()
            finally:
                self._ch = None
                ch.release()
                self._sock.close()

    def flush(self) -> None:
        """Write the messages queued by coalescing now (nothing to do without)."""
        self._sender().flush()

    def unflushed(self) -> int:
        """Bytes of messages queued by coalescing and not yet written."""
        return 0 if self._ch is None else self._ch.unflushed()

    @contextlib.contextmanager
    def coalescing(self, threshold: bool | int = True) -> Iterator[Connection]:
        """Queue messages sent inside the block; write them together.

        ``send_bytes``, ``send`` and ``send_array`` append each message to a
        user-space buffer, written in one syscall once it passes
        ``threshold`` bytes (True: :data:`COALESCE_THRESHOLD`), before any
        receive or ``poll`` on this connection and ``fastnet.wait`` on it,
        on :meth:`flush`, on :meth:`close`, and when the block ends. A
        message has left this process once one of those writes returns;
        until then the peer cannot see it. If a write fails (the peer
        closed), the error is raised by the call that wrote, and every
        message queued since the last successful write is dropped: a prefix
        of them may have reached the peer, the rest never will. Messages
        written before were delivered to the peer's socket as usual.
        """
        ch = self._sender()
        before = ch.coalesce
        ch.set_coalesce(_coalesce_limit(threshold) or before)
        try:
            yield self
        finally:
            if self._ch is ch:
                ch.set_coalesce(before)
                ch.flush()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # received descriptors nobody claimed are closed with the connection
        if getattr(self, "_ch", None) is not None:
            try:
                self.close()
            except OSError:
                pass    # queued messages a dead peer cannot take: as a file object's finalizer

    def _check_closed(self) -> None:
        if self._ch is None:
            raise OSError("handle is closed")

    def _sender(self) -> _Channel:
        ch = self._ch
        if ch is None:
            raise OSError("handle is closed")
        if not self._writable:
            raise OSError("connection is read-only")
        return ch

    def _receiver(self) -> _Channel:
        ch = self._ch
        if ch is None:
            raise OSError("handle is closed")
        if not self._readable:
            raise OSError("connection is write-only")
        return ch

    def _fail(self) -> None:
        # the stream is desynchronised: only this connection goes
        self.close()

    # -- sending -------------------------------------------------------------

    def send_bytes(self, buf: Buffer, offset: int = 0, size: int | None = None) -> None:
        """Send a bytes-like object's bytes (from ``offset``, ``size`` long) as one message."""
        ch = self._sender()
        if offset == 0 and size is None:
            ch.send_frame(buf)
            return
        ch.send_frame(buf, offset, _send_size(memoryview(buf).nbytes, offset, size))

    def send(self, obj: Any) -> None:
        """Send a picklable object (pickled as multiprocessing does)."""
        self._sender().send_frame(_dumps(obj))

    def send_many(self, buffers: Iterable[Buffer]) -> None:
        """Send each bytes-like object in ``buffers`` as its own message, in as few syscalls as possible."""
        self._sender().send_frames(buffers)

    def send_array(self, arr: Any, *, shm: bool | None = None) -> None:
        """Send a numpy array (or any buffer) with its dtype, shape and order, without copying it.

        A non-contiguous array is copied once into C order. A stdlib peer sees
        two messages: a small header and the raw bytes.

        ``shm=True`` sends it through shared memory over AF_UNIX (one copy
        into a pooled segment whose descriptor rides on one header frame,
        none for an array made by :func:`fastnet.shm.empty`; the peer must
        be fastnet); ``shm=None`` does so for arrays of at
        least :data:`fastnet.shm.THRESHOLD` bytes when the connection was
        made with ``shm=True``. Over TCP or TLS the ordinary frames go.
        """
        ch = self._sender()
        header, payload = _zc.encode_array(arr)
        if (shm or (shm is None and self._shm and memoryview(payload).nbytes >= _shm.THRESHOLD)) \
                and self._passes_fds() and _shm.available():
            _shm.send(ch, arr, header, payload)
            return
        ch.send_frames((header, payload))

    def _passes_fds(self) -> bool:
        # descriptors travel on a plain AF_UNIX channel, never inside TLS
        return self._sock.family == socket.AF_UNIX and self._ch is not None and self._ch.io is None

    # -- receiving -----------------------------------------------------------

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        """Receive one message as bytes. EOFError when the peer has closed."""
        ch = self._receiver()
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        try:
            return ch.recv_frame(maxlength)
        except (ProtocolError, MessageTooLarge):
            self._fail()
            raise

    def recv(self) -> Any:
        """Receive and unpickle one object (trusts the peer: see the module docstring)."""
        ch = self._receiver()
        try:
            buf = ch.recv_frame()
        except (ProtocolError, MessageTooLarge):
            self._fail()
            raise
        return _loads(buf)

    def recv_bytes_into(self, buf: Buffer, offset: int = 0) -> int:
        """Receive one message into a writable buffer at byte ``offset``; return its size.

        Bytes of a large message go straight from the socket into ``buf``. A
        message that does not fit raises BufferTooShort carrying it whole.
        """
        ch = self._receiver()
        if offset < 0:
            raise ValueError("negative offset")
        if offset > memoryview(buf).nbytes:
            raise ValueError("offset too large")
        try:
            return ch.recv_frame_into(buf, offset)
        except (ProtocolError, MessageTooLarge):
            self._fail()
            raise

    def recv_many(self, timeout: float | None = None) -> list[bytes]:
        """Return every message available now as a list, waiting for at least one."""
        ch = self._receiver()
        try:
            return ch.recv_frames(timeout)
        except (ProtocolError, MessageTooLarge):
            self._fail()
            raise

    def recv_array(self, out: Any = None) -> Any:
        """Receive an array sent with ``send_array``.

        With ``out``, the payload lands directly in that preallocated array
        after its shape and dtype are checked (a mismatch raises ValueError
        and leaves the connection usable). Without, a new array is allocated
        (numpy if installed, else a memoryview), bounded by max_message_size.
        """
        ch = self._receiver()
        try:
            if self._passes_fds():
                header, fds = ch.recv_frame_fds(1, None, _zc.MAX_HEADER)
                if _shm.is_shm_header(header):
                    return _shm.receive(header, fds, out, ch.max_size)
                if fds:
                    for fd in fds:
                        os.close(fd)
                    raise ProtocolError("a descriptor came with an array header that carries none")
            else:
                header = ch.recv_frame(_zc.MAX_HEADER)
            kind, tname, shape, order = _zc.decode_array_header(header)
            itemsize = _zc.itemsize_of(kind, tname)
            nbytes = _zc.nbytes_of(shape, itemsize)
            if out is not None:
                return self._recv_array_into(ch, out, kind, tname, shape, order, nbytes)
            limit = ch.max_size
            if limit is not None and nbytes > limit:
                ch.discard_frame()
                raise MessageTooLarge(f"array of {nbytes} bytes exceeds max_message_size={limit}")
            if _zc._np is not None:
                arr = _zc._np.empty(shape, _zc.dtype_of(kind, tname), order=order)
                target = arr
            else:
                target = bytearray(nbytes)
                arr = memoryview(target).cast("B").cast(tname, shape) if shape else memoryview(target)  # type: ignore[call-overload]
            self._recv_payload(ch, target, nbytes)
            return arr
        except (ProtocolError, MessageTooLarge):
            self._fail()
            raise

    def _recv_array_into(self, ch: _Channel, out: Any, kind: int, tname: str, shape: tuple[int, ...],
                         order: str, nbytes: int) -> Any:
        np = _zc._np
        if np is not None and isinstance(out, np.ndarray):
            dt = _zc.dtype_of(kind, tname)
            if out.shape != tuple(shape) or out.dtype != dt:
                ch.discard_frame()
                raise ValueError(f"out is {out.dtype}{list(out.shape)}, message is {dt}{list(shape)}")
            if not out.flags.writeable:
                ch.discard_frame()
                raise ValueError("out is read-only")
            direct = out.flags.c_contiguous if order == "C" else out.flags.f_contiguous
            if direct:
                self._recv_payload(ch, out, nbytes)
            else:
                tmp = np.empty(shape, dt, order=order)
                self._recv_payload(ch, tmp, nbytes)
                out[...] = tmp
            return out
        m = memoryview(out)
        if m.nbytes != nbytes or (kind == 1 and m.format != tname) or tuple(m.shape) != tuple(shape):  # type: ignore[arg-type]
            ch.discard_frame()
            raise ValueError(f"out does not match the message ({tname}{list(shape)})")
        self._recv_payload(ch, out, nbytes)
        return out

    def _recv_payload(self, ch: _Channel, target: Any, nbytes: int) -> None:
        if _zc._np is not None and isinstance(target, _zc._np.ndarray):
            target = _zc.byte_view(target)
        try:
            n = ch.recv_frame_into(target)
        except BufferTooShort:
            raise ProtocolError("array payload is larger than its header says") from None
        if n != nbytes:
            raise ProtocolError(f"array payload of {n} bytes, header said {nbytes}")

    def send_fds(self, fds: Iterable[SupportsInt], data: Buffer = b"") -> None:
        """Send open file descriptors with a message (AF_UNIX connections only).

        The descriptors ride as SCM_RIGHTS on this message's own bytes; the
        caller keeps its copies open. A stdlib peer sees an ordinary message.
        """
        self._sender().send_frame_fds(data, fds)

    def recv_fds(self, maxfds: int = 253) -> tuple[bytes, list[int]]:
        """Receive a message and the descriptors sent with it: ``(data, fds)``.

        The descriptors are new, close-on-exec, and the caller's to close.
        They stay matched to their own message even when others arrived
        first. Descriptors that came with a message received another way are
        closed. More than ``maxfds`` closes them all and raises ProtocolError.
        """
        ch = self._receiver()
        try:
            return ch.recv_frame_fds(maxfds)
        except (ProtocolError, MessageTooLarge):
            self._fail()
            raise

    def poll(self, timeout: float | None = 0.0) -> bool:
        """True if there is data to receive, waiting up to ``timeout`` seconds (None: forever).

        A negative timeout is 0, as in the stdlib.
        """
        if timeout is not None and timeout < 0:
            timeout = 0.0
        return self._receiver().poll(timeout)


def reduce_connection(conn: Connection) -> tuple[Callable[..., Connection], tuple[Any, ...]]:
    """Pickle a Connection as multiprocessing does: a duplicated descriptor.

    Registered with ``multiprocessing.reduction``, so a Connection can be an
    argument of a spawn or forkserver Process and be sent over a connection.
    The copy has the same readable/writable, max_message_size, readahead,
    coalesce, spin and shm options; queued messages are flushed first. Refused (ValueError) while bytes read ahead are buffered, which a copy
    would silently lose, and for a TLS connection, whose session state
    cannot travel.
    """
    ch = conn._ch
    if ch is None:
        raise OSError("handle is closed")
    if isinstance(conn._sock, ssl.SSLSocket):
        raise ValueError("a TLS connection cannot be pickled: its session state stays in this process")
    ch.flush()  # queued messages leave before a copy of the connection exists
    if ch.buffered() or ch.pending_fds():
        raise ValueError(
            f"cannot pickle a Connection holding {ch.buffered()} bytes and {ch.pending_fds()} "
            "descriptors received ahead of the next message: the copy would lose them "
            "(receive them first, or use readahead=False)")
    df = _reduction.DupFd(conn.fileno())
    return rebuild_connection, (df, conn.readable, conn.writable, conn.max_message_size, conn.readahead,
                                conn.coalesce, conn.spin, conn.shm)


def rebuild_connection(df: Any, readable: bool, writable: bool, max_message_size: int | None,
                       readahead: bool, coalesce: int = 0, spin: float = 0.0, shm: bool = False) -> Connection:
    """Rebuild a Connection pickled by :func:`reduce_connection`."""
    return Connection(df.detach(), readable, writable, max_message_size=max_message_size,
                      readahead=readahead, coalesce=coalesce, spin=spin, shm=shm)


_reduction.register(Connection, reduce_connection)


class Listener:
    """A listening socket that accepts authenticated Connections.

    ``Listener(address=None, family=None, backlog=1, authkey=None)`` as in
    multiprocessing; ``handshake_timeout`` bounds a new peer's handshake so a
    silent one cannot hold ``accept()``; ``strict=True`` refuses HMAC-MD5
    peers; ``max_message_size`` applies to accepted connections.
    ``nodelay`` (default True) sets TCP_NODELAY on accepted TCP connections;
    ``keepalive`` (seconds) detects accepted peers that vanish; see :func:`Client`.
    ``readahead``, ``coalesce``, ``spin`` and ``shm`` apply to accepted
    connections (see :class:`Connection`).
    An AF_UNIX socket file is removed by ``close()``, or at process exit (or
    when the Listener is collected) if it was never closed, as in the stdlib.
    ``ssl_context`` (an ``ssl.SSLContext``, see
    :func:`fastnet.tls.server_context`) runs TLS on accepted connections, its
    handshake bounded by ``handshake_timeout``; the authkey handshake, if
    any, then runs inside TLS.
    """

    def __init__(self, address: Address | None = None, family: str | int | None = None, backlog: int = 1,
                 authkey: bytes | None = None, *,
                 handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
                 max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE, strict: bool = False,
                 digest: str | None = "sha256", nodelay: bool = True,
                 ssl_context: ssl.SSLContext | None = None, keepalive: float | None = None,
                 readahead: bool = False, coalesce: bool | int = False, spin: float = 0.0,
                 shm: bool = False) -> None:
        if authkey is not None and not isinstance(authkey, bytes):
            raise TypeError("authkey should be a byte string")
        keepalive = _keepalive_seconds(keepalive)
        if address is None:
            address = arbitrary_address(family or "AF_UNIX")
        fam, addr = parse_address(address, family)
        sock = socket.socket(fam, socket.SOCK_STREAM)
        self._unlink: _util.Finalize | None = None
        try:
            if fam != socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            _bind(sock, addr)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        if fam == socket.AF_UNIX and addr[:1] not in ("\0", b"\0"):
            # as the stdlib: the path goes at close(), or at exit (or when
            # this Listener is collected) if it is never closed; only in
            # the process that bound it, never in a forked child
            self._unlink = _util.Finalize(self, _unlink_path, args=(addr,), exitpriority=0)
        self._socket: socket.socket | None = sock
        self._family = fam
        name = sock.getsockname()
        if isinstance(name, bytes):
            name = name.decode("utf-8", "surrogateescape")
        self._address = name
        self._last_accepted: Any = None
        self._authkey = authkey
        self._handshake_timeout = handshake_timeout
        self._max_message_size = max_message_size
        self._strict = strict
        self._digest = digest
        self._nodelay = nodelay
        self._keepalive = keepalive
        self._ssl_context = ssl_context
        self._readahead = readahead
        self._coalesce, self._spin, self._shm = _coalesce_limit(coalesce), _spin_us(spin), shm

    def accept(self) -> Connection:
        """Accept a connection; run the TLS handshake with an ssl_context, then the authkey one.

        A failed or timed-out handshake closes that socket and raises
        AuthenticationError or TimeoutError; the Listener keeps working.
        """
        if self._socket is None:
            raise OSError("listener is closed")
        s, self._last_accepted = _accept(self._socket, self._family)
        if isinstance(self._last_accepted, bytes):
            self._last_accepted = self._last_accepted.decode("utf-8", "surrogateescape")
        try:
            _tune(s, self._nodelay, self._keepalive)
        except BaseException:
            s.close()
            raise
        factory: Callable[[socket.socket, int | None, int], _Channel] | None = None
        if self._ssl_context is not None:
            s = _tls_wrap(self._ssl_context, s, self._handshake_timeout, server_side=True)
            factory = _tls_channel
        try:
            c = Connection(s, max_message_size=self._max_message_size, readahead=self._readahead,
                           _channel_factory=factory, coalesce=self._coalesce, spin=self._spin, shm=self._shm)
        except BaseException:
            s.close()
            raise
        if self._authkey is not None:
            try:
                _auth.server_authenticate(c, self._authkey, strict=self._strict,
                                          timeout=self._handshake_timeout, digest_name=self._digest)
            except BaseException:
                c.close()
                raise
        return c

    def close(self) -> None:
        """Close the listening socket (and remove its AF_UNIX path)."""
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()
            unlink, self._unlink = self._unlink, None
            if unlink is not None:
                unlink()

    @property
    def address(self) -> Any:
        """The bound address (with the real port when 0 was asked for)."""
        return self._address

    @property
    def last_accepted(self) -> Any:
        """The peer address of the last accepted connection."""
        return self._last_accepted

    @property
    def url(self) -> str:
        """The bound address as a ``tcp://`` or ``unix://`` URL."""
        return format_address(self._family, self._address)

    def fileno(self) -> int:
        """The listening socket's descriptor."""
        return self._socket.fileno()  # type: ignore[union-attr]  # AttributeError once closed

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<fastnet.Listener {self.url}{'' if self._socket else ' closed'}>"


def _unlink_path(path: str | bytes) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _accept(lsock: socket.socket, fam: int) -> tuple[socket.socket, Any]:
    """``lsock.accept()``, without making enum members of the family and type for every connection."""
    fd, addr = lsock._accept()  # type: ignore[attr-defined]
    s = socket.socket(fam, socket.SOCK_STREAM, 0, fd)
    if socket.getdefaulttimeout() is None and lsock.gettimeout():
        s.setblocking(True)     # as socket.accept: a timeout on the listener is not inherited
    return s, addr


def _connect_tcp(addr: tuple[Any, ...], timeout: float | None) -> socket.socket:
    """``socket.create_connection(addr[:2], timeout)``; a numeric IPv4 host is connected to directly.

    create_connection resolves even a literal address through getaddrinfo,
    whose IDNA encoding of the host costs more than the rest of a connect.
    """
    host = addr[0]
    try:
        _inet_pton(socket.AF_INET, host)
    except (OSError, TypeError):
        return socket.create_connection(addr[:2], timeout)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect((host, addr[1]))
    except BaseException:
        s.close()
        raise
    return s


def _connect_unix(addr: str | bytes, timeout: float | None) -> socket.socket:
    """Connect an AF_UNIX stream socket, waiting up to ``timeout`` for a full backlog.

    A non-blocking AF_UNIX connect to a listener whose backlog is full fails
    at once with EAGAIN (there is no EINPROGRESS to wait on), so a socket
    timeout would not wait at all; a blocking connect bounded by SO_SNDTIMEO
    waits in the kernel until the listener accepts or the time is up.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if timeout is None:
            s.connect(addr)
            return s
        sec = int(max(timeout, 0.0))
        usec = max(int((timeout - sec) * 1e6), 0 if sec else 1)  # 0 would mean forever
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("@ll", sec, usec))
        try:
            s.connect(addr)
        except BlockingIOError:
            raise socket.timeout("timed out") from None
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("@ll", 0, 0))
        return s
    except BaseException:
        s.close()
        raise


def Client(address: Address, family: str | int | None = None, authkey: bytes | None = None, *,
           timeout: float | None = None, max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
           strict: bool = False, digest: str | None = "sha256", nodelay: bool = True,
           ssl_context: ssl.SSLContext | None = None, keepalive: float | None = None,
           readahead: bool = False, coalesce: bool | int = False, spin: float = 0.0,
           shm: bool = False) -> Connection:
    """Connect to a Listener (fastnet's or the stdlib's) and return a Connection.

    ``timeout`` bounds the connect and the handshake together. Over TCP,
    ``nodelay=True`` (TCP_NODELAY) sends every message at once: request/reply
    traffic never waits on Nagle's algorithm and delayed ACKs (the 40 ms
    stalls of multiprocessing's handshake). A one-way stream of many small
    ``send_bytes`` calls is not made faster by ``nodelay=False``: each call
    is still one syscall, and Nagle's algorithm holds back every write made
    while data is unacknowledged, so the sender then waits on the receiver's
    acknowledgements. ``coalesce=True`` (see :meth:`Connection.coalescing`)
    and ``send_many`` coalesce in user space, before the syscall.

    ``readahead=True`` lets receives read beyond the message they return
    (see :class:`Connection`); it is the natural partner of a coalescing
    sender, as it takes many messages per read. ``spin`` (microseconds)
    and ``shm`` as for :class:`Connection`.

    ``keepalive=seconds`` (TCP) detects a server whose host vanished without
    closing the connection: after about that long the next receive or send
    raises ``OSError`` instead of waiting for ever (see :func:`set_keepalive`).
    Off by default, as in the stdlib.

    ``ssl_context`` (an ``ssl.SSLContext``, see :func:`fastnet.tls.client_context`)
    runs TLS, verifying the server's certificate for the host connected to;
    over AF_UNIX there is no host name, so the context must have
    ``check_hostname`` off. A refused certificate raises AuthenticationError.
    """
    if authkey is not None and not isinstance(authkey, bytes):
        raise TypeError("authkey should be a byte string")
    keepalive = _keepalive_seconds(keepalive)
    spin, coalesce = _spin_us(spin), _coalesce_limit(coalesce)
    fam, addr = parse_address(address, family)
    if ssl_context is not None and fam == socket.AF_UNIX and ssl_context.check_hostname:
        raise ValueError("TLS over AF_UNIX has no host name to check: "
                         "use an ssl_context with check_hostname=False")
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        if fam == socket.AF_UNIX:
            s = _connect_unix(addr, timeout)
        else:
            s = _connect_tcp(addr, timeout)
    except socket.timeout:
        raise TimeoutError(f"connecting to {address!r} timed out") from None
    try:
        _tune(s, nodelay, keepalive)
    except BaseException:
        s.close()
        raise
    factory: Callable[[socket.socket, int | None, int], _Channel] | None = None
    if ssl_context is not None:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        host = None if fam == socket.AF_UNIX else addr[0]
        s = _tls_wrap(ssl_context, s, left, server_hostname=host)
        factory = _tls_channel
    try:
        c = Connection(s, max_message_size=max_message_size, readahead=readahead, _channel_factory=factory,
                       coalesce=coalesce, spin=spin, shm=shm)
    except BaseException:
        s.close()
        raise
    if authkey is not None:
        try:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            _auth.client_authenticate(c, authkey, strict=strict, timeout=left, digest_name=digest)
        except BaseException:
            c.close()
            raise
    return c


def Pipe(duplex: bool = True, *, max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
         readahead: bool = False, coalesce: bool | int = False, spin: float = 0.0,
         shm: bool = False) -> tuple[Connection, Connection]:
    """Return a pair of connected Connections (``(reader, writer)`` if not duplex).

    ``readahead``, ``coalesce``, ``spin`` and ``shm`` as for :class:`Connection`.
    """
    a, b = socket.socketpair()
    kw: dict[str, Any] = dict(max_message_size=max_message_size, readahead=readahead, coalesce=coalesce,
                              spin=_spin_us(spin), shm=shm)
    try:
        if duplex:
            return Connection(a, **kw), Connection(b, **kw)
        a.shutdown(socket.SHUT_WR)
        b.shutdown(socket.SHUT_RD)
        return Connection(a, writable=False, **kw), Connection(b, readable=False, **kw)
    except BaseException:
        a.close()
        b.close()
        raise


def wait(object_list: Iterable[Any], timeout: float | None = None) -> list[Any]:
    """Wait until an object in ``object_list`` is ready; return the ready ones.

    Objects are Connections, sockets, or anything with ``fileno()``, or ints.
    A Connection with a message already buffered is ready at once, though its
    socket may have nothing more to read.
    """
    object_list = list(object_list)
    for o in object_list:
        if isinstance(o, Connection) and o._ch is not None:
            o._ch.flush()   # queued messages leave before waiting on the peer
    ready = [o for o in object_list
             if isinstance(o, Connection) and o._ch is not None and o._ch.buffered() > 0]
    poller = select.poll()
    fdmap: dict[int, list[Any]] = {}
    for o in object_list:
        fd = o if isinstance(o, int) else o.fileno()
        fdmap.setdefault(fd, []).append(o)
        poller.register(fd, select.POLLIN)
    if ready:
        timeout = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        ms = None if deadline is None else max(0.0, (deadline - time.monotonic()) * 1000.0)
        events = poller.poll(ms)
        if events or ready or (deadline is not None and time.monotonic() >= deadline):
            break
    seen = set(map(id, ready))
    for fd, _ in events:
        for o in fdmap[fd]:
            if id(o) not in seen:
                seen.add(id(o))
                ready.append(o)
    return ready
