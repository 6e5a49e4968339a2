"""distributed's own comm test helpers, run against fastnet:// and fastnet-tls://.

The helpers (``check_*`` in ``distributed/comm/tests/test_comms.py``) and the
test certificates live in dask/distributed's repository, not in its wheel.
Set ``FASTNET_DISTRIBUTED_SRC`` to a checkout of that repository at the tag of
the installed distributed to run them::

    FASTNET_DISTRIBUTED_SRC=/tmp/distributed-src PYTHONPATH=$PWD python3 -m pytest tests/test_dask_upstream.py

Each test runs under distributed's ``gen_test``, whose ``clean`` fixture
fails on any comm left open, thread or process left running.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

SRC = os.environ.get("FASTNET_DISTRIBUTED_SRC")
if not SRC:
    pytest.skip("FASTNET_DISTRIBUTED_SRC does not point at a dask/distributed checkout",
                allow_module_level=True)
pytest.importorskip("distributed")

import distributed  # noqa: E402
import distributed.utils_test as utils_test  # noqa: E402
from distributed.comm.registry import backends  # noqa: E402
from distributed.utils_test import gen_test  # noqa: E402

import fastnet.dask as fdask  # noqa: E402

_TEST_COMMS = os.path.join(SRC, "distributed", "comm", "tests", "test_comms.py")
if not os.path.exists(_TEST_COMMS):
    raise RuntimeError(f"FASTNET_DISTRIBUTED_SRC={SRC!r} has no distributed/comm/tests/test_comms.py")


def _load_helpers():
    # the helpers build TLS contexts from the checkout's test certificates at import
    utils_test.certs_dir = os.path.join(SRC, "distributed", "tests")
    spec = importlib.util.spec_from_file_location("_distributed_upstream_test_comms", _TEST_COMMS)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


tc = _load_helpers()
EXTERNAL_IP4 = tc.EXTERNAL_IP4

FASTNET_TLS = dict(listen_args={"ssl_context": utils_test.get_server_ssl_context()},
                   connect_args={"ssl_context": utils_test.get_client_ssl_context()})


@pytest.fixture(autouse=True)
def fastnet_backends(monkeypatch):
    """The backends from the entry point where this fastnet is installed with it; else registered here."""
    for scheme, cls in (("fastnet", fdask.FastnetBackend), ("fastnet-tls", fdask.FastnetTLSBackend)):
        try:
            backend = distributed.comm.registry.get_backend(scheme)
        except ValueError:
            backend = cls()
        assert type(backend) is cls
        monkeypatch.setitem(backends, scheme, backend)


@pytest.fixture(autouse=True, params=["same-host", "tcp"])
def path(request, monkeypatch):
    """Every helper runs on both paths: processes of one host over AF_UNIX (the default), and all over TCP."""
    import copy

    import dask
    # gen_test's clean() resets Dask's config to the one distributed's test utilities saved
    with dask.config.set({fdask.SAME_HOST_CONFIG: request.param == "same-host"}):
        monkeypatch.setattr(utils_test, "original_config", copy.deepcopy(dask.config.config))
        yield request.param


def _on_path(path, *comms):
    """The comms went the path the test asked for (the TLS helpers' contexts check no host name)."""
    import socket
    want = socket.AF_UNIX if path == "same-host" else socket.AF_INET
    for comm in comms:
        assert comm._conn.get_extra_info("socket").family == want


def test_installed_version_matches_checkout():
    """The helpers are the installed distributed's own: same tag."""
    import subprocess
    out = subprocess.run(["git", "-C", SRC, "describe", "--tags", "--exact-match"], capture_output=True, text=True)
    if out.returncode == 0:
        assert out.stdout.strip() == distributed.__version__
    else:   # an exported tree (git archive) carries no tag: compare what it says of itself
        with open(os.path.join(SRC, "pyproject.toml")) as f:
            assert "distributed" in f.read()


@gen_test()
async def test_client_server_ipv4():
    await tc.check_client_server("fastnet://127.0.0.1", tc.tcp_eq("127.0.0.1"))
    await tc.check_client_server("fastnet://127.0.0.1:3241", tc.tcp_eq("127.0.0.1", 3241))
    await tc.check_client_server("fastnet://0.0.0.0", tc.tcp_eq("0.0.0.0"), tc.tcp_eq(EXTERNAL_IP4))
    await tc.check_client_server("fastnet://0.0.0.0:3242", tc.tcp_eq("0.0.0.0", 3242), tc.tcp_eq(EXTERNAL_IP4, 3242))
    await tc.check_client_server("fastnet://", tc.tcp_eq("0.0.0.0"), tc.tcp_eq(EXTERNAL_IP4))
    await tc.check_client_server("fastnet://:3243", tc.tcp_eq("0.0.0.0", 3243), tc.tcp_eq(EXTERNAL_IP4, 3243))


@gen_test()
async def test_tls_client_server_ipv4():
    await tc.check_client_server("fastnet-tls://127.0.0.1", tc.tls_eq("127.0.0.1"), **FASTNET_TLS)
    await tc.check_client_server("fastnet-tls://127.0.0.1:3244", tc.tls_eq("127.0.0.1", 3244), **FASTNET_TLS)
    await tc.check_client_server("fastnet-tls://", tc.tls_eq("0.0.0.0"), tc.tls_eq(EXTERNAL_IP4), **FASTNET_TLS)


@gen_test()
async def test_comm_closed_implicit():
    await tc.check_comm_closed_implicit("fastnet://127.0.0.1")


@gen_test()
async def test_tls_comm_closed_implicit():
    await tc.check_comm_closed_implicit("fastnet-tls://127.0.0.1", **FASTNET_TLS)


@gen_test()
async def test_comm_closed_explicit():
    await tc.check_comm_closed_explicit("fastnet://127.0.0.1")


@gen_test()
async def test_tls_comm_closed_explicit():
    await tc.check_comm_closed_explicit("fastnet-tls://127.0.0.1", **FASTNET_TLS)


@gen_test()
async def test_connect_timeout():
    await tc.check_connect_timeout("fastnet://127.0.0.1:44444")


@gen_test()
async def test_many_listeners():
    await tc.check_many_listeners("fastnet://127.0.0.1")
    await tc.check_many_listeners("fastnet://0.0.0.0")
    await tc.check_many_listeners("fastnet://")


@gen_test()
async def test_deserialize():
    await tc.check_deserialize("fastnet://")


@gen_test()
async def test_deserialize_roundtrip():
    await tc.check_deserialize_roundtrip("fastnet://")


@gen_test()
async def test_deserialize_eoferror():
    await tc.check_deserialize_eoferror("fastnet://")


@gen_test()
async def test_repr():
    a, b = await tc.get_comm_pair("fastnet://")
    assert a.local_address in repr(b)
    assert b.local_address in repr(a)
    await tc.check_repr(a, b)


@gen_test()
async def test_tls_repr():
    a, b = await tc.get_comm_pair("fastnet-tls://", **FASTNET_TLS)
    assert a.local_address in repr(b)
    assert b.local_address in repr(a)
    await tc.check_repr(a, b)


@gen_test()
async def test_addresses(path):
    a, b = await tc.get_comm_pair("fastnet://")
    _on_path(path, a, b)
    await tc.check_addresses(a, b)


@gen_test()
async def test_tls_addresses(path):
    a, b = await tc.get_comm_pair("fastnet-tls://", **FASTNET_TLS)
    _on_path(path, a, b)
    await tc.check_addresses(a, b)


@gen_test()
async def test_tls_extra():
    a, b = await tc.get_comm_pair("fastnet-tls://", **FASTNET_TLS)
    try:
        tc.check_tls_extra(a.extra_info)
        tc.check_tls_extra(b.extra_info)
    finally:
        a.abort()
        b.abort()
