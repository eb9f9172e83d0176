"""Certificates are judged alike on every Python: the bulk stream verifies strictly (as
Python 3.13 does by default), and a chain it refuses sends the grpc tier to gRPC's TLS with
the reason logged, never to misses."""
import logging
import socket
import ssl

import torch
from grpc_server import KVServerProcess
from test_grpc_tier import LAYOUT, blocks, read_back
from tls_certs import make_certificates

from kvtier.kvstore.service.tls import certificate_problem, client_context
from kvtier.kvstore.tiers.spec import build_tier


def _handshake(port: int, ca: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        client_context(ca).wrap_socket(raw, server_hostname="127.0.0.1").close()


def _bulk_port(tier) -> int:
    return tier._servers[0]._open_bulk().port


def test_a_conforming_chain_passes_strict_verification_and_uses_the_bulk_stream(certs):
    with KVServerProcess("--capacity", "16MiB", "--tls-cert", str(certs.server_cert),
                         "--tls-key", str(certs.server_key)) as server:
        tier = build_tier(f"grpc://{server.address}?tls=1&ca={certs.ca}", LAYOUT)
        _handshake(_bulk_port(tier), certs.ca.read_bytes())  # raises if strict checks refused it
        keys, data = blocks(4)
        tier.put(keys, data)
        ok, into = read_back(tier, keys, data)
        assert ok == [True] * 4 and all(torch.equal(x, y) for x, y in zip(into, data))
        assert tier._servers[0].bulk.fallbacks == 0 and len(tier._servers[0].bulk._idle) == 1
        tier.close()


def test_a_ca_without_key_usage_falls_back_to_grpc_and_says_why(tmp_path, caplog):
    legacy = make_certificates(tmp_path, conforming=False)
    with KVServerProcess("--capacity", "16MiB", "--tls-cert", str(legacy.server_cert),
                         "--tls-key", str(legacy.server_key)) as server:
        tier = build_tier(f"grpc://{server.address}?tls=1&ca={legacy.ca}", LAYOUT)
        try:
            _handshake(_bulk_port(tier), legacy.ca.read_bytes())
        except ssl.SSLError as e:  # the same on 3.10-3.12 as on 3.13
            assert certificate_problem(e) is not None
        else:
            raise AssertionError("strict verification accepted a CA without keyUsage")
        keys, data = blocks(4)
        with caplog.at_level(logging.WARNING):
            tier.put(keys, data)
            ok, into = read_back(tier, keys, data)
        assert ok == [True] * 4 and all(torch.equal(x, y) for x, y in zip(into, data))  # hits via gRPC
        assert tier._servers[0].bulk._idle == []  # no bulk connection was kept
        warnings = [r.getMessage() for r in caplog.records if "TLS handshake failed" in r.getMessage()]
        assert len(warnings) == 1 and "falling back to gRPC" in warnings[0]
        assert "key usage" in warnings[0].lower() or "certificate" in warnings[0].lower()
        tier.close()


def test_certificate_problem_names_only_certificate_failures():
    assert certificate_problem(ConnectionResetError()) is None
    assert certificate_problem(ssl.SSLEOFError()) is None
    err = ssl.SSLCertVerificationError(1, "certificate verify failed")
    err.verify_message = "CA cert does not include key usage extension"
    assert certificate_problem(err) == "CA cert does not include key usage extension"
