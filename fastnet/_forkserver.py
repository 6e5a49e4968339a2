"""The fork server behind fork and prefork servers: every child is forked by a
process that has no other thread.

``os.fork()`` in a process with threads copies only the forking thread; a
lock another thread held at that moment (logging's, malloc's, an import
lock) stays held in the child forever, and CPython 3.12+ warns about it. A
server's loop thread and pools run while it forks, so the server forks once,
when serving starts and before any thread of its own exists: that copy of
the process (the fork server) runs nothing but the loop below, a single
thread, and forks the children on request. This is how multiprocessing's
forkserver and gunicorn's arbiter avoid the hazard; unlike multiprocessing's
it is a fork, not a fresh interpreter, so the children still see the
server's handler classes, hooks and state as they were when serving began.

The parent talks to it over two SEQPACKET socket pairs:

* requests (``_Request``): ``fork`` carries a pickled request and the
  descriptors the child needs (its report channel, the connection) as
  SCM_RIGHTS; the reply is the child's pid. ``kill`` signals a child of its
  own, so no signal can reach a recycled pid. ``exit`` kills what is left,
  reaps it and ends the fork server.
* exits: ``(pid, wait status)`` for every child it reaps (pidfds where the
  kernel has them, else waitpid polling), in the order they died.

The fork server leaves when asked, when its request socket reaches end of
file (the parent is gone; its children then finish on their own, as
orphans of a dead parent do) and, when it was forked from the main thread,
when the parent dies (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import collections
import logging
import os
import pickle
import select
import signal
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from fastnet.fdpass import recv_fds, send_fds

try:
    import ctypes
    _libc: Any = ctypes.CDLL(None, use_errno=True)
except (ImportError, OSError):
    _libc = None

logger = logging.getLogger("fastnet.server")

_PR_SET_PDEATHSIG = 1
_EXIT = struct.Struct("!ii")
#: A request's largest payload (a forked datagram travels in it).
_MAX_REQUEST = 1 << 20
#: Descriptors one fork request may carry.
_MAX_FDS = 8
_REPLY_TIMEOUT = 30.0
_POLL_MS = 50

# the parent's ends of every fork server this process runs: a fork server
# forked later must not hold them, or the earlier one never sees end of file
_live: weakref.WeakSet[ForkServer] = weakref.WeakSet()


class ForkServerGone(OSError):
    """The fork server exited or stopped answering."""


class ForkServer:
    """The parent's handle on a fork server; see the module docstring.

    ``ForkServer(run_child, prepare)`` forks it now: ``prepare()`` runs in
    it once, first; ``run_child(request, fds)`` runs in each child it forks
    and returns the child's exit status. Use it from one thread at a time.
    """

    def __init__(self, run_child: Callable[[Any, list[int]], int],
                 prepare: Callable[[], object] | None = None) -> None:
        ctl, ctl_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        events, events_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ctl.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _MAX_REQUEST + 65536)
        except OSError:
            pass
        ppid = os.getpid()
        pdeath = threading.current_thread() is threading.main_thread()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ctl.close()
                events.close()
                for other in list(_live):
                    other._drop()
                _live.clear()
                code = _serve(ctl_theirs, events_theirs, run_child, prepare, ppid, pdeath)
            except BaseException:
                try:
                    logger.exception("the fork server failed")
                except BaseException:
                    pass
            finally:
                os._exit(code)
        ctl_theirs.close()
        events_theirs.close()
        ctl.settimeout(_REPLY_TIMEOUT)
        events.setblocking(False)
        self.pid = pid
        self.ctl: socket.socket | None = ctl
        #: Readable when exits are waiting: read them with :meth:`exits`.
        self.events = events
        self._closing = threading.Lock()
        _live.add(self)

    def fork(self, request: Any, fds: Sequence[int]) -> int:
        """Fork a child running ``run_child(request, fds)``; returns its pid.

        The child gets its own copies of ``fds``; the caller keeps its own.
        """
        ctl = self.ctl
        if ctl is None:
            raise ForkServerGone("the fork server is closed")
        try:
            send_fds(ctl, fds, pickle.dumps(("fork", request), pickle.HIGHEST_PROTOCOL))
            reply = ctl.recv(4096)
        except OSError as exc:
            raise ForkServerGone(f"the fork server did not answer: {exc}") from exc
        if not reply:
            raise ForkServerGone("the fork server exited")
        status, value = pickle.loads(reply)
        if status != "ok":
            raise OSError(f"the fork server could not fork: {value}")
        return int(value)

    def kill(self, pid: int, sig: int) -> None:
        """Send ``sig`` to ``pid`` if it is a child the fork server has not reaped."""
        ctl = self.ctl
        if ctl is not None:
            try:
                ctl.send(pickle.dumps(("kill", pid, sig)))
            except OSError:
                pass

    def exits(self) -> tuple[list[tuple[Any, ...]], bool]:
        """``(exits, gone)``: the ``(pid, wait status)`` of children reaped since the
        last call, and whether the fork server has exited."""
        return read_records(self.events, _EXIT)

    def close(self, timeout: float = 5.0) -> None:
        """Kill and reap the children still running, end the fork server and reap it."""
        with self._closing:
            ctl = self.ctl
            if ctl is None:
                return
            self.ctl = None
            _live.discard(self)
            try:
                ctl.send(pickle.dumps(("exit",)))
            except OSError:
                pass
            # its end of the exits socket closes when it exits
            deadline = time.monotonic() + timeout
            p = select.poll()
            p.register(self.events, select.POLLIN)
            while True:
                _, gone = self.exits()
                left = deadline - time.monotonic()
                if gone or left <= 0:
                    break
                p.poll(int(left * 1000) + 1)
            if not gone:
                logger.warning("the fork server %d did not exit in %.1f s; killing it", self.pid, timeout)
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            ctl.close()
            self.events.close()

    def _drop(self) -> None:
        # in a process forked from this one: let go of the parent's ends
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None
        self.events.close()


def read_records(sock: socket.socket, record: struct.Struct) -> tuple[list[tuple[Any, ...]], bool]:
    """``(records, eof)``: every ``record`` waiting on a non-blocking SEQPACKET
    socket, and whether its peer has closed (a message of another size is skipped)."""
    out: list[tuple[Any, ...]] = []
    while True:
        try:
            data = sock.recv(record.size + 1)
        except (BlockingIOError, InterruptedError):
            return out, False
        except OSError:
            data = b""
        if not data:
            return out, True
        if len(data) == record.size:
            out.append(record.unpack(data))


def _serve(ctl: socket.socket, events: socket.socket, run_child: Callable[[Any, list[int]], int],
           prepare: Callable[[], object] | None, ppid: int, pdeath: bool) -> int:
    """The fork server's loop; returns its exit status."""
    if pdeath and _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != ppid:
        return 0        # the parent died before the death signal was armed
    if prepare is not None:
        prepare()
    ctl.setblocking(True)
    events.setblocking(False)
    children: dict[int, int] = {}       # pid -> pidfd, -1 where it is polled
    by_fd: dict[int, int] = {}          # pidfd -> pid
    pending: collections.deque[bytes] = collections.deque()
    poller = select.poll()
    poller.register(ctl, select.POLLIN)
    cfd, efd = ctl.fileno(), events.fileno()

    def reaped(pid: int, block: bool) -> bool:
        try:
            got, status = os.waitpid(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            got, status = pid, -1
        if got == 0:
            return False
        fd = children.pop(pid, -1)
        if fd >= 0:
            by_fd.pop(fd, None)
            poller.unregister(fd)
            os.close(fd)
        pending.append(_EXIT.pack(pid, status))
        return True

    def flush() -> None:
        # never block on a parent that is busy: what does not fit waits for POLLOUT
        while pending:
            try:
                events.send(pending[0])
            except (BlockingIOError, InterruptedError):
                poller.register(efd, select.POLLOUT)
                return
            except OSError:
                pending.clear()      # the parent is gone
                return
            pending.popleft()
        try:
            poller.unregister(efd)
        except KeyError:
            pass

    def fork_one(request: Any, fds: list[int]) -> int:
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                ctl.close()
                events.close()
                for fd in by_fd:
                    os.close(fd)
                status = run_child(request, fds)
            finally:
                os._exit(status)
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = -1
        children[pid] = pidfd
        if pidfd >= 0:
            by_fd[pidfd] = pid
            poller.register(pidfd, select.POLLIN)
        return pid

    while True:
        polled = any(fd < 0 for fd in children.values())
        for fd, _ in poller.poll(_POLL_MS if polled else None):
            if fd == efd:
                flush()
            elif fd in by_fd:
                reaped(by_fd[fd], block=True)
            elif fd == cfd:
                try:
                    data, fds = recv_fds(ctl, _MAX_FDS, _MAX_REQUEST)
                except EOFError:
                    return 0            # the parent is gone; the children finish on their own
                msg = pickle.loads(data)
                if msg[0] == "fork":
                    try:
                        reply: tuple[str, Any] = ("ok", fork_one(msg[1], fds))
                    except Exception as exc:
                        reply = ("error", repr(exc))
                    finally:
                        for f in fds:
                            os.close(f)
                    ctl.send(pickle.dumps(reply))
                elif msg[0] == "kill":
                    if msg[1] in children:
                        os.kill(msg[1], msg[2])
                elif msg[0] == "exit":
                    for pid in children:
                        os.kill(pid, signal.SIGKILL)
                    for pid in list(children):
                        reaped(pid, block=True)
                    return 0
        if polled:
            for pid, fd in list(children.items()):
                if fd < 0:
                    reaped(pid, block=False)
        flush()
