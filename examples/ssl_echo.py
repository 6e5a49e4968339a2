#!/usr/bin/env python3
"""An echo server over TLS (the Cookbook's recipe 11.10), with fastnet.

The recipe wraps its listening socket with ``ssl.wrap_socket`` (removed in
Python 3.12) and echoes on what ``accept()`` returns. Here the same echo
handler runs on ``fastnet.server.TCPServer(..., ssl_context=...)``, the
context from ``fastnet.tls.server_context(certfile, keyfile)``: the server
finishes each TLS handshake on its event loop (bounded by
``handshake_timeout``, so a silent or plain-TCP peer holds nothing) and the
handler gets ``self.request`` as an ``ssl.SSLSocket``. A client that does not
trust the server's CA is refused, and the server counts the failed handshake.

Two clients, both verifying the server's certificate against the CA and the
host name they connected to:

* the recipe's: a plain socket wrapped by ``ssl`` (``stdlib_client``);
* ``fastnet.Client(..., ssl_context=fastnet.tls.client_context(cafile))``,
  whose messages are length-prefixed frames: bytes like any other, so the
  echo returns them whole and ``recv_bytes()`` reads them back.

Certificates are made at start-up with the ``cryptography`` package: a
throw-away CA and a certificate it signs for localhost and 127.0.0.1, written
to ``--certdir`` (default: a temporary directory, removed at exit). A client
started separately needs the CA certificate: the server prints its path.

    python3 examples/ssl_echo.py --port 20000 --certdir /tmp/certs
    python3 examples/ssl_echo.py --client --port 20000 --cafile /tmp/certs/ca.pem
    python3 examples/ssl_echo.py --demo
"""
import argparse
import datetime
import ipaddress
import os
import socket
import ssl
import tempfile
import threading

import fastnet
import fastnet.tls
from fastnet.server import BaseRequestHandler, TCPServer

_stdout_lock = threading.Lock()


def say(*args):
    """print() whole lines: in --demo, servers and clients share stdout as threads."""
    with _stdout_lock:
        print(*args, flush=True)


def make_certificates(directory):
    """Write ca.pem, server.pem and server.key into directory; return their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder()
          .subject_name(name("fastnet example CA")).issuer_name(name("fastnet example CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=7))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    # the client checks the host name it connected to against these names
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (x509.CertificateBuilder()
            .subject_name(name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {n: os.path.join(directory, n) for n in ("ca.pem", "server.pem", "server.key")}
    with open(paths["ca.pem"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["server.pem"], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    # the private key: readable by its owner only
    fd = os.open(paths["server.key"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths["ca.pem"], paths["server.pem"], paths["server.key"]


# -- the server ----------------------------------------------------------------------

class EchoHandler(BaseRequestHandler):
    def handle(self):
        say("Got connection", self.client_address, self.request.version())
        while True:
            data = self.request.recv(8192)
            if data == b'':
                break
            self.request.sendall(data)
        say("Connection closed")


def make_server(address, certfile, keyfile):
    ctx = fastnet.tls.server_context(certfile, keyfile)
    # a pool of threads: one slow client does not hold the others
    return TCPServer(address, EchoHandler, concurrency="thread", ssl_context=ctx)


# -- clients -------------------------------------------------------------------------

def _show(data):
    return repr(data) if len(data) <= 40 else f"{len(data)} bytes ({data[:8]!r}...)"


def fastnet_client(address, cafile, messages):
    ctx = fastnet.tls.client_context(cafile=cafile)
    with fastnet.Client(address, ssl_context=ctx, timeout=10) as conn:
        for msg in messages:
            conn.send_bytes(msg)
            reply = conn.recv_bytes()
            say(f"fastnet.Client: sent {_show(msg)}, got back {_show(reply)}, "
                f"equal: {reply == msg}")


def stdlib_client(address, cafile, messages):
    """The recipe's client: a plain socket wrapped by the ssl module."""
    ctx = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(address, timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=address[0]) as s:
            for msg in messages:
                s.sendall(msg)
                reply = b''
                while len(reply) < len(msg):
                    chunk = s.recv(8192)
                    if not chunk:
                        raise EOFError("the server closed the connection")
                    reply += chunk
                say(f"ssl socket ({s.version()}): sent {_show(msg)}, got back {_show(reply)}, "
                    f"equal: {reply == msg}")


def untrusting_client(address):
    """A client that trusts only the system's CAs, not ours: refused."""
    try:
        with fastnet.Client(address, ssl_context=fastnet.tls.client_context(), timeout=10):
            pass
    except fastnet.AuthenticationError as e:
        say(f"a client that does not trust the CA is refused: {e}")
    else:
        say("a client that does not trust the CA was accepted")


def run_clients(address, cafile):
    stdlib_client(address, cafile, [b'Hello World?'])
    # the echo sends back while the client is still sending: keep a message within
    # what the two sockets' buffers hold
    fastnet_client(address, cafile, [b'Hello World?', bytes(range(256)) * 1000])
    untrusting_client(address)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=20000)
    ap.add_argument("--certdir", help="where the server writes its certificates (default: a temporary directory)")
    ap.add_argument("--cafile", help="client: the CA certificate the server printed")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--client", action="store_true", help="connect to --host/--port with --cafile")
    mode.add_argument("--demo", action="store_true", help="run a server and the clients in this process")
    args = ap.parse_args()
    if args.client:
        run_clients((args.host, args.port), args.cafile)
        return
    with tempfile.TemporaryDirectory() as tmp:
        certdir = args.certdir or tmp
        os.makedirs(certdir, exist_ok=True)
        cafile, certfile, keyfile = make_certificates(certdir)
        serv = make_server((args.host, 0 if args.demo else args.port), certfile, keyfile)
        host, port = serv.address[:2]
        if args.demo:
            serv.start()              # serve on a background thread
            try:
                run_clients((host, port), cafile)
            finally:
                serv.shutdown()
                serv.server_close()
            return
        say(f"CA certificate: {cafile}")
        say(f"serving on {host}:{port}")
        serv.serve_forever()          # SIGINT / SIGTERM: graceful shutdown
        serv.server_close()
        say(f"{serv.stats()['handshake_failures']} failed handshakes")
    say("stopped")

if __name__ == "__main__":
    main()
