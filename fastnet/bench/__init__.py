"""``fastnet bench``: fastnet side by side with its anchors, in one run.

Every case runs in fresh child processes, a server and a client talking over
loopback (TCP or AF_UNIX).  The client warms up, picks an iteration count that
lasts about ``sample`` seconds, times ``repeat`` samples and prints them; the
parent takes the median over all samples of all rounds.  Rounds go round-robin
over the implementations so that a noisy neighbour hurts them all alike.

Cases (64-byte payloads unless said):

* ``pingpong``  round trip, µs: the C floor (one write + one read per message,
  ``_floor.c``), multiprocessing.connection, pyzmq REQ/REP, fastnet compiled
  and pure (``FASTNET_PURE=1``), and fastnet with ``readahead=True``.
* ``stream``    one-way messages, msg/s, the receiver counting and checking
  every one: multiprocessing, pyzmq PUSH/PULL, fastnet ``send_bytes`` and the
  batched ``send_many``/``recv_many``, compiled and pure, each also with
  ``readahead=True``.
* ``bulk``      a float64 array, GB/s: plain ``sendall(memoryview)`` /
  ``recv_into``, multiprocessing ``send_bytes`` and ``send(arr)``, pyzmq
  ``copy=False``, fastnet ``send_array``/``recv_array(out=)``.
* ``handshake`` connect + mutual authkey handshake + one message echoed +
  close, per second: every pair of client and listener, multiprocessing or
  fastnet on either side.
* ``rpc-seq``   sequential ``add(2, 3)`` calls/s from one client: a pickle RPC
  over multiprocessing.connection (the Python Cookbook's recipe 11.8), xmlrpc,
  pyzmq REQ/REP + msgpack, Pyro5 and rpyc (when installed), fastnet's bare
  64-byte pingpong as calls/s, and fastnet's RPC with msgpack.
* ``rpc-pipe``  ``add(2, 3)`` with 64 calls in flight on one connection,
  calls/s: the multiprocessing pickle RPC sending 64 requests then reading
  64 replies, pyzmq DEALER/ROUTER with a sliding window of 64, fastnet
  ``call_async`` with a sliding window of 64 (a new call as the oldest one
  completes), in batches of 64 (64 ``call_async``, then wait for all 64)
  and in ``proxy.batch()`` blocks of 64 (the 64 requests in one write).
* ``echo``      an echo server with 100 connections kept in ping-pong by one
  epoll client process, round trips/s: each server cuts the 4-byte framed
  messages, hands them whole to Python code and sends a framed reply; a
  selectors loop, ``socketserver`` with a thread per connection, asyncio,
  uvloop (when installed), fastnet's EventLoop compiled and pure.  The
  client's info also has the server's CPU time per round trip.
* ``fdpass``    descriptors passed one per message over AF_UNIX (only), fd/s,
  the receiver checking each with fstat and closing it:
  ``multiprocessing.reduction``, ``socket.send_fds``, fastnet ``send_fd``
  compiled and pure.

``--only rpc`` runs both rpc cases; ``bench/bench_rpc.py`` adds the json and
pickle codecs, AF_UNIX, grpc, array arguments and TLS; ``bench/bench_echo.py``
1,000 and 10,000 connections; ``bench/bench_fdpass.py`` ``Connection.send_fds``.

A fastnet feature that is missing (such as the ``readahead=`` option on a
fastnet without it) shows as ``n/a`` with the reason; a child
that fails shows as ``n/a`` with its error.  No number is ever filled in.

Where the two processes run matters more than anything else for pingpong on
a VM whose idle vCPUs halt: ``--pin same`` puts both on one CPU (the cost of
the code path), ``--pin split`` one on each (the cost of cross-CPU wake-ups),
the default leaves it to the scheduler.  The report records the choice.

``main(argv)`` is the ``fastnet bench`` command; ``run(...)`` returns the
report as a dict (the ``--json`` document) and ``format_report`` renders it.
``serve(...)`` starts one benchmark server child; ``bench/`` uses it.

The package: ``runner`` runs the process pairs, ``report`` renders tables,
targets and the chart, ``command`` is the command line, ``cases`` gathers
one module per case (``pingpong``, ``stream``, ``bulk``, ``handshake``,
``rpc``, ``echo``, ``fdpass``: its child code, rows and targets), ``common``
holds what the children share and ``floor`` builds the C floor
(``_floor.c``).  The children load these modules by file path
(``_load.py``) rather than importing the ``fastnet`` package, so the anchor
cases run even when fastnet itself does not import.
"""

from .cases import CASES
from .command import main
from .common import NotAvailable
from .report import format_report, plot, speedups
from .runner import run, serve

__all__ = ["CASES", "run", "main", "format_report", "serve", "NotAvailable", "speedups", "plot"]
