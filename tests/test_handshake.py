"""The sans-I/O authkey handshake machine, both roles fed to each other in memory."""
import pytest

from fastnet.errors import AuthenticationError
from fastnet.handshake import Handshake, HandshakeReader, _outstanding
from fastnet._kernels import framing


def _run(server, client):
    """Pass frames between the two machines until both have a verdict."""
    to_client, to_server = server.start(), client.start()
    while to_client or to_server:
        for f in to_client[:]:
            to_client.remove(f)
            if not client.finished:
                to_server += client.receive(f)
        for f in to_server[:]:
            to_server.remove(f)
            if not server.finished:
                to_client += server.receive(f)
    return server, client


@pytest.mark.parametrize("digest", [None, "md5", "sha256", "sha3_384"])
def test_both_roles_agree_with_the_same_key(digest):
    s, c = _run(Handshake(b"key", True, digest=digest), Handshake(b"key", False, digest=digest))
    assert s.done and c.done and s.error is None and c.error is None
    assert not _outstanding


def test_a_wrong_key_fails_both_sides_and_the_server_says_failure():
    s = Handshake(b"key", True)
    c = Handshake(b"other", False)
    out = c.receive(s.start()[0])
    assert s.receive(out[0]) == [b"#FAILURE#"] and isinstance(s.error, AuthenticationError)
    assert c.receive(b"#FAILURE#") == [] and "rejected" in str(c.error)
    assert not _outstanding


def test_strict_refuses_a_legacy_md5_challenge():
    s, c = _run(Handshake(b"key", True, digest=None), Handshake(b"key", False, strict=True))
    assert c.error is not None and "strict" in str(c.error).lower()


def test_a_relayed_client_challenge_is_refused():
    mine = Handshake(b"key", False)
    answer, challenge = mine.receive(Handshake(b"key", True).start()[0])
    other = Handshake(b"key", False)
    assert other.receive(challenge) == [] and "relayed" in str(other.error)
    mine.abandon()
    assert not _outstanding


def test_reader_reads_exactly_and_refuses_an_oversized_message():
    r = HandshakeReader()
    stream = framing.encode_header(3) + b"abc" + b"next"
    assert r.want() == 4 and r.feed(stream[:4]) is None
    assert r.want() == 3 and r.feed(stream[4:7]) == b"abc"
    assert r.want() == 4
    with pytest.raises(AuthenticationError) as info:
        HandshakeReader().feed(framing.encode_header(257))
    assert isinstance(info.value, OSError)
