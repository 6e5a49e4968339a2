# Declarations that make the auth kernel's Handshake, compiled from its one
# Python source (fastnet/_pure/auth.py), a cdef class with typed attributes:
# the machine runs for every connection, and an ordinary class keeps every
# attribute in a dict or a slot.

cdef class Handshake:
    cdef public object authkey
    cdef public bint server_side
    cdef public bint strict
    cdef public object digest
    cdef public bint done
    cdef public object error
    cdef public bint finished
    cdef public bint next_pipelined
    cdef public Py_ssize_t frames_left
    cdef list _expect
    cdef object _nonce
