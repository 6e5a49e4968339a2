"""Blocking TLS for Connections: a framing Channel over an ``ssl.SSLSocket``.

``Listener(..., ssl_context=server_context(...))`` and
``Client(..., ssl_context=client_context(...))`` use it; the frames inside
the TLS stream are the same as on a plain socket. Descriptors cannot be
passed over TLS.
"""
import ssl

from fastnet._pure.framing import Channel, COPY_THRESHOLD, _POLLIN, _header, _ssize, _view
from fastnet.errors import AuthenticationError, TimeoutError as FastnetTimeout

__all__ = ["TLSChannel", "server_context", "client_context"]

_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


def _tls_error(e):
    return AuthenticationError(f"TLS error: {e}")


class TLSChannel(Channel):
    """A :class:`fastnet._pure.framing.Channel` over a blocking ``ssl.SSLSocket``."""

    __slots__ = ()

    def __init__(self, sock, max_size=None, bufsize=262144):
        super().__init__(sock, max_size, bufsize)
        # SSLSocket has no recvmsg: nothing can carry SCM_RIGHTS anyway
        self._is_unix = False

    # -- receiving --------------------------------------------------------

    def _read(self, view, n, deadline, waitall):
        """recv_into up to n bytes (all n when waitall and no deadline, unless EOF); 0 means EOF."""
        sock = self._sock
        try:
            if deadline < 0:
                got = sock.recv_into(view, n)
                while waitall and 0 < got < n:
                    with view[got:n] as rest:
                        r = sock.recv_into(rest, n - got)
                    if r == 0:
                        break
                    got += r
                return got
            while True:
                # decrypted bytes may sit in the SSL object while the fd has nothing
                if not sock.pending() and not self._wait(_POLLIN, deadline):
                    raise FastnetTimeout("timed out waiting for data")
                # non-blocking for this read: a readable fd may hold only part of a
                # record, or a record with no application data (a TLS 1.3 ticket)
                sock.settimeout(0.0)
                try:
                    return sock.recv_into(view, n)
                except _WANT:
                    continue
                finally:
                    sock.settimeout(None)
        except ssl.SSLError as e:
            # in TLS 1.3 a client learns only here that its certificate was refused
            raise _tls_error(e) from e

    def buffered(self):
        """Received bytes not yet returned, including those decrypted but still in the SSL object."""
        n = self._decoder.buffered
        sock = self._sock
        return n + sock.pending() if sock is not None else n

    def poll(self, timeout=0.0):
        """True if data (or EOF) is there to receive, waiting up to timeout."""
        sock = self._fdcheck()
        d = self._decoder
        if d._broken is not None or d.buffered > 0 or sock.pending() > 0:
            return True
        # a readable fd may carry only TLS records with no data (TLS 1.3
        # session tickets), so read into the decoder to know
        try:
            self._fill(self._deadline(timeout))
        except FastnetTimeout:
            return False
        except (EOFError, OSError):
            return True     # the receive that follows reports it
        return True

    # -- sending ----------------------------------------------------------

    def _sendv_all(self, parts):
        """Send every part, coalescing small neighbours into one write (SSLSocket has no sendmsg)."""
        sock = self._sock
        small = []
        try:
            for p in parts:
                if len(p) <= COPY_THRESHOLD:
                    small.append(p)
                    continue
                if small:
                    sock.sendall(b"".join(small))
                    small = []
                sock.sendall(p)
            if small:
                sock.sendall(b"".join(small))
        except ssl.SSLError as e:
            raise _tls_error(e) from e

    def send_frame(self, buf, offset=0, size=None):
        """Send one frame holding buf[offset:offset+size] (any contiguous buffer)."""
        offset = _ssize(offset)
        self._fdcheck()
        with _view(buf) as view:
            ln = len(view)
            if offset < 0 or offset > ln:
                raise ValueError("offset is out of range")
            n = ln - offset if size is None else _ssize(size)
            if n < 0:
                raise ValueError("size is negative")
            if offset + n > ln:
                raise ValueError("buffer length < offset + size")
            with view[offset:offset + n] as part:
                self._sendv_all([_header(n), part])

    def send_frames(self, buffers):
        """Send every buffer in the iterable as its own frame."""
        bufs = list(buffers)
        self._fdcheck()
        views = []
        try:
            for b in bufs:
                views.append(_view(b))
            parts = []
            for v in views:
                parts.append(_header(len(v)))
                parts.append(v)
            self._sendv_all(parts)
        finally:
            for v in views:
                v.release()

    # -- descriptors ------------------------------------------------------

    def send_frame_fds(self, buf, fds):
        raise ValueError("descriptors cannot be passed over TLS")

    def recv_frame_fds(self, maxfds=253, timeout=None):
        raise ValueError("descriptors cannot be passed over TLS")


def server_context(certfile, keyfile, cafile=None, require_client_cert=False):
    """An ``ssl.SSLContext`` for a Listener: TLS 1.2+, this certificate and key.

    With ``cafile``, client certificates are verified against it when
    presented; ``require_client_cert=True`` refuses clients without one
    (mutual TLS).
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif cafile is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(cafile=None, certfile=None, keyfile=None, check_hostname=True):
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
