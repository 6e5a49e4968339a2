# cython: language_level=3
# The frame header codec, written once for every compiled kernel: framing.pyx
# (the decoder and Channel) and reactor.pyx (the loop's transports) cimport it.
#
# A header is a 4-byte big-endian signed length; a payload over 0x7fffffff
# has length -1 and then an 8-byte big-endian unsigned length. These are
# inline so the reactor's receive loop costs no call per frame.
from libc.stdint cimport uint32_t, uint64_t, int32_t

cdef enum:
    HDR_SMALL = 4            # sizes of the two header forms
    HDR_LARGE = 12
    HDR_BAD_LENGTH = -1      # a negative length other than -1
    HDR_TOO_LARGE = -2       # an 8-byte length beyond 2**63 - 1


cdef inline uint32_t be32(const unsigned char* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]


cdef inline Py_ssize_t write_header(char* p, Py_ssize_t n) noexcept nogil:
    """Write the header for an n-byte payload (n >= 0) at p; return its size (4 or 12)."""
    cdef unsigned char* q = <unsigned char*>p
    cdef uint64_t v
    cdef int i
    if n <= 0x7fffffff:
        q[0] = (n >> 24) & 0xff
        q[1] = (n >> 16) & 0xff
        q[2] = (n >> 8) & 0xff
        q[3] = n & 0xff
        return HDR_SMALL
    q[0] = q[1] = q[2] = q[3] = 0xff
    v = <uint64_t>n
    for i in range(8):
        q[4 + i] = (v >> (56 - 8 * i)) & 0xff
    return HDR_LARGE


cdef inline int parse_header(const unsigned char* p, Py_ssize_t avail, long long* length) noexcept nogil:
    """Read the header at p, of which avail bytes are present.

    Returns its size (HDR_SMALL or HDR_LARGE) with the payload length in
    *length; 0 when the header is incomplete, with the bytes it lacks in
    *length; HDR_BAD_LENGTH or HDR_TOO_LARGE for a header no peer may send,
    with *length for header_error().
    """
    cdef int32_t n32
    cdef uint64_t n64
    cdef int i
    if avail < 4:
        length[0] = 4 - avail
        return 0
    n32 = <int32_t>be32(p)
    if n32 >= 0:
        length[0] = n32
        return HDR_SMALL
    if n32 != -1:
        length[0] = n32
        return HDR_BAD_LENGTH
    if avail < 12:
        length[0] = 12 - avail
        return 0
    n64 = 0
    for i in range(8):
        n64 = (n64 << 8) | p[4 + i]
    # reinterpreted: header_error() prints it back as unsigned
    length[0] = <long long>n64
    if n64 > <uint64_t>0x7fffffffffffffff:
        return HDR_TOO_LARGE
    return HDR_LARGE


cdef inline object header_error(int code, long long length):
    """The exception for a header parse_header() refused."""
    from fastnet.errors import MessageTooLarge, ProtocolError
    if code == HDR_TOO_LARGE:
        return MessageTooLarge(f"frame header claims {<uint64_t>length} bytes")
    return ProtocolError(f"invalid frame length {length}")
