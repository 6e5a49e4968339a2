"""The TLS and authkey handshakes of an accepted connection, as a state machine on the loop."""
from __future__ import annotations

import socket
import ssl
from typing import TYPE_CHECKING, Any

from fastnet._kernels import framing as _framing
from fastnet.errors import AuthenticationError, ProtocolError, TimeoutError
from fastnet.handshake import Handshake, HandshakeReader, quickack
from fastnet.server._util import _quiet_close

if TYPE_CHECKING:
    from fastnet.loop import EventLoop
    from fastnet.loop import TimerHandle as _reactor_TimerHandle
    from fastnet.server._base import BaseServer
    from fastnet.server._engine import _Engine

_HS_TLS, _HS_AUTH, _HS_DONE = range(3)
_SSL_RETRY = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class _Handshake:
    """The accepting side of a connection's handshakes, without blocking.

    With the server's ssl_context, first the TLS handshake on a non-blocking
    ``ssl.SSLSocket``; then, with its authkey, multiprocessing's mutual
    handshake (inside TLS when there is TLS), spoken by the same
    :class:`fastnet.handshake.Handshake` as fastnet.auth.server_authenticate.
    Frames are read exactly (header, then payload), so nothing after the
    last handshake message is consumed and the socket can go to any
    handler. Replies produced in one wake-up go out in one send, so a
    pipelining client costs two round trips.

    ``owner`` (the server, or a prefork worker's engine) keeps the pending
    handshakes in ``owner._handshakes`` and hears how each ended:
    ``_authenticated(sock, addr)``, ``_handshake_failed(addr, exc)`` or,
    for one aborted by a shutdown, ``_release()``.
    """

    def __init__(self, server: BaseServer, loop: EventLoop, sock: socket.socket, addr: Any,
                 owner: BaseServer | _Engine | _OneHandshake | None = None) -> None:
        self.server = server
        self.owner = owner if owner is not None else server
        self.loop = loop
        self.sock = sock
        self.addr = addr
        self.fd = sock.fileno()
        self.auth: Handshake | None = None
        self.reader = HandshakeReader()
        self.out = bytearray()
        self.writing = False
        sock.setblocking(False)
        if server.ssl_context is not None:
            # takes the descriptor over; on failure it closes it itself
            self.sock = server.ssl_context.wrap_socket(sock, server_side=True,
                                                       do_handshake_on_connect=False)
            self.state = _HS_TLS
        else:
            self._challenge()
        try:
            self.timer: _reactor_TimerHandle | None = loop.call_later(server.handshake_timeout,  # type: ignore[arg-type]
                                                                      self._expired)
            try:
                loop.add_reader(self.fd, self._readable)
            except BaseException:
                self.timer.cancel()
                raise
        except BaseException:
            _quiet_close(self.sock)
            raise
        self.owner._handshakes.add(self)
        self._writable()

    def _challenge(self) -> None:
        srv = self.server
        self.auth = Handshake(srv.authkey, True, strict=srv.strict, digest=srv.digest)  # type: ignore[arg-type]
        self._queue(self.auth.start())
        self.state = _HS_AUTH

    def _queue(self, payloads: list[bytes]) -> None:
        for p in payloads:
            self.out += _framing.encode_header(len(p))
            self.out += p

    def _tls(self) -> bool:
        """Advance the TLS handshake; True once it is done."""
        try:
            self.sock.do_handshake()  # type: ignore[attr-defined]  # an SSLSocket in state _HS_TLS
        except ssl.SSLWantReadError:
            self._want_write(False)
            return False
        except ssl.SSLWantWriteError:
            self._want_write(True)
            return False
        except (ssl.SSLError, OSError) as exc:
            raise AuthenticationError(f"TLS handshake failed: {exc}") from exc
        self._want_write(False)
        if self.server.authkey is None:
            self.state = _HS_DONE
        else:
            self._challenge()
        return True

    def _want_write(self, on: bool) -> None:
        if on and not self.writing:
            self.loop.add_writer(self.fd, self._writable)
            self.writing = True
        elif not on and self.writing:
            self.loop.remove_writer(self.fd)
            self.writing = False

    def _readable(self) -> None:
        try:
            if self.state == _HS_TLS and not self._tls():
                return
            while self.state != _HS_DONE:
                frame = self._read_frame()
                if frame is None:
                    break
                self._step(frame)
            self._flush()
        except Exception as exc:
            self._fail(exc)
            return
        if self.state == _HS_DONE:
            self._succeed()

    def _read_frame(self) -> bytes | None:
        while True:
            try:
                chunk = self.sock.recv(self.reader.want())
            except _SSL_RETRY:
                return None
            if not chunk:
                raise self.reader.eof()
            frame = self.reader.feed(chunk)
            if frame is not None:
                return frame

    def _step(self, frame: bytes) -> None:
        hs = self.auth
        assert hs is not None
        reply = hs.receive(frame)
        if not reply and hs.error is None:
            quickack(self.sock)     # no reply carries the ACK of this frame
        self._queue(reply)
        if hs.error is not None:
            self._flush()   # a FAILURE frame, so the peer learns why
            raise hs.error
        if hs.done:
            self.state = _HS_DONE

    def _flush(self) -> None:
        if self.out:
            try:
                n = self.sock.send(self.out)
            except _SSL_RETRY:
                n = 0
            del self.out[:n]
        self._want_write(bool(self.out))

    def _writable(self) -> None:
        if self.state == _HS_TLS:
            # the TLS handshake wants to write, or has just begun
            try:
                if not self._tls():
                    return
            except Exception as exc:
                self._fail(exc)
                return
            # bytes behind the handshake may already sit decrypted in the SSL object
            self._readable()
            return
        try:
            self._flush()
        except Exception as exc:
            self._fail(exc)
            return
        if self.state == _HS_DONE:
            self._succeed()

    def _expired(self) -> None:
        self.timer = None
        self._fail(TimeoutError(f"handshake not finished in {self.server.handshake_timeout} s"))

    def _detach(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.loop.is_closed():
            self.loop.remove_reader(self.fd)
            if self.writing:
                self.loop.remove_writer(self.fd)
        self.writing = False
        self.owner._handshakes.discard(self)

    def _succeed(self) -> None:
        if self not in self.owner._handshakes:
            return
        if self.out:
            self._fail(ProtocolError("handshake finished with replies unsent"))
            return
        self._detach()
        self.owner._authenticated(self.sock, self.addr)

    def _fail(self, exc: BaseException) -> None:
        if self not in self.owner._handshakes:
            return
        self._detach()
        _quiet_close(self.sock)
        self.owner._handshake_failed(self.addr, exc)

    def abort(self) -> None:
        """Close without counting a failure (shutdown)."""
        if self not in self.owner._handshakes:
            return
        self._detach()
        _quiet_close(self.sock)
        self.owner._release()


class _OneHandshake:
    """The owner of the one _Handshake that handle_request() runs."""

    def __init__(self) -> None:
        self._handshakes: set[_Handshake] = set()
        self.done = False
        self.sock: socket.socket | None = None
        self.error: BaseException | None = None

    def _authenticated(self, sock: socket.socket, addr: Any) -> None:
        self.sock = sock
        self.done = True

    def _handshake_failed(self, addr: Any, exc: BaseException) -> None:
        self.error = exc
        self.done = True

    def _release(self) -> None:
        self.done = True
