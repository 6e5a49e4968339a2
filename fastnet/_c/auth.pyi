"""Stub of the compiled kernel ``fastnet._c.auth`` (twin: ``fastnet._pure.auth``)."""
from typing import Any

from typing_extensions import disjoint_base

from fastnet.errors import AuthenticationError

CHALLENGE: bytes
WELCOME: bytes
FAILURE: bytes
MESSAGE_LENGTH: int
LEGACY_MESSAGE_LENGTH: int
MD5_DIGEST_LENGTH: int
MAX_HANDSHAKE_MESSAGE: int
ALLOWED_DIGESTS: frozenset[bytes]
# nonces clients of this process issued and have not yet seen answered
_outstanding: set[bytes]

def make_challenge(digest_name: str | None = ...) -> tuple[bytes, bytes]: ...
def digest_name_and_payload(message: bytes) -> tuple[str, bytes]: ...
def parse_challenge(message: bytes) -> bytes: ...
def create_response(authkey: bytes, nonce: bytes, strict: bool = ...) -> bytes: ...
def verify_response(authkey: bytes, nonce: bytes, response: bytes, strict: bool = ...) -> None: ...
def handshake_failure(exc: BaseException) -> BaseException: ...

@disjoint_base
class Handshake:
    authkey: bytes
    server_side: bool
    strict: bool
    digest: str | None
    done: bool
    error: AuthenticationError | None
    finished: bool
    next_pipelined: bool
    frames_left: int
    def __init__(self, authkey: bytes, server_side: bool, *, strict: bool = ..., digest: str | None = ...,
                 mutual: bool = ...) -> None: ...
    def start(self) -> list[bytes]: ...
    def receive(self, payload: bytes) -> list[bytes]: ...
    def run(self, send: Any, send_many: Any, recv: Any, has_frame: Any, ack: Any, timeout: float | None) -> None: ...
    def abandon(self) -> None: ...
