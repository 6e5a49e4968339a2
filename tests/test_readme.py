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


@pytest.mark.parametrize("code", TLS_SNIPPETS, ids=[f"tls{i}" for i in range(len(TLS_SNIPPETS))])
def test_readme_tls_snippet_runs_with_certificates(code, tmp_path, monkeypatch):
    pytest.importorskip("cryptography")
    # tests/tlsutil.py's PKI: certificates CPython 3.13's strict verification accepts
    from tlsutil import make_pki
    make_pki(tmp_path)
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
