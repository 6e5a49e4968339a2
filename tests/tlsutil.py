"""A throwaway PKI for the TLS tests: a CA, a second CA, and certificates signed by the first.

``make_pki(directory)`` writes PEM files and returns their paths by name:
``ca``, ``ca2``, ``server`` (localhost and 127.0.0.1), ``expired``,
``other_host`` (example.com only) and ``client``; keys are ``<name>_key``.
Needs the ``cryptography`` package (the importing module should
``pytest.importorskip`` it first).
"""
import datetime
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fastnet import tls


def name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(subject, key, issuer_name, issuer_key, *, ca=False, sans=None, expired=False,
              client=False):
    """A certificate for ``key`` signed by ``issuer_key``; a CA's, an expired one, a client's."""
    now = datetime.datetime.now(datetime.timezone.utc)
    if expired:
        start, end = now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)
    else:
        start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)
    b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(start).not_valid_after(end)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                          key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, key_cert_sign=True, crl_sign=True,
                                          encipher_only=False, decipher_only=False), critical=True)
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                            critical=False)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage(
            [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH if client
             else x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_pki(d):
    """Write the test PKI into directory ``d`` (a pathlib.Path); returns {name: path}."""
    out = {}

    def write(nm, cert, key=None):
        p = d / f"{nm}.pem"
        p.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[nm] = str(p)
        if key is not None:
            k = d / f"{nm}.key"
            k.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
            out[nm + "_key"] = str(k)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    ca_key, ca2_key = key(), key()
    ca = make_cert("fastnet test CA", ca_key, name("fastnet test CA"), ca_key, ca=True)
    ca2 = make_cert("other CA", ca2_key, name("other CA"), ca2_key, ca=True)
    write("ca", ca)
    write("ca2", ca2)
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    k = key()
    write("server", make_cert("localhost", k, ca.subject, ca_key, sans=sans), k)
    k = key()
    write("expired", make_cert("localhost", k, ca.subject, ca_key, sans=sans, expired=True), k)
    k = key()
    write("other_host", make_cert("example.com", k, ca.subject, ca_key,
                                  sans=[x509.DNSName("example.com")]), k)
    k = key()
    write("client", make_cert("client", k, ca.subject, ca_key, client=True), k)
    return out


def server_ctx(pki, nm="server", **kw):
    """A server context for certificate ``nm`` (server_context's keywords pass through)."""
    return tls.server_context(pki[nm], pki[nm + "_key"], **kw)


def client_ctx(pki, cafile="ca", mutual=False, version=None, **kw):
    """A client context trusting ``cafile``; ``mutual`` adds the client certificate."""
    if mutual:
        kw.update(certfile=pki["client"], keyfile=pki["client_key"])
    ctx = tls.client_context(cafile=pki[cafile], **kw)
    if version is not None:
        ctx.maximum_version = version
    return ctx
