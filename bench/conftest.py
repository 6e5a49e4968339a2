"""Fixtures for the pytest-benchmark suites in bench/.

The server of every benchmark runs in a child process (``serve`` from
``fastnet/bench/runner.py``); the benchmark times the client side, here.

    python3 -m pytest bench/ --benchmark-json=out.json     # measure
    python3 -m pytest bench/ --benchmark-disable           # smoke run, each body once
"""
import pytest

from benchutil import runner


def pytest_addoption(parser):
    group = parser.getgroup("fastnet bench")
    group.addoption("--fastnet-bulk-mib", type=float, default=64.0,
                    help="size of the bulk benchmark's float64 array in MiB (default 64)")
    group.addoption("--fastnet-stream-n", type=int, default=20000,
                    help="messages per timed stream burst (default 20000)")


@pytest.fixture(scope="session")
def bulk_nbytes(request):
    return int(request.config.getoption("--fastnet-bulk-mib") * 2 ** 20) // 8 * 8


@pytest.fixture(scope="session")
def stream_n(request):
    return request.config.getoption("--fastnet-stream-n")


@pytest.fixture
def serve():
    return runner.serve
