"""kv-server metrics: a real server (in-process and as `kvtier kv-server --metrics-port 0`),
real gRPC and bulk-stream calls, then /metrics scraped and parsed with prometheus_client."""
import argparse
import os
import re
import time

import grpc
import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from grpc_server import KVServerProcess
from kvtier.kvstore.format.codec import encode_block
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.service.server.main import METRICS_ON, add_kv_server_arguments, start_server
from kvtier.kvstore.tiers.grpc_tier import GrpcTier
from kvtier.proto.kvtier.v1 import kvstore_pb2 as pb
from kvtier.proto.kvtier.v1 import kvstore_pb2_grpc

TOKEN = "metrics-token"


def scrape(port: int) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} of one /metrics page."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def new_key() -> bytes:
    return BlockKey(b"test", os.urandom(32)).to_bytes()


def block_value(key: bytes, nbytes: int) -> bytes:
    return encode_block(BlockKey.from_bytes(key), torch.randint(0, 255, (nbytes,), dtype=torch.uint8))


def one_message(items) -> pb.BlockChunks:
    return pb.BlockChunks(chunks=[pb.BlockChunk(key=k, total_size=len(v), data=v) for k, v in items])


@pytest.fixture
def server(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    parser = argparse.ArgumentParser()
    add_kv_server_arguments(parser)
    args = parser.parse_args(["--listen", "127.0.0.1:0", "--capacity", "16MiB", "--bulk-listen", "off",
                              "--auth-token-file", str(tokens), "--metrics-port", "0"])
    running = start_server(args)
    yield running
    running.stop(0)


def test_grpc_calls_bytes_auth_and_store_are_counted(server):
    auth = [("authorization", f"Bearer {TOKEN}")]
    keys = [new_key() for _ in range(3)]
    values = [block_value(k, 2000 + i) for i, k in enumerate(keys)]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = kvstore_pb2_grpc.KVStoreStub(channel)
        assert stub.Put(iter([one_message(zip(keys, values))]), metadata=auth).stored == 3
        assert stub.Lookup(pb.LookupRequest(keys=keys), metadata=auth).prefix_length == 3
        got = list(stub.Get(pb.GetRequest(keys=keys[:2]), metadata=auth))
        stats = stub.Stats(pb.StatsRequest(), metadata=auth)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Lookup(pb.LookupRequest(keys=keys), metadata=[("authorization", "Bearer wrong")])
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as bad:
            stub.Lookup(pb.LookupRequest(keys=[b""]), metadata=auth)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    m = scrape(server.metrics_port)
    req = "kvtier_kv_server_requests_total"
    assert value(m, req, method="Put", code="OK") == 1
    assert value(m, req, method="Lookup", code="OK") == 1
    assert value(m, req, method="Get", code="OK") == 1
    assert value(m, req, method="Lookup", code="UNAUTHENTICATED") == 1
    assert value(m, req, method="Lookup", code="INVALID_ARGUMENT") == 1
    assert value(m, "kvtier_kv_server_auth_failures_total", transport="grpc") == 1
    # bytes on the wire: at least the values themselves, both ways
    assert value(m, "kvtier_kv_server_received_bytes_total", transport="grpc") >= sum(map(len, values))
    sent_values = sum(len(c.data) for msg in got for c in msg.chunks)
    assert sent_values == len(values[0]) + len(values[1])
    assert value(m, "kvtier_kv_server_sent_bytes_total", transport="grpc") >= sent_values
    assert value(m, "kvtier_kv_server_stored_blocks") == stats.blocks == 3
    assert value(m, "kvtier_kv_server_stored_bytes") == stats.used_bytes >= sum(map(len, values))
    assert value(m, "kvtier_kv_server_capacity_bytes") == 16 << 20


def test_cli_flag_serves_metrics_and_bulk_bytes_are_counted():
    with KVServerProcess("--capacity", "16MiB", "--metrics-port", "0") as server:
        deadline, line = time.monotonic() + 10, ""
        while METRICS_ON not in line and time.monotonic() < deadline:
            line += server.output()
            time.sleep(0.05)
        port = int(re.search(re.escape(METRICS_ON) + r" \S+:(\d+)", line).group(1))
        tier = GrpcTier([server.address], timeout_s=30)
        try:
            keys = [BlockKey(b"model", os.urandom(32)) for _ in range(4)]
            blocks = [torch.randn(2, 2, 16, 4, 8) for _ in keys]
            tier.put(keys, blocks)  # the bulk stream carries puts when the server offers it
            into = [torch.empty_like(b) for b in blocks]
            assert tier.get(keys, into) == [True] * 4
        finally:
            tier.close()
        m = scrape(port)
        raw = sum(b.numel() * b.element_size() for b in blocks)
        assert value(m, "kvtier_kv_server_received_bytes_total", transport="bulk") >= raw
        assert value(m, "kvtier_kv_server_stored_blocks") == 4
        assert value(m, "kvtier_kv_server_requests_total", method="OpenBulk", code="OK") >= 1
        assert value(m, "kvtier_kv_server_sent_bytes_total", transport="bulk") >= raw  # gets take it too
