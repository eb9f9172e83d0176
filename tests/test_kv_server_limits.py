"""The kv-server against hostile clients: each test floods or stalls one resource from a raw
socket or gRPC client while a legitimate GrpcTier keeps getting every block back. Real
server processes on port 0, real sockets; limits are set small by flags to keep it quick."""
import argparse
import logging
import os
import select
import socket
import time

import grpc
import pytest
import torch
from grpc_server import KVServerProcess
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.service.bulk_protocol import MAGIC, OK, RESOURCE_EXHAUSTED, put_frame, read_reply
from kvtier.kvstore.service.server.health import HealthService
from kvtier.kvstore.service.server.limits import BulkLimits
from kvtier.kvstore.service.server.main import add_kv_server_arguments, start_server
from kvtier.kvstore.tiers.grpc_tier import GrpcTier
from kvtier.proto.kvtier.v1 import health_pb2
from kvtier.proto.kvtier.v1 import kvstore_pb2 as pb
from kvtier.proto.kvtier.v1 import kvstore_pb2_grpc

SHAPE = (2, 2, 16, 2, 32)  # 16 KiB float32 blocks


def served(tier: GrpcTier, n: int = 6, shape=SHAPE) -> int:
    """Put n fresh blocks through the tier and read them back: how many came back exact."""
    keys = [BlockKey(b"limits", os.urandom(32)) for _ in range(n)]
    data = [torch.randn(shape) for _ in keys]
    tier.put(keys, data)
    into = [torch.empty_like(d) for d in data]
    ok = tier.get(keys, into)
    return sum(hit and torch.equal(a, d) for hit, a, d in zip(ok, into, data))


def over_bulk(tier: GrpcTier) -> bool:
    """The tier's blocks went over the bulk stream, not the gRPC fallback."""
    bulk = tier._servers[0].bulk
    return bulk.fallbacks == 0 and len(bulk._idle) > 0


def as_token(token: str) -> dict:
    return {"metadata": [("authorization", f"Bearer {token}")]}


def hello(host: str, reply, source: str = "127.0.0.1") -> tuple[socket.socket, tuple]:
    sock = socket.create_connection((host, reply.port), timeout=5, source_address=(source, 0))
    sock.sendall(MAGIC + reply.ticket)
    return sock, read_reply(sock)


def idle_connections(host: str, port: int, n: int, source: str) -> list[socket.socket]:
    """n connections to the bulk port that never send a byte (no ticket)."""
    return [socket.create_connection((host, port), timeout=5, source_address=(source, 0)) for _ in range(n)]


def closed_by_server(sock: socket.socket, wait_s: float = 0.0) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if not poller.poll(int(wait_s * 1000)):
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True


def readable(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def trickle(host: str, stub) -> socket.socket:
    """An alpha connection that announces a 900 KB value and sends half of it."""
    sock, reply = hello(host, stub.OpenBulk(pb.OpenBulkRequest(), **as_token("alpha")))
    assert reply[0] == OK
    sock.sendall(put_frame(os.urandom(41), 900_000) + bytes(450_000))
    return sock


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text("alpha\nbeta\n")
    return str(path)


def test_idle_connections_without_a_ticket_do_not_lock_out_ticketed_clients():
    """(a) 256 idle connections (the old whole-port limit) from one address: only the newest
    few per address stay, the rest are dropped, another address keeps its own, and a client
    with a ticket gets in over the bulk stream every time."""
    with KVServerProcess("--capacity", "16MiB", "--bulk-handshake-timeout", "30",
                         "--bulk-max-unauthenticated-per-address", "8") as server:
        tier = GrpcTier([server.address], timeout_s=5.0)
        port = tier._servers[0]._open_bulk().port
        neighbours = idle_connections(server.host, port, 4, "127.0.0.2")
        flood = idle_connections(server.host, port, 256, "127.0.0.1")
        try:
            for _ in range(3):
                tier._servers[0].bulk.close()  # each round needs new connections, like a fresh client
                assert served(tier) == 6
            assert over_bulk(tier) and tier.stats().errors == 0
            deadline = time.monotonic() + 10
            while sum(map(closed_by_server, flood)) < 256 - 8 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sum(map(closed_by_server, flood)) >= 256 - 8  # no more than the per-address share
            assert not any(closed_by_server(s) for s in neighbours)  # not dropped for another address
        finally:
            for s in neighbours + flood:
                s.close()
            tier.close()


def test_the_handshake_deadline_covers_the_whole_handshake():
    """(b) Slowloris: one byte of HELLO every 0.1 s kept a per-recv timeout from ever
    firing; the whole handshake now has 0.5 s, however the bytes trickle in."""
    with KVServerProcess("--capacity", "16MiB", "--bulk-handshake-timeout", "0.5") as server:
        tier = GrpcTier([server.address], timeout_s=5.0)
        port = tier._servers[0]._open_bulk().port
        sock = socket.create_connection((server.host, port), timeout=5)
        start, sent, closed = time.monotonic(), 0, False
        try:
            while sent < len(MAGIC) + 31 and not closed:  # never a whole HELLO
                sock.sendall(b"K")
                sent += 1
                closed = closed_by_server(sock, wait_s=0.1)
        except ConnectionError:
            closed = True
        took = time.monotonic() - start
        sock.close()
        assert closed and took < 2.5, f"still open after {took:.1f} s and {sent} bytes"
        assert served(tier) == 6 and over_bulk(tier)
        tier.close()


def test_health_watches_hold_no_worker_thread_and_are_capped(tokens):
    """(c) More Watch streams than --workers leave the workers free for authenticated calls;
    beyond --max-health-watches a Watch is RESOURCE_EXHAUSTED, and closed ones free their slot."""
    with KVServerProcess("--capacity", "16MiB", "--workers", "2", "--max-health-watches", "8",
                         "--auth-token-file", tokens) as server:
        with grpc.insecure_channel(server.address) as channel:
            watch = channel.unary_stream("/grpc.health.v1.Health/Watch",
                                         request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                         response_deserializer=health_pb2.HealthCheckResponse.FromString)
            streams = [watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(8)]
            assert all(next(s).status == health_pb2.HealthCheckResponse.SERVING for s in streams)
            stub = kvstore_pb2_grpc.KVStoreStub(channel)
            assert stub.Stats(pb.StatsRequest(), timeout=5, **as_token("alpha")).capacity_bytes == 16 << 20
            tier = GrpcTier([server.address], token="beta", timeout_s=5.0)
            assert served(tier) == 6 and tier.stats().errors == 0
            with pytest.raises(grpc.RpcError) as refused:
                next(watch(health_pb2.HealthCheckRequest(), timeout=5))
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for s in streams:
                s.cancel()
            deadline = time.monotonic() + 5  # the server learns of the cancels asynchronously
            while True:
                try:
                    assert next(watch(health_pb2.HealthCheckRequest(), timeout=5)).status == \
                        health_pb2.HealthCheckResponse.SERVING
                    break
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                    time.sleep(0.05)
            tier.close()


def test_a_tenant_flooding_openbulk_does_not_starve_another(tokens, caplog):
    """(d) alpha asks for tickets it never uses, far beyond the server's cap: only alpha's
    share fills; beta keeps using the bulk stream, and alpha's own tier falls back to gRPC
    (logged, counted) and still hits."""
    with KVServerProcess("--capacity", "16MiB", "--auth-token-file", tokens, "--namespace-per-token",
                         "--bulk-max-tickets", "100", "--bulk-max-tickets-per-tenant", "40") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = kvstore_pb2_grpc.KVStoreStub(channel)
            refused = 0
            for _ in range(300):
                try:
                    stub.OpenBulk(pb.OpenBulkRequest(), timeout=5, **as_token("alpha"))
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "tenant" in e.details()
                    refused += 1
            assert refused == 300 - 40
        alpha, beta = (GrpcTier([server.address], token=t, timeout_s=5.0) for t in ("alpha", "beta"))
        assert served(beta) == 6 and over_bulk(beta)
        caplog.set_level(logging.WARNING, logger="kvtier.kvstore.service.bulk_client")
        for _ in range(3):
            alpha._servers[0].bulk._use_grpc_until = 0.0  # ask for a ticket again every time
            assert served(alpha) == 6
        assert alpha._servers[0].bulk.fallbacks >= 3
        assert len([r for r in caplog.records if "bulk stream refused" in r.getMessage()]) == 1  # rate-limited
        assert alpha.stats().errors == 0 and beta.stats().errors == 0
        alpha.close()
        beta.close()


def test_a_tenant_holding_its_connections_does_not_block_another(tokens):
    """alpha holds its whole share of bulk connections: its next HELLO is RESOURCE_EXHAUSTED
    (its tier then uses gRPC and still hits), while beta connects over the bulk stream."""
    with KVServerProcess("--capacity", "16MiB", "--auth-token-file", tokens, "--namespace-per-token",
                         "--bulk-max-connections-per-tenant", "4") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = kvstore_pb2_grpc.KVStoreStub(channel)
            held = [hello(server.host, stub.OpenBulk(pb.OpenBulkRequest(), **as_token("alpha"))) for _ in range(4)]
            assert all(reply[0] == OK for _, reply in held)
            extra, reply = hello(server.host, stub.OpenBulk(pb.OpenBulkRequest(), **as_token("alpha")))
            assert reply[0] == RESOURCE_EXHAUSTED and "tenant" in reply[3]
            extra.close()
        alpha, beta = (GrpcTier([server.address], token=t, timeout_s=5.0) for t in ("alpha", "beta"))
        assert served(beta) == 6 and over_bulk(beta)
        assert served(alpha) == 6 and alpha._servers[0].bulk.fallbacks > 0 and alpha.stats().errors == 0
        for sock, _ in held:
            sock.close()
        alpha.close()
        beta.close()


def test_a_tenant_trickling_a_huge_put_does_not_take_anothers_memory(tokens):
    """alpha announces a 900 KB value and sends half: that much of its 1 MiB in-flight
    budget is held. Its next big put is refused (RESOURCE_EXHAUSTED, and its tier falls back
    to gRPC), while beta's 512 KiB blocks go over the bulk stream."""
    big = (64, 2, 16, 2, 32)  # 512 KiB float32 blocks
    with KVServerProcess("--capacity", "32MiB", "--auth-token-file", tokens, "--namespace-per-token",
                         "--bulk-max-inflight-per-tenant", "1MiB", "--bulk-max-inflight", "3MiB") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = kvstore_pb2_grpc.KVStoreStub(channel)
            slow = trickle(server.host, stub)
            deadline = time.monotonic() + 10  # until the server has read slow's frame and reserved it
            while True:
                if readable(slow):  # answered, so refused: a probe reserved first; hold again
                    slow.close()
                    slow = trickle(server.host, stub)
                probe, _ = hello(server.host, stub.OpenBulk(pb.OpenBulkRequest(), **as_token("alpha")))
                probe.sendall(put_frame(os.urandom(41), 200_000))  # its value never follows
                probe.settimeout(0.5)
                try:
                    status, _, _, message = read_reply(probe)
                except TimeoutError:
                    status = None  # admitted: the server waits for the value
                probe.close()
                if status == RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                    break
            assert status == RESOURCE_EXHAUSTED and "in flight" in message
        alpha, beta = (GrpcTier([server.address], token=t, timeout_s=5.0) for t in ("alpha", "beta"))
        assert served(beta, 3, big) == 3 and over_bulk(beta)
        assert served(alpha, 3, big) == 3 and alpha._servers[0].bulk.fallbacks > 0 and alpha.stats().errors == 0
        slow.close()
        alpha.close()
        beta.close()


def test_a_port_full_of_ticketed_connections_drops_newcomers_and_clients_use_grpc():
    """When every slot holds a ticketed connection the port closes new ones at once; the
    client tier takes that as a refusal and its blocks still hit, over gRPC."""
    with KVServerProcess("--capacity", "16MiB", "--bulk-max-connections", "3", "--bulk-max-unauthenticated", "1",
                         "--bulk-max-unauthenticated-per-address", "1") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = kvstore_pb2_grpc.KVStoreStub(channel)
            held = [hello(server.host, stub.OpenBulk(pb.OpenBulkRequest())) for _ in range(3)]
            assert all(reply[0] == OK for _, reply in held)
        tier = GrpcTier([server.address], namespace="other", timeout_s=5.0)
        assert served(tier) == 6 and tier._servers[0].bulk.fallbacks > 0 and tier.stats().errors == 0
        for sock, _ in held:
            sock.close()
        tier.close()


@pytest.mark.parametrize("flags, words", [
    (["--bulk-max-unauthenticated", "256"], "max_unauthenticated"),
    (["--bulk-max-tickets-per-tenant", "0"], "max_tickets_per_tenant"),
    (["--bulk-handshake-timeout", "0"], "handshake_timeout_s"),
    (["--max-health-watches", "0"], "--max-health-watches"),
])
def test_bad_limits_are_value_errors(flags, words):
    parser = argparse.ArgumentParser()
    add_kv_server_arguments(parser)
    with pytest.raises(ValueError, match=words):
        start_server(parser.parse_args(["--listen", "127.0.0.1:0", *flags]))
    assert BulkLimits().max_unauthenticated < BulkLimits().max_connections
    with pytest.raises(ValueError):
        HealthService(max_watches=0)
