"""Shared pytest setup: `gpu`-marked tests skip where no CUDA device is present; one set of
TLS certificates (a private CA, a server and a client certificate) for the TLS tests; a
redis-server of a test's own."""
import pytest
import torch
from redis_server import RedisServer
from tls_certs import make_certificates


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def redis_server():
    """A redis-server on a free port for this test alone (never the machine's shared one): the
    test may kill and restart it."""
    server = RedisServer().start()
    yield server
    server.stop()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
