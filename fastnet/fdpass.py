"""Passing open file descriptors between processes over AF_UNIX sockets.

The module-level functions work on any connected AF_UNIX socket (or its
descriptor) and interoperate with ``multiprocessing.reduction``'s
``send_handle``/``recv_handle``: one data byte, the descriptor count mod 256,
rides with the SCM_RIGHTS message. Received descriptors are close-on-exec.
This is the Cookbook's recipe 11.11, with no descriptor leaked on any error.
"""
from fastnet._kernels import fdpass as _fdpass

__all__ = ["send_fd", "recv_fd", "send_fds", "recv_fds", "MAX_FDS"]

send_fd = _fdpass.send_fd
recv_fd = _fdpass.recv_fd
send_fds = _fdpass.send_fds
recv_fds = _fdpass.recv_fds
#: The most descriptors one message may carry (the kernel's SCM_MAX_FD).
MAX_FDS = _fdpass.MAX_FDS
