"""TLS for Connections and for the event loop.

Blocking: ``Listener(..., ssl_context=server_context(...))`` and
``Client(..., ssl_context=client_context(...))`` frame over an
``ssl.SSLSocket`` with :class:`TLSChannel`. Descriptors cannot be passed
over TLS.

Non-blocking: :class:`TLSTransport` runs a framed protocol on the event loop
over an ``ssl.SSLObject`` between two ``ssl.MemoryBIO``s, so the socket
stays non-blocking and the loop only ever waits for readiness: a peer that
stalls in the middle of its handshake costs one timer and one descriptor,
never the loop. The frames inside the TLS stream are the same as on a plain
socket, and an optional authkey handshake runs inside TLS before the
protocol hears of the connection, so a blocking ``fastnet.Client(...,
authkey=..., ssl_context=...)`` talks to a loop server and back.
"""
from __future__ import annotations

import collections
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol, SupportsIndex, SupportsInt, runtime_checkable

from fastnet._kernels import framing as _framing
from fastnet._kernels import reactor as _reactor
from fastnet.defaults import HANDSHAKE_TIMEOUT as DEFAULT_HANDSHAKE_TIMEOUT
from fastnet.defaults import MAX_MESSAGE_SIZE_CONNECTION as DEFAULT_MAX_MESSAGE_SIZE
from fastnet.handshake import Handshake, HandshakeReader
from fastnet.errors import (AuthenticationError, MessageTooLarge, ProtocolError,
                            TimeoutError as FastnetTimeout, TruncatedFrameError)

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["TLSChannel", "TLSTransport", "server_context", "client_context"]

_encode_header = _framing.encode_header
_COPY_THRESHOLD = _framing.COPY_THRESHOLD


def _tls_error(e: BaseException) -> AuthenticationError:
    return AuthenticationError(f"TLS error: {e}")


def _tls_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a Channel method so that an ssl.SSLError surfaces as AuthenticationError."""
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except ssl.SSLError as e:
            # in TLS 1.3 a client learns only on a receive that its certificate was refused
            raise _tls_error(e) from e
    call.__name__ = method.__name__
    call.__doc__ = method.__doc__
    return call


class TLSChannel(_framing.Channel):
    """The active kernels' Channel over a blocking ``ssl.SSLSocket``, which carries its bytes (``io``).

    A TLS error is an AuthenticationError; descriptors cannot be passed over TLS.
    """

    def __init__(self, sock: socket.socket, max_size: SupportsInt | None = None,
                 bufsize: SupportsIndex = 262144) -> None:
        super().__init__(sock, max_size, bufsize, io=sock)

    recv_frame = _tls_errors(_framing.Channel.recv_frame)
    recv_frame_peeking = _tls_errors(_framing.Channel.recv_frame_peeking)
    recv_frames = _tls_errors(_framing.Channel.recv_frames)
    recv_frame_into = _tls_errors(_framing.Channel.recv_frame_into)
    discard_frame = _tls_errors(_framing.Channel.discard_frame)
    send_frame = _tls_errors(_framing.Channel.send_frame)
    send_frames = _tls_errors(_framing.Channel.send_frames)
    poll = _tls_errors(_framing.Channel.poll)
    flush = _tls_errors(_framing.Channel.flush)

    def send_frame_fds(self, buf: Buffer, fds: Iterable[SupportsInt]) -> None:
        raise ValueError("descriptors cannot be passed over TLS")

    def recv_frame_fds(self, maxfds: SupportsIndex = 253, timeout: float | None = None,
                       maxlength: SupportsInt | None = None) -> tuple[bytes, list[int]]:
        raise ValueError("descriptors cannot be passed over TLS")


def server_context(certfile: str, keyfile: str | None, cafile: str | None = None,
                   require_client_cert: bool = False) -> ssl.SSLContext:
    """An ``ssl.SSLContext`` for a Listener or a server: TLS 1.2+, this certificate and key.

    With ``cafile``, client certificates are verified against it when
    presented; ``require_client_cert=True`` refuses clients without one
    (mutual TLS).
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # No TLS 1.3 session tickets: fastnet's clients never resume a session,
    # and tickets a client never reads (one that only sends, then closes)
    # turn its close into a connection reset.
    ctx.num_tickets = 0
    ctx.load_cert_chain(certfile, keyfile)
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif cafile is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(cafile: str | None = None, certfile: str | None = None, keyfile: str | None = None,
                   check_hostname: bool = True) -> ssl.SSLContext:
    """An ``ssl.SSLContext`` for a Client: TLS 1.2+, the server's certificate always verified.

    ``cafile`` (default: the system's CAs) is what the server's certificate
    must chain to; ``certfile``/``keyfile`` are this client's certificate
    for mutual TLS. ``check_hostname=False`` is needed over AF_UNIX.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    if certfile is not None:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


# -- TLS on the event loop ---------------------------------------------------------

_HANDSHAKE, _AUTH, _OPEN = range(3)

_RETRY = (BlockingIOError, InterruptedError)
# Ciphertext read per readiness event; one buffer per thread serves every
# transport the thread's loop runs, as the reactor's shared receive buffer does.
_RECV_SIZE = 262144
# Plaintext encrypted per SSLObject.write: big enough that records are full
# (16 KiB each), small enough that a huge frame is encrypted as the socket
# drains instead of all at once into memory.
_CHUNK = 262144
_DECODER_BUFSIZE = 32768
# A record carries at most 16 KiB of plaintext: room for one more per read.
_READ_HINT = 16384
_IOV_MAX = 1024

_local = threading.local()


def _recv_view() -> memoryview:
    v = getattr(_local, "view", None)
    if v is None:
        v = _local.view = memoryview(bytearray(_RECV_SIZE))
    return v


@runtime_checkable
class TransportRegistry(Protocol):
    """A loop that keeps its TLS transports (fastnet's EventLoop does): it lists
    them among its transports and closes those still open when it closes."""

    def _transport_opened(self, transport: TLSTransport) -> None: ...

    def _transport_closed(self, transport: TLSTransport) -> None: ...


class TLSTransport(_reactor.TransportBase):
    """Framed messages over TLS on an event loop, without ever blocking it.

    ``TLSTransport(loop, sock, protocol, ssl_context, *, server_side=False,
    server_hostname=None, authkey=None, handshake_timeout=10.0,
    max_message_size=1 GiB, high_water=None, low_water=None, strict=False,
    digest="sha256", on_fail=None, on_ready=None)``; usually made by
    ``EventLoop.add_stream(..., ssl_context=...)``, ``create_server`` or
    ``connect``. The transport owns ``sock`` (made non-blocking).

    The TLS handshake runs first, then with ``authkey`` multiprocessing's
    mutual authkey handshake inside TLS (the same bytes as
    ``fastnet.auth``), both bounded together by ``handshake_timeout``. Only
    then is ``protocol.connection_made(transport)`` called, and
    ``on_ready(transport)`` after it. A connection that never got there
    gets no ``connection_lost``: ``on_fail(exc)`` is called instead, with
    an AuthenticationError (a refused certificate or key, any TLS error),
    a TimeoutError, or None when ``close()``/``abort()`` ended the handshake.

    Once open it behaves as :class:`fastnet.loop.FramedTransport`, whose
    base (the active kernels' ``TransportBase``) it shares: the same
    methods, flow control, counters (``bytes_*`` count plaintext frame
    bytes, headers included) and callbacks. The write buffer's size counts
    plaintext not yet encrypted and ciphertext not yet sent. ``close()``
    sends what is queued and a TLS close_notify before closing; during the
    handshakes it closes at once (``on_fail(None)``). ``get_extra_info``
    also knows "peercert", "cipher", "ssl_object", "sslcontext" and
    "compression".
    """

    # Slotted, as TransportBase is (C fields compiled, __slots__ pure): an
    # instance of a Python subclass of the compiled base would get its
    # __dict__ without CPython 3.11's inline values (Cython's tp_new is not
    # object's), and the specializing interpreter then specializes no
    # attribute access on it at all (measured: each about 4x slower).
    # __dict__ and __weakref__ keep what a plain class allows.
    __slots__ = ("_authkey", "_cq", "_cq_off", "_decoder", "_digest", "_drain_scheduled",
                 "_handshake_timeout", "_hs", "_hs_reader", "_incoming", "_made", "_on_fail",
                 "_on_message", "_on_ready", "_outgoing", "_reading", "_server_side", "_sock_eof",
                 "_sslobj", "_state", "_strict", "_timer", "_tls_eof", "_tls_shut", "_wq", "_wq_off",
                 "_writing", "messages_received", "messages_sent", "bytes_received", "bytes_sent",
                 "__dict__", "__weakref__")

    def __init__(self, loop: _reactor.Reactor, sock: socket.socket, protocol: Any, ssl_context: ssl.SSLContext, *,
                 server_side: bool = False, server_hostname: str | None = None,
                 authkey: bytes | None = None, handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
                 max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE, high_water: int | None = None,
                 low_water: int | None = None, strict: bool = False, digest: str | None = "sha256",
                 on_fail: Callable[[BaseException | None], object] | None = None,
                 on_ready: Callable[[TLSTransport], object] | None = None) -> None:
        if authkey is not None and not isinstance(authkey, bytes):
            raise TypeError("authkey should be a byte string")
        if not isinstance(ssl_context, ssl.SSLContext):
            raise TypeError(f"ssl_context must be an ssl.SSLContext, not {type(ssl_context).__name__}")
        if on_fail is not None and not callable(on_fail):
            raise TypeError("on_fail must be callable")
        self._on_message: Callable[[bytes], object] = protocol.message_received
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._sslobj = ssl_context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                            server_hostname=server_hostname)
        self._setup(loop, sock, sock.fileno(), protocol, max_message_size, high_water, low_water)
        self._server_side = server_side
        self._authkey = authkey
        self._strict = strict
        self._digest = digest
        self._handshake_timeout = handshake_timeout
        self._on_fail = on_fail
        self._on_ready = on_ready
        self._state = _HANDSHAKE
        self._made = False
        self._decoder: _framing.FrameDecoder | None = None
        # _wq_bytes (TransportBase's) counts the bytes of both queues
        self._wq: collections.deque[bytes | memoryview] = collections.deque()      # plaintext not yet encrypted
        self._wq_off = 0
        self._cq: collections.deque[bytes] = collections.deque()      # ciphertext not yet taken by the kernel
        self._cq_off = 0
        self._reading = self._writing = False
        self._sock_eof = False              # recv() returned 0
        self._tls_eof = False
        self._tls_shut = False              # close_notify produced
        self._drain_scheduled = False
        self._timer: _reactor.TimerHandle | None = None
        # the authkey handshake (fastnet.handshake), inside TLS
        self._hs: Handshake | None = None
        self._hs_reader: HandshakeReader | None = None
        self.messages_received = self.messages_sent = 0
        self.bytes_received = self.bytes_sent = 0
        sock.setblocking(False)
        self._reading_changed()      # may refuse the descriptor (select's FD_SETSIZE): nothing to undo
        if isinstance(loop, TransportRegistry):
            loop._transport_opened(self)
        if handshake_timeout is not None:
            self._timer = loop.call_later(handshake_timeout, self._expired)
        self._guard(self._handshake)

    # -- plumbing -----------------------------------------------------------

    def _guard(self, fn: Callable[..., object], *args: Any) -> None:
        """Run a step; an unexpected error closes this transport, not the loop."""
        try:
            fn(*args)
        except Exception as exc:
            if self._closed:
                raise
            self._report(exc, "exception in TLS transport")
            self._finalize(exc)

    def _reading_changed(self) -> None:
        want = not (self._closed or self._sock_eof) and (self._state != _OPEN or self._reading_wanted)
        if want != self._reading:
            if want:
                self._loop.add_reader(self._fd, self._on_readable)
            else:
                self._loop.remove_reader(self._fd)
            self._reading = want

    def _set_writing(self, want: bool) -> None:
        if want != self._writing and not self._closed:
            if want:
                self._loop.add_writer(self._fd, self._on_writable)
            else:
                self._loop.remove_writer(self._fd)
            self._writing = want

    def _take_output(self) -> None:
        """Move what the SSL object wrote (records, alerts, close_notify) to the send queue."""
        if self._outgoing.pending:
            data = self._outgoing.read()
            if not self._cq:
                self._cq_off = 0
            self._cq.append(data)
            self._wq_bytes += len(data)

    # -- reading ------------------------------------------------------------

    def _on_readable(self) -> None:
        if self._closed:
            return
        view = _recv_view()
        try:
            n = self._sock.recv_into(view)
        except _RETRY:
            return
        except OSError as exc:
            self._finalize(exc)
            return
        if n:
            self._incoming.write(view[:n])
        else:
            self._incoming.write_eof()
            self._sock_eof = True
            self._reading_changed()
        try:
            if self._state == _OPEN:
                self._read_app()
            elif self._state == _AUTH:
                self._auth_read()
            else:
                self._handshake()
        except Exception as exc:
            if self._closed:
                raise
            self._report(exc, "exception in TLS transport")
            self._finalize(exc)

    def _read_app(self) -> None:
        d = self._decoder
        assert d is not None
        while self._reading_wanted:
            try:
                frame = d.next_frame()
            except (ProtocolError, MessageTooLarge) as exc:
                self._finalize(exc)
                return
            if frame is not None:
                self.messages_received += 1
                self._deliver(frame)
                continue
            r = self._decrypt(d)
            if r > 0:
                continue
            if r < 0:
                self._on_eof()
                return
            break
        if not self._closed:
            # reading may have produced records to send (a TLS 1.3 key update)
            self._take_output()
            if self._cq and not self._writing:
                self._pump()

    def _decrypt(self, d: _framing.FrameDecoder) -> int:
        """Decrypt into the decoder: 1 if bytes came, 0 if more ciphertext is needed, -1 at EOF."""
        if self._tls_eof:
            return -1
        incoming = self._incoming
        sslobj = self._sslobj
        if not incoming.pending and not incoming.eof and not sslobj.pending():
            return 0        # nothing to decrypt: spare the SSLWantReadError
        try:
            region = d.get_buffer(_READ_HINT)
        except (ProtocolError, MessageTooLarge) as exc:
            # a header over max_message_size: refused before allocating its payload
            self._finalize(exc)
            return 0
        size = len(region)
        got = 0
        err: ssl.SSLError | None = None
        read: Callable[[int, memoryview], int] = sslobj.read  # type: ignore[assignment]  # into a buffer: a count
        try:
            while got < size:
                if got:
                    if not incoming.pending and not incoming.eof and not sslobj.pending():
                        break
                    with region[got:] as rest:
                        n = read(size - got, rest)
                else:
                    n = read(size, region)
                if n == 0:
                    self._tls_eof = True
                    break
                got += n
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            # a peer that closes without close_notify (as a blocking SSLSocket
            # does) ends its stream like any other: truncation is the decoder's to judge
            self._tls_eof = True
        except ssl.SSLError as e:
            err = e
        finally:
            region.release()
        if got:
            d.buffer_updated(got)
            self.bytes_received += got
        if err is not None:
            tls_exc = _tls_error(err)
            tls_exc.__cause__ = err
            self._finalize(tls_exc)
            return 0
        if got:
            return 1
        return -1 if self._tls_eof else 0

    def _deliver(self, frame: bytes) -> None:
        try:
            self._on_message(frame)
        except Exception as exc:
            self._report(exc, "exception in message_received")
            self._finalize(exc)

    def _on_eof(self) -> None:
        self._eof = True
        try:
            assert self._decoder is not None
            self._decoder.eof()
        except TruncatedFrameError as exc:
            self._finalize(exc)
            return
        # answer with our close_notify once what is queued is sent (a peer
        # in SSLSocket.unwrap() waits for it); _pump then closes
        self._closing = True
        self._reading_changed()
        self._pump()

    def _drain_later(self) -> None:
        self._drain_scheduled = False
        if not self._closed and self._state == _OPEN and self._reading_wanted:
            self._guard(self._read_app)
            if not self._closed:
                self._reading_changed()

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled and not self._closed and self._state == _OPEN:
            self._drain_scheduled = True
            self._loop.call_soon(self._drain_later)

    # -- the handshakes -----------------------------------------------------

    def _handshake(self) -> None:
        try:
            self._sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._take_output()
            self._pump()
            return
        except ssl.SSLError as e:
            exc = AuthenticationError(f"TLS handshake failed: {e}")
            exc.__cause__ = e
            self._fail(exc)
            return
        self._take_output()
        if self._authkey is None:
            self._pump()
            if not self._closed:
                self._ready()
            return
        self._state = _AUTH
        self._hs = Handshake(self._authkey, self._server_side, strict=self._strict, digest=self._digest)
        self._hs_reader = HandshakeReader()
        self._write_plain(self._hs.start())
        self._pump()
        if not self._closed:
            self._auth_read()

    def _write_plain(self, payloads: list[bytes]) -> None:
        """Encrypt handshake frames (sent by the next _pump)."""
        if payloads:
            self._sslobj.write(b"".join([x for p in payloads for x in (_encode_header(len(p)), p)]))
            self._take_output()

    def _auth_read(self) -> None:
        try:
            while self._state == _AUTH:
                frame = self._auth_frame()
                if frame is None:
                    break
                self._auth_advance(frame)
        except (AuthenticationError, EOFError) as exc:
            self._fail(exc)
            return
        except ssl.SSLError as e:
            tls_exc = _tls_error(e)
            tls_exc.__cause__ = e
            self._fail(tls_exc)
            return
        if self._closed:
            return
        self._pump()
        if self._state == _OPEN and not self._closed:
            self._ready()

    def _auth_frame(self) -> bytes | None:
        """The next handshake frame, read exactly so what follows stays for the protocol."""
        reader = self._hs_reader
        assert reader is not None
        while True:
            try:
                chunk = self._sslobj.read(reader.want())
            except ssl.SSLWantReadError:
                return None
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                chunk = b""
            if not chunk:
                raise reader.eof()
            frame = reader.feed(chunk)
            if frame is not None:
                return frame

    def _auth_advance(self, frame: bytes) -> None:
        hs = self._hs
        assert hs is not None     # the authkey handshake runs only with a key
        self._write_plain(hs.receive(frame))
        if hs.error is not None:
            raise hs.error
        if hs.done:
            self._state = _OPEN

    def _fail(self, exc: BaseException) -> None:
        """End a handshake: send what is queued (an alert, a FAILURE frame) if the kernel
        takes it at once, so the peer learns why, then close."""
        if self._closed:
            return
        try:
            self._take_output()
            if self._cq:
                data = b"".join(self._cq)
                self._sock.send(memoryview(data)[self._cq_off:])
        except (OSError, ssl.SSLError):
            pass
        self._finalize(exc)

    def _expired(self) -> None:
        self._timer = None
        if not self._made:
            self._finalize(FastnetTimeout(
                f"TLS handshake not finished in {self._handshake_timeout} s"))

    def _ready(self) -> None:
        self._state = _OPEN
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._decoder = _framing.FrameDecoder(self.max_message_size, _DECODER_BUFSIZE)
        self._made = True
        made = getattr(self.protocol, "connection_made", None)
        if made is not None:
            try:
                made(self)
            except Exception as exc:
                self._report(exc, "exception in connection_made")
                self._finalize(exc)
                return
        if self._on_ready is not None and not self._closed:
            try:
                self._on_ready(self)
            except Exception as exc:
                self._report(exc, "exception in on_ready")
        if self._closed:
            return
        self._pump()
        if not self._closed:
            self._reading_changed()
            # application data that came behind the handshake
            self._read_app()

    # -- writing ------------------------------------------------------------

    def send_bytes(self, data: Buffer) -> None:
        """Send one frame holding the bytes of ``data`` (any contiguous buffer)."""
        if self._closing or self._closed:
            raise ConnectionError("send on a closed transport")
        if type(data) is not bytes:
            data = memoryview(data)
            if not data.contiguous:
                raise BufferError("memoryview: underlying buffer is not contiguous")
            data = data.cast("B") if data.ndim != 1 or data.format != "B" else data
        n = len(data)
        self.messages_sent += 1
        if n <= _COPY_THRESHOLD:
            buf = _encode_header(n) + data
            if self._state == _OPEN and not self._wq and not self._cq:
                self._send_now(buf)
            else:
                self._enqueue(buf)
                self._pump()
                self._check_high()
            return
        self._enqueue(_encode_header(n))
        self._enqueue(data)
        if not self._cq:
            self._pump()
        if type(data) is not bytes and self._wq and self._wq[-1] is data:
            # the caller may reuse its buffer once we return: keep a copy of the rest
            if len(self._wq) == 1:
                self._wq[0] = bytes(data[self._wq_off:])
                self._wq_off = 0
            else:
                self._wq[-1] = bytes(data)
        self._check_high()

    def send_many(self, buffers: Iterable[Buffer]) -> None:
        """Send each buffer of ``buffers`` as its own frame, in one write when they fit.

        As FramedTransport's: large buffers other than bytes are encrypted
        from their own memory, not copied; leave them unchanged until sent.
        """
        if self._closing or self._closed:
            raise ConnectionError("send on a closed transport")
        items = [_reactor.as_frame(b) for b in buffers]
        if not items:
            return
        self.messages_sent += len(items)
        total = sum(len(b) + (4 if len(b) <= 0x7fffffff else 12) for b in items)
        if total <= _COPY_THRESHOLD:
            buf = b"".join([x for b in items for x in (_encode_header(len(b)), b)])
            if self._state == _OPEN and not self._wq and not self._cq:
                self._send_now(buf)
            else:
                self._enqueue(buf)
                self._pump()
                self._check_high()
            return
        for b in items:
            self._enqueue(_encode_header(len(b)))
            if b:
                self._enqueue(b)
        if not self._cq:
            self._pump()
        self._check_high()

    def _send_now(self, buf: bytes) -> None:
        """Encrypt and send one small buffer; queue only what the kernel did not take."""
        try:
            self._sslobj.write(buf)
        except ssl.SSLError as e:
            exc = _tls_error(e)
            exc.__cause__ = e
            self._finalize(exc)
            return
        self.bytes_sent += len(buf)
        out = self._outgoing.read()
        try:
            r = self._sock.send(out)
        except _RETRY:
            r = 0
        except OSError as exc:
            self._finalize(exc)
            return
        if r < len(out):
            self._cq.append(out)
            self._cq_off = r
            self._wq_bytes += len(out) - r
            self._set_writing(True)
            self._check_high()

    def _enqueue(self, b: bytes | memoryview) -> None:
        if not self._wq:
            self._wq_off = 0
        self._wq.append(b)
        self._wq_bytes += len(b)

    def _on_writable(self) -> None:
        if not self._closed:
            self._guard(self._pump)

    def _pump(self) -> None:
        """Send queued ciphertext, encrypting queued plaintext while the kernel takes it."""
        while not self._closed:
            if self._cq:
                if not self._send_queued():
                    return
                continue
            if self._wq and self._state == _OPEN and not self._tls_shut:
                if not self._encrypt_chunk():
                    return
                continue
            self._set_writing(False)
            self._check_low()
            if self._closing and self._made and not self._wq and not self._closed:
                if self._tls_shut:
                    self._discard_input()
                    self._finalize(None)
                    return
                self._tls_shut = True
                try:
                    self._sslobj.unwrap()
                except (ssl.SSLError, ValueError):
                    pass    # close_notify is written; we do not wait for the peer's
                self._take_output()
                continue
            return

    def _discard_input(self) -> None:
        """Read away what the peer sent and we will not process (a TLS 1.3 session
        ticket, say): closing a TCP socket with unread bytes resets the
        connection, and the kernel then drops what we queued for the peer."""
        view = _recv_view()
        for _ in range(64):
            try:
                if not self._sock.recv_into(view):
                    return
            except OSError:
                return

    def _send_queued(self) -> bool:
        """Send from the ciphertext queue: True if it emptied, False if the kernel is full."""
        cq = self._cq
        off = self._cq_off
        try:
            if len(cq) == 1:
                b = cq[0]
                r = self._sock.send(memoryview(b)[off:] if off else b)
            else:
                pieces = []
                for i, b in enumerate(cq):
                    if i == _IOV_MAX:
                        break
                    pieces.append(memoryview(b)[off:] if off else b)
                    off = 0
                off = self._cq_off
                r = self._sock.sendmsg(pieces)
        except _RETRY:
            r = 0
        except OSError as exc:
            # once everything is sent, a peer gone before our close_notify is no error
            self._finalize(None if self._tls_shut else exc)
            return False
        self._wq_bytes -= r
        while cq:
            size = len(cq[0]) - off
            if r >= size:
                r -= size
                off = 0
                cq.popleft()
            else:
                off += r
                break
        self._cq_off = off
        if cq:
            self._set_writing(True)
            self._check_low()
            return False
        self._cq_off = 0
        return True

    def _encrypt_chunk(self) -> bool:
        piece = self._next_chunk()
        try:
            self._sslobj.write(piece)
        except ssl.SSLError as e:
            exc = _tls_error(e)
            exc.__cause__ = e
            self._finalize(exc)
            return False
        n = len(piece)
        self.bytes_sent += n
        self._wq_bytes -= n
        self._take_output()
        return True

    def _next_chunk(self) -> bytes | memoryview:
        """Up to _CHUNK bytes off the plaintext queue: a slice of one buffer, or small ones joined."""
        wq = self._wq
        off = self._wq_off
        b = wq[0]
        avail = len(b) - off
        if avail >= _CHUNK or len(wq) == 1:
            take = min(avail, _CHUNK)
            piece = memoryview(b)[off:off + take] if off or take < len(b) else b
            off += take
            if off == len(b):
                wq.popleft()
                off = 0
            self._wq_off = off
            return piece
        parts = []
        total = 0
        while wq and total < _CHUNK:
            b = wq[0]
            take = min(len(b) - off, _CHUNK - total)
            parts.append(memoryview(b)[off:off + take] if off or take < len(b) else b)
            total += take
            off += take
            if off == len(b):
                wq.popleft()
                off = 0
        self._wq_off = off
        return b"".join(parts)

    # -- control ------------------------------------------------------------

    @property
    def ssl_object(self) -> ssl.SSLObject:
        """The ``ssl.SSLObject`` of this connection."""
        return self._sslobj

    @property
    def handshake_done(self) -> bool:
        """True once the handshakes are over and connection_made was called."""
        return self._made

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """As asyncio's SSL transports: 'peercert', 'cipher', 'compression', 'ssl_object',
        'sslcontext', and 'peername', 'sockname', 'socket'."""
        if name == "ssl_object":
            return self._sslobj
        if name == "sslcontext":
            return self._sslobj.context
        if name in ("peercert", "cipher", "compression"):
            if not self._made:
                return default
            try:
                value = getattr(self._sslobj, "getpeercert" if name == "peercert" else name)()
            except (ValueError, ssl.SSLError):
                return default
            return default if value is None else value
        return super().get_extra_info(name, default)

    def _flush_then_close(self) -> None:
        """Send what is queued and a close_notify (_pump), then close; during the
        handshakes, close at once."""
        if not self._made:
            self._finalize(None)
            return
        self._reading_changed()
        self._guard(self._pump)

    def _finalize(self, exc: BaseException | None, now: bool = False) -> None:
        if self._closed:
            return
        if (not self._made and isinstance(exc, OSError)
                and not isinstance(exc, (FastnetTimeout, ssl.SSLError))):
            # a reset in the middle of the handshake is a failed handshake
            err = exc
            exc = AuthenticationError(f"TLS handshake failed: {err}")
            exc.__cause__ = err
        loop = self._loop
        self._closed = self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not loop.is_closed():
            if self._reading:
                loop.remove_reader(self._fd)
            if self._writing:
                loop.remove_writer(self._fd)
        self._reading = self._writing = False
        self._wq.clear()
        self._cq.clear()
        self._wq_bytes = 0
        self._decoder = None
        self._on_message = None  # type: ignore[assignment]
        if self._hs is not None:
            self._hs.abandon()
        try:
            self._sock.close()
        except OSError:
            pass
        if isinstance(loop, TransportRegistry):
            loop._transport_closed(self)
        cb = self._call_lost if self._made else self._call_fail
        if now or loop.is_closed():
            cb(exc)
        else:
            loop.call_soon(cb, exc)

    def _call_lost(self, exc: BaseException | None) -> None:
        lost = getattr(self.protocol, "connection_lost", None)
        if lost is not None:
            lost(exc)

    def _call_fail(self, exc: BaseException | None) -> None:
        fail, self._on_fail = self._on_fail, None
        self._on_ready = None
        if fail is not None:
            fail(exc)

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self._closing:
            state = "closing"
        elif not self._made:
            state = f"fd={self._fd} handshaking"
        else:
            state = f"fd={self._fd}"
        return f"<TLSTransport {state} queued={self.get_write_buffer_size()}>"
