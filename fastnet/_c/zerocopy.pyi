"""Stub of the compiled kernel ``fastnet._c.zerocopy`` (twin: ``fastnet._pure.zerocopy``)."""
import socket

from typing_extensions import Buffer

def send_from(buf: Buffer, sock: socket.socket | int) -> int: ...
def recv_into(buf: Buffer, sock: socket.socket | int) -> int: ...
