# cython: language_level=3
"""The RPC envelope: a request framed in one step, a reply read, a request served.

Compiled twin of ``fastnet._pure.rpcwire`` (the module text there describes
both); the two write the same bytes. The frame header comes from
framing.pxd, the one frame codec of the compiled kernels.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.object cimport PyObject_Call
from libc.string cimport memcpy
from libc.stdint cimport uint64_t

from framing cimport write_header, HDR_SMALL

from fastnet.errors import ProtocolError

include "sockio.pxi"

import time as _time

cdef object _perf_counter = _time.perf_counter

cdef enum:
    _REQUEST = 0
    _REPLY = 1
    _NOTIFY = 2

DEF SMALL_MAX = 0x7fffffff
# the envelope before the arguments: fixarray, kind, msgid (<= 9), str header (<= 5)
DEF ENV_MAX = 16

cdef object _codecs = None


cdef object _msgpack_pack():
    """This thread's packer of the msgpack codec (a Packer is not safe across threads)."""
    global _codecs
    if _codecs is None:
        from fastnet import codecs
        _codecs = codecs
    try:
        return _codecs._packers.pack
    except AttributeError:
        _codecs._msgpack_dumps(None)     # makes this thread's packer
        return _codecs._packers.pack


cdef inline Py_ssize_t _put_be(unsigned char* p, unsigned char tag, uint64_t n, int k) noexcept:
    # a type byte, then n in k big-endian bytes
    cdef int i
    p[0] = tag
    for i in range(k):
        p[1 + i] = (n >> (8 * (k - 1 - i))) & 0xff
    return 1 + k


cdef inline Py_ssize_t _put_uint(unsigned char* p, uint64_t n) noexcept:
    # the smallest form, as msgpack's packer chooses for a non-negative int
    if n < 0x80:
        p[0] = <unsigned char>n
        return 1
    if n <= 0xff:
        return _put_be(p, 0xcc, n, 1)
    if n <= 0xffff:
        return _put_be(p, 0xcd, n, 2)
    if n <= 0xffffffff:
        return _put_be(p, 0xce, n, 4)
    return _put_be(p, 0xcf, n, 8)


cdef inline Py_ssize_t _put_str_header(unsigned char* p, Py_ssize_t n) noexcept:
    if n < 32:
        p[0] = 0xa0 | <unsigned char>n
        return 1
    if n <= 0xff:
        return _put_be(p, 0xd9, n, 1)
    if n <= 0xffff:
        return _put_be(p, 0xda, n, 2)
    return _put_be(p, 0xdb, n, 4)


cdef inline bint _is_u64(object n):
    # an exact int in 0..2**64-1, without raising for a larger one
    return type(n) is int and n >= 0 and n <= 0xffffffffffffffff


cdef object _marked(list frames):
    # the out-of-band marker frame before a payload with buffers of its own
    return [b"\xc1" + (len(frames) - 1).to_bytes(4, "big")] + frames


cdef object _framed(list frames):
    cdef Py_buffer view
    cdef object out
    cdef char* p
    cdef Py_ssize_t h
    if len(frames) != 1:
        return _marked(frames)
    PyObject_GetBuffer(frames[0], &view, PyBUF_SIMPLE)
    try:
        if view.len > SMALL_MAX:
            return frames
        out = PyBytes_FromStringAndSize(NULL, HDR_SMALL + view.len)
        p = PyBytes_AS_STRING(out)
        h = write_header(p, view.len)
        memcpy(p + h, view.buf, view.len)
        return out
    finally:
        PyBuffer_Release(&view)


cdef object _envelope(int head, int kind, object msgid, const char* name, Py_ssize_t nlen,
                      bytes a, bytes kw):
    """header + [kind, msgid?, name, a, kw], framed when it fits a small header."""
    cdef unsigned char env[ENV_MAX]
    cdef Py_ssize_t e = 2, na = PyBytes_GET_SIZE(a), nk = 1 if kw is None else PyBytes_GET_SIZE(kw)
    cdef Py_ssize_t n, h
    cdef object out
    cdef char* p
    env[0] = head
    env[1] = kind
    if msgid is not None:
        e += _put_uint(env + e, <uint64_t>msgid)
    e += _put_str_header(env + e, nlen)
    n = e + nlen + na + nk
    if n > SMALL_MAX:
        out = PyBytes_FromStringAndSize(NULL, n)
        p = PyBytes_AS_STRING(out)
        h = 0
    else:
        out = PyBytes_FromStringAndSize(NULL, HDR_SMALL + n)
        p = PyBytes_AS_STRING(out)
        h = write_header(p, n)
    memcpy(p + h, env, e)
    h += e
    memcpy(p + h, name, nlen)
    h += nlen
    memcpy(p + h, PyBytes_AS_STRING(a), na)
    h += na
    if kw is None:
        p[h] = <char>0xc0
    else:
        memcpy(p + h, PyBytes_AS_STRING(kw), nk)
    if n > SMALL_MAX:
        return [out]
    return out


cdef class Wire:
    """The RPC messages of one codec, encoded and decoded (see ``fastnet._pure.rpcwire``)."""

    cdef readonly object codec
    cdef readonly bint msgpack
    cdef object dumps
    cdef object _loads
    cdef object unpackb          # the built-in msgpack codec: msgpack.unpackb and its keywords
    cdef dict unpack_kw

    def __init__(self, codec):
        self.codec = codec
        self.dumps = codec.dumps
        self._loads = codec.loads
        # only the built-in msgpack codec's bytes are known well enough to write by hand
        self.msgpack = codec.name == "msgpack" and codec.builtin

    cdef object loads(self, frames):
        if self.msgpack and len(frames) == 1:
            if self.unpackb is None:
                # msgpack imported at the first message, as the codec does
                from fastnet import codecs
                self.unpackb = codecs._msgpack_unpackb()
                # the keywords of the codec's loads, called without its Python frame
                self.unpack_kw = dict(raw=False, strict_map_key=False, ext_hook=codecs._msgpack_ext_hook)
            return PyObject_Call(self.unpackb, (frames[0],), self.unpack_kw)
        return self._loads(frames)

    def request(self, msgid, method, args, kwargs):
        """``[0, msgid, method, args, kwargs or None]``: framed bytes, or a list of unframed frames."""
        return self._call(_REQUEST, msgid, method, args, kwargs)

    def notification(self, method, args, kwargs):
        """``[2, method, args, kwargs or None]``: framed bytes, or a list of unframed frames."""
        return self._call(_NOTIFY, None, method, args, kwargs)

    cdef object _call(self, int kind, object msgid, object method, object args, object kwargs):
        # a request (kind 0, with its id) or a notification (kind 2, no id)
        cdef const char* name
        cdef Py_ssize_t nlen
        if type(args) is not list and type(args) is not tuple:
            args = list(args)
        if not kwargs:
            kwargs = None
        if self.msgpack and type(method) is str and (kind == _NOTIFY or _is_u64(msgid)):
            name = PyUnicode_AsUTF8AndSize(method, &nlen)
            pack = _msgpack_pack()
            return _envelope(0x95 if kind == _REQUEST else 0x94, kind, msgid, name, nlen, pack(args),
                             None if kwargs is None else pack(kwargs))
        if kind == _REQUEST:
            return _framed(self.dumps([kind, msgid, method, list(args), kwargs]))
        return _framed(self.dumps([kind, method, list(args), kwargs]))

    def reply(self, msgid, result):
        """``[1, msgid, None, result]`` as unframed frames (the marker frame first if out of band)."""
        if self.msgpack and _is_u64(msgid):
            return [self._msgpack_reply(<uint64_t>msgid, result)]
        frames = self.dumps([_REPLY, msgid, None, result])
        return frames if len(frames) == 1 else _marked(frames)

    cdef bytes _msgpack_reply(self, uint64_t msgid, object result):
        cdef unsigned char env[ENV_MAX]
        cdef Py_ssize_t e, nr
        cdef bytes r = _msgpack_pack()(result)
        cdef bytes out
        cdef char* p
        env[0] = 0x94
        env[1] = _REPLY
        e = 2 + _put_uint(env + 2, msgid)
        env[e] = 0xc0
        e += 1
        nr = PyBytes_GET_SIZE(r)
        out = PyBytes_FromStringAndSize(NULL, e + nr)
        p = PyBytes_AS_STRING(out)
        memcpy(p, env, e)
        memcpy(p + e, PyBytes_AS_STRING(r), nr)
        return out

    def error_reply(self, msgid, error):
        """``[1, msgid, error, None]`` as unframed frames."""
        frames = self.dumps([_REPLY, msgid, error, None])
        return frames if len(frames) == 1 else _marked(frames)

    def read_reply(self, frames):
        """``(msgid, error, result)`` of a whole reply; ProtocolError if it is not one."""
        try:
            msg = self.loads(frames)
            if type(msg) is not list:
                msg = list(msg)
            if len(<list>msg) != 4:
                raise ValueError(f"{len(<list>msg)} fields, not 4")
            if (<list>msg)[0] != _REPLY:
                raise ValueError(f"message kind {(<list>msg)[0]!r}")
        except Exception as e:
            raise ProtocolError(f"malformed reply from the server ({e})") from None
        return (<list>msg)[1], (<list>msg)[2], (<list>msg)[3]

    def serve(self, handler, frames, dict methods):
        """Decode a request, run its method and queue the reply on ``handler`` (see the pure twin)."""
        cdef list req
        cdef double t0
        try:
            msg = self.loads(frames)
        except Exception as e:
            handler._undecodable(e)
            return
        if type(msg) is list and len(<list>msg) == 5:
            req = <list>msg
            kind = req[0]
            msgid = req[1]
            method = req[2]
            args = req[3]
            kwargs = req[4]
            if kind == _REQUEST and type(msgid) is int and type(method) is str and type(args) is list \
                    and (kwargs is None or type(kwargs) is dict):
                m = methods.get(method)
                if m is not None and not m.blocking:
                    func = m.func
                    t0 = _perf_counter()
                    try:
                        result = func(*args, **kwargs) if kwargs else func(*args)
                    except BaseException as e:    # SystemExit from a method must not stop the server
                        m.record(_perf_counter() - t0, True)
                        handler._send_exc(msgid, e)
                        return
                    m.record(_perf_counter() - t0, False)
                    try:
                        out = self.reply(msgid, result)
                    except Exception as e:
                        handler._unencodable(msgid, e)
                        return
                    handler._queue(out)
                    return
        handler._message(msg)


def send_framed(sock, data):
    """Send bytes already framed (:meth:`Wire.request`) whole on a blocking stream socket."""
    cdef Py_buffer view
    cdef int fd = sock.fileno()
    if fd < 0:
        raise OSError(9, "handle is closed")
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        _send_all(fd, <const char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
