"""What the kernels must decide, from the wire format and CPython's rules alone.

The one reference that the fuzz program (fuzz_kernels.py) and the
property tests (tests/test_fuzz_stateful.py) check both kernel sets against.
It imports nothing of fastnet until asked, so the fuzz program can import
fastnet under atheris' instrumentation afterwards.
"""
import hmac
import struct

LLONG_MAX = 2**63 - 1


def ref_parse(stream, max_size):
    """(complete frames, error type at the first bad header or None, bytes missing)."""
    from fastnet.errors import MessageTooLarge, ProtocolError
    frames, pos = [], 0
    while True:
        left = len(stream) - pos
        if left < 4:
            return frames, None, (4 - left) if left else 0
        n, h = struct.unpack_from("!i", stream, pos)[0], 4
        if n == -1:
            if left < 12:
                return frames, None, 12 - left
            n, h = struct.unpack_from("!Q", stream, pos + 4)[0], 12
            if n > LLONG_MAX:
                return frames, MessageTooLarge, 0
        elif n < 0:
            return frames, ProtocolError, 0
        if max_size is not None and n > max_size:
            return frames, MessageTooLarge, n - min(n, left - h)
        if left - h < n:
            return frames, None, n - (left - h)
        frames.append(bytes(stream[pos + h:pos + h + n]))
        pos += h + n


def ref_claims(stream):
    """Every frame length the stream's headers claim, in order, up to the first bad one."""
    pos, out = 0, []
    while len(stream) - pos >= 4:
        n, h = struct.unpack_from("!i", stream, pos)[0], 4
        if n == -1:
            if len(stream) - pos < 12:
                break
            n, h = struct.unpack_from("!Q", stream, pos + 4)[0], 12
        elif n < 0:
            break
        out.append(n)
        pos += h + n
    return out


def hmac_ok(key, nonce, response, strict):
    """What verify_response must decide, from CPython's rules alone."""
    if len(response) in (16, 20):
        name, mac = "md5", response
    else:
        for name in ("md5", "sha256", "sha384", "sha3_256", "sha3_384"):
            prefix = b"{%s}" % name.encode()
            if response.startswith(prefix):
                mac = response[len(prefix):]
                break
        else:
            return False
    if strict and name == "md5":
        return False
    return hmac.compare_digest(hmac.digest(key, nonce, name), mac)
