"""The README's Python snippets run as written.

Every ```python block runs as it stands. A ```py block is one that needs
something from outside; the TLS one (it names ``server.pem``) runs here in a
directory where a throwaway CA and certificates are made with the names it
uses (with the ``cryptography`` package, skipped without it).
"""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", TEXT, re.S)
TLS_SNIPPETS = [b for b in re.findall(r"```py\n(.*?)```", TEXT, re.S) if "server.pem" in b]


def _run(code):
    exec(compile(code, str(README), "exec"), {"__name__": "readme_snippet"})


def test_readme_has_snippets():
    assert SNIPPETS
    assert TLS_SNIPPETS


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(code):
    _run(code)


def _write_pki(d):
    """A throwaway CA, a server certificate for localhost and a client certificate, as PEM files."""
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(cn, key, issuer, issuer_key, *, ca=False, sans=(), usage=None):
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                                critical=True)
        if usage is not None:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(name, c, key=None):
        (d / f"{name}.pem").write_bytes(c.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            (d / f"{name}.key").write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("README CA", ca_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "README CA")]),
              ca_key, ca=True)
    write("ca", ca)
    sans = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    for name, usage, names in (("server", ExtendedKeyUsageOID.SERVER_AUTH, sans),
                               ("client", ExtendedKeyUsageOID.CLIENT_AUTH, ())):
        key = ec.generate_private_key(ec.SECP256R1())
        write(name, cert(name, key, ca.subject, ca_key, sans=names, usage=usage), key)


@pytest.mark.parametrize("code", TLS_SNIPPETS, ids=[f"tls{i}" for i in range(len(TLS_SNIPPETS))])
def test_readme_tls_snippet_runs_with_certificates(code, tmp_path, monkeypatch):
    pytest.importorskip("cryptography")
    _write_pki(tmp_path)
    for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key"):
        assert name in code
    monkeypatch.chdir(tmp_path)
    _run(code)


def test_readme_opens_with_the_two_commands():
    block = re.search(r"```sh\n(.*?)```", TEXT, re.S).group(1).strip().splitlines()
    assert len(block) == 2
    assert "fastnet bench" in block[0]
    assert "pytest" in block[1] and "FASTNET_PURE=1" in block[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert block[1] in ci


def test_readme_links_resolve():
    """Relative links point at files that exist, and #anchors at headings."""
    root = README.parent
    prose = re.sub(r"```.*?```", "", TEXT, flags=re.S)
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", prose, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if "://" in target:
            continue
        if target.startswith("#"):
            assert target[1:] in anchors, f"no heading for the link {target}"
        else:
            assert (root / target.split("#")[0]).exists(), f"the link {target} points at nothing"
