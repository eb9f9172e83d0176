"""The kv-server through a raw gRPC client: protocol, limits, bad input, auth, drain."""
import argparse
import os
import queue
import signal
import threading

import grpc
import pytest
import torch

from grpc_server import KVServerProcess
from kvtier.kvstore.format.codec import encode_block
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.service.server.main import add_kv_server_arguments, start_server
from kvtier.proto.kvtier.v1 import health_pb2
from kvtier.proto.kvtier.v1 import kvstore_pb2 as pb
from kvtier.proto.kvtier.v1 import kvstore_pb2_grpc

MAX_MESSAGE = 256 << 10
CAPACITY = 4 << 20


def new_key() -> bytes:
    return BlockKey(b"test", os.urandom(32)).to_bytes()


def block_value(key: bytes, nbytes: int = 1024) -> bytes:
    return encode_block(BlockKey.from_bytes(key), torch.randint(0, 255, (nbytes,), dtype=torch.uint8))


def put_chunks(items, chunk=MAX_MESSAGE - 1024):
    """Protobuf BlockChunks messages, one chunk per message (the tier packs several)."""
    for key, value in items:
        for off in range(0, len(value), chunk):
            yield one_chunk(key=key if off == 0 else b"", total_size=len(value), offset=off, data=value[off : off + chunk])


def one_chunk(**fields) -> pb.BlockChunks:
    return pb.BlockChunks(chunks=[pb.BlockChunk(**fields)])


def get_values(stub, keys, **kw) -> dict[int, bytes]:
    out: dict[int, bytearray] = {}
    for message in stub.Get(pb.GetRequest(keys=keys), **kw):
        assert message.ByteSize() <= MAX_MESSAGE
        for c in message.chunks:
            out.setdefault(c.index, bytearray()).extend(c.data)
    return {i: bytes(v) for i, v in out.items()}


def status_of(call, *args, **kw) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        result = call(*args, **kw)
        if hasattr(result, "__iter__") and not isinstance(result, (pb.PutResponse,)):
            list(result)
    return e.value.code(), e.value.details()


@pytest.fixture(scope="module")
def server():
    with KVServerProcess("--capacity", str(CAPACITY), "--max-message-bytes", str(MAX_MESSAGE)) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield kvstore_pb2_grpc.KVStoreStub(channel)


def test_put_lookup_get_delete_round_trip(stub):
    keys = [new_key() for _ in range(4)]
    values = [block_value(k, 1000 + i) for i, k in enumerate(keys)]
    assert stub.Put(put_chunks(zip(keys[:3], values[:3]))).stored == 3
    reply = stub.Lookup(pb.LookupRequest(keys=[keys[0], keys[1], keys[3], keys[2]]))
    assert reply.prefix_length == 2 and list(reply.present) == [True, True, False, True]
    assert get_values(stub, [keys[3], keys[2], keys[0]]) == {1: values[2], 2: values[0]}
    assert stub.Delete(pb.DeleteRequest(keys=[keys[0], keys[3]])).deleted == 1
    assert list(stub.Lookup(pb.LookupRequest(keys=keys)).present) == [False, True, True, False]
    stats = stub.Stats(pb.StatsRequest())
    assert stats.capacity_bytes == CAPACITY and stats.max_message_bytes == MAX_MESSAGE and not stats.persistent


def test_a_block_larger_than_a_message_travels_in_chunks(stub):
    key = new_key()
    value = block_value(key, 3 * MAX_MESSAGE + 17)
    assert stub.Put(put_chunks([(key, value)])).stored == 1
    messages = list(stub.Get(pb.GetRequest(keys=[key])))
    assert len(messages) >= 4 and all(m.ByteSize() <= MAX_MESSAGE for m in messages)
    assert b"".join(c.data for m in messages for c in m.chunks) == value


def test_small_blocks_share_messages_both_ways(stub):
    keys = [new_key() for _ in range(20)]
    values = [block_value(k, 10000 + i) for i, k in enumerate(keys)]
    packed = pb.BlockChunks(chunks=[pb.BlockChunk(key=k, total_size=len(v), data=v) for k, v in zip(keys, values)])
    assert stub.Put(iter([packed])).stored == 20
    messages = list(stub.Get(pb.GetRequest(keys=keys)))
    assert len(messages) == 1 and [c.data for c in messages[0].chunks] == values


def test_lru_evicts_the_least_recently_used_bytes(stub):
    keys = [new_key() for _ in range(12)]
    for k in keys:  # 12 x 512 KiB through a 4 MiB store
        stub.Put(put_chunks([(k, block_value(k, 512 << 10))]))
        get_values(stub, [keys[0]])  # keep the first one hot
    present = list(stub.Lookup(pb.LookupRequest(keys=keys)).present)
    assert present[0] and present[-1] and not present[1]
    stats = stub.Stats(pb.StatsRequest())
    assert stats.used_bytes <= CAPACITY and stats.evictions > 0


@pytest.mark.parametrize("bad", [b"", b"k" * 257])
def test_empty_or_oversized_keys_are_invalid_argument(stub, bad):
    for call, request in [(stub.Lookup, pb.LookupRequest(keys=[new_key(), bad])),
                          (stub.Get, pb.GetRequest(keys=[bad])),
                          (stub.Delete, pb.DeleteRequest(keys=[bad]))]:
        code, message = status_of(call, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "key" in message
    code, _ = status_of(stub.Put, iter([one_chunk(key=bad, total_size=200, data=bytes(200))]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_values_are_refused_and_earlier_blocks_kept(stub):
    good, bad = new_key(), new_key()
    value = bytearray(block_value(bad))
    value[-1] ^= 0xFF  # flipped payload byte: checksum mismatch
    code, message = status_of(stub.Put, put_chunks([(good, block_value(good)), (bad, bytes(value))]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "block 1" in message and "checksum" in message
    assert list(stub.Lookup(pb.LookupRequest(keys=[good, bad])).present) == [True, False]
    cases = {
        "another key": block_value(new_key()),
        "magic": b"\0" * 200,
        "shorter": b"KVTB",
    }
    for expected, value in cases.items():
        code, message = status_of(stub.Put, iter([one_chunk(key=bad, total_size=len(value), data=value)]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and expected in message, message
    assert stub.Stats(pb.StatsRequest()).rejected >= 4


def test_broken_chunk_streams_store_nothing_of_the_broken_block(stub):
    key = new_key()
    value = block_value(key, 4000)
    half = [one_chunk(key=key, total_size=len(value), data=value[:1000])]
    gap = half + [one_chunk(total_size=len(value), offset=2000, data=value[2000:])]
    for stream, expected in [(half, "ended inside the block"), (gap, "does not continue")]:
        code, message = status_of(stub.Put, iter(stream))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and expected in message
    orphan = [one_chunk(total_size=10, offset=0, data=b"x" * 10)]
    assert status_of(stub.Put, iter(orphan))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert not stub.Lookup(pb.LookupRequest(keys=[key])).present[0]


def test_too_large_for_the_store_or_the_message_limit_is_resource_exhausted(stub):
    key = new_key()
    code, message = status_of(stub.Put, iter([one_chunk(key=key, total_size=CAPACITY + 1, data=b"KVTB")]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "capacity" in message
    huge = pb.LookupRequest(keys=[new_key() for _ in range(MAX_MESSAGE // 40)])
    assert status_of(stub.Lookup, huge)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    # the server is still fine afterwards
    assert stub.Lookup(pb.LookupRequest(keys=[key])).prefix_length == 0


def test_health_service_answers_the_standard_check(server):
    with grpc.insecure_channel(server.address) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                    response_deserializer=health_pb2.HealthCheckResponse.FromString)
        for service in ("", "kvtier.v1.KVStore"):
            assert check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
        assert status_of(check, health_pb2.HealthCheckRequest(service="nope"))[0] == grpc.StatusCode.NOT_FOUND


def test_health_watch_streams_serving_then_not_serving_on_sigterm():
    with KVServerProcess("--capacity", "1MiB") as server:
        with grpc.insecure_channel(server.address) as channel:
            watch = channel.unary_stream("/grpc.health.v1.Health/Watch",
                                         request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                         response_deserializer=health_pb2.HealthCheckResponse.FromString)
            unknown = watch(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
            assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            unknown.cancel()
            stream = watch(health_pb2.HealthCheckRequest(service="kvtier.v1.KVStore"), timeout=30)
            assert next(stream).status == health_pb2.HealthCheckResponse.SERVING
            server.proc.send_signal(signal.SIGTERM)
            assert [m.status for m in stream] == [health_pb2.HealthCheckResponse.NOT_SERVING]  # then it ends
        assert server.proc.wait(30) == 0


def test_bad_configurations_are_value_errors(tmp_path):
    parser = argparse.ArgumentParser()
    add_kv_server_arguments(parser)
    empty = tmp_path / "tokens"
    empty.write_text("# nobody\n")
    for flags in (["--tls-cert", "c.pem"], ["--workers", "0"], ["--namespace-per-token"],
                  ["--auth-token-file", str(empty)], ["--auth-token-file", str(tmp_path / "missing")],
                  ["--max-message-bytes", "100"], ["--bulk-listen", "no-port"], ["--tls-client-ca", "ca.pem"],
                  ["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(tmp_path / "missing.key")]):
        with pytest.raises(ValueError):
            start_server(parser.parse_args(["--listen", "127.0.0.1:0", *flags]))


def test_sigterm_drains_an_in_flight_put_and_exits_cleanly():
    with KVServerProcess("--capacity", "16MiB", "--drain-seconds", "20") as server:
        key = new_key()
        value = block_value(key, 10000)
        pending: queue.Queue = queue.Queue()
        with grpc.insecure_channel(server.address) as channel:
            stub = kvstore_pb2_grpc.KVStoreStub(channel)
            call = stub.Put.future(iter(pending.get, None))
            pending.put(one_chunk(key=key, total_size=len(value), data=value[:5000]))
            assert stub.Lookup(pb.LookupRequest(keys=[key])).prefix_length == 0  # the Put is open
            exit_code: list[int] = []
            waiter = threading.Thread(target=lambda: exit_code.append(server.terminate()))
            waiter.start()
            waiter.join(timeout=1.0)
            assert waiter.is_alive(), "the server exited with a call in flight"
            pending.put(one_chunk(total_size=len(value), offset=5000, data=value[5000:]))
            pending.put(None)
            assert call.result(timeout=20).stored == 1
            waiter.join(timeout=30)
        assert exit_code == [0]
        assert "stopped" in server.output()


@pytest.fixture(scope="module")
def tenant_server(tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text("# token namespaces\ntoken-a\ntoken-b\ntoken-admin team-x team-y\n")
    with KVServerProcess("--capacity", "16MiB", "--auth-token-file", str(tokens), "--namespace-per-token") as s:
        yield s


def _as(token: str | None, namespace: str | None = None):
    md = [] if token is None else [("authorization", f"Bearer {token}")]
    return {"metadata": md + ([("kvtier-namespace", namespace)] if namespace else [])}


def test_calls_without_the_right_token_are_unauthenticated(tenant_server):
    with grpc.insecure_channel(tenant_server.address) as channel:
        stub = kvstore_pb2_grpc.KVStoreStub(channel)
        key = new_key()
        for who in (None, "wrong-token"):
            for call, request in [(stub.Lookup, pb.LookupRequest(keys=[key])), (stub.Get, pb.GetRequest(keys=[key])),
                                  (stub.Stats, pb.StatsRequest()), (stub.Delete, pb.DeleteRequest(keys=[key]))]:
                code, _ = status_of(call, request, **_as(who))
                assert code == grpc.StatusCode.UNAUTHENTICATED
            code, _ = status_of(stub.Put, put_chunks([(key, block_value(key))]), **_as(who))
            assert code == grpc.StatusCode.UNAUTHENTICATED
        assert stub.Put(put_chunks([(key, block_value(key))]), **_as("token-a")).stored == 1
        health = channel.unary_unary("/grpc.health.v1.Health/Check",
                                     request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                     response_deserializer=health_pb2.HealthCheckResponse.FromString)
        assert health(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_namespace_per_token_isolates_tenants(tenant_server):
    with grpc.insecure_channel(tenant_server.address) as channel:
        stub = kvstore_pb2_grpc.KVStoreStub(channel)
        key = new_key()
        value_a, value_b = block_value(key, 100), block_value(key, 200)  # same key, two tenants
        assert stub.Put(put_chunks([(key, value_a)]), **_as("token-a")).stored == 1
        assert stub.Lookup(pb.LookupRequest(keys=[key]), **_as("token-b")).prefix_length == 0
        assert get_values(stub, [key], **_as("token-b")) == {}
        assert stub.Delete(pb.DeleteRequest(keys=[key]), **_as("token-b")).deleted == 0
        assert stub.Put(put_chunks([(key, value_b)]), **_as("token-b")).stored == 1
        assert get_values(stub, [key], **_as("token-a")) == {0: value_a}
        assert get_values(stub, [key], **_as("token-b")) == {0: value_b}
        # a token with listed namespaces uses the first by default and may pick the others
        stub.Put(put_chunks([(key, value_a)]), **_as("token-admin"))
        assert stub.Lookup(pb.LookupRequest(keys=[key]), **_as("token-admin", "team-x")).prefix_length == 1
        assert stub.Lookup(pb.LookupRequest(keys=[key]), **_as("token-admin", "team-y")).prefix_length == 0
        for token, namespace in [("token-a", "team-x"), ("token-b", "anything")]:
            code, message = status_of(stub.Lookup, pb.LookupRequest(keys=[key]), **_as(token, namespace))
            assert code == grpc.StatusCode.PERMISSION_DENIED and namespace in message


def test_a_malformed_put_message_is_invalid_argument(server):
    with grpc.insecure_channel(server.address) as channel:
        put = channel.stream_unary("/kvtier.v1.KVStore/Put", request_serializer=None,
                                   response_deserializer=pb.PutResponse.FromString)
        code, message = status_of(put, iter([b"\x2a\x05abc"]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in message


def test_the_server_pins_glibcs_allocator_thresholds():
    """The kv-server keeps block memory for reuse instead of mmap-ing and returning it per
    block (service/server/memory.py); glibc accepts the settings (this machine runs glibc)."""
    import platform

    from kvtier.kvstore.service.server.memory import keep_block_memory_for_reuse

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator settings are glibc's")
    assert keep_block_memory_for_reuse()
