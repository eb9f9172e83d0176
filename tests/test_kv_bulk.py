"""The kv-server's bulk stream (block bytes beside gRPC) against real server processes: the
protocol from a raw socket client, its equivalence with gRPC's Put and Get, auth, TLS,
mutual TLS, restarts, corruption and fallback."""
import os
import signal
import socket
import ssl

import grpc
import pytest
import torch
from grpc_server import KVServerProcess
from kvtier.kvstore.format.codec import encode_block
from kvtier.kvstore.tiers.grpc_tier import GrpcTier
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.service.bulk_protocol import (
    FRAME,
    INVALID_ARGUMENT,
    MAGIC,
    OK,
    OP_PUT,
    RESOURCE_EXHAUSTED,
    SYNC_FRAME,
    UNAUTHENTICATED,
    VALUE_LENGTH,
    get_request,
    put_frame,
    read_reply,
)
from kvtier.kvstore.socket_io import recv_exact_into
from kvtier.kvstore.tiers.spec import BlockLayout, build_tier
from kvtier.proto.kvtier.v1 import kvstore_pb2 as pb
from kvtier.proto.kvtier.v1 import kvstore_pb2_grpc

CAPACITY = 4 << 20
SHAPE = (2, 2, 16, 2, 32)


def new_key() -> bytes:
    return BlockKey(b"bulk", os.urandom(32)).to_bytes()


def block_value(key: bytes, nbytes: int = 4096) -> bytes:
    return encode_block(BlockKey.from_bytes(key), torch.randint(0, 255, (nbytes,), dtype=torch.uint8))


@pytest.fixture(scope="module")
def server():
    with KVServerProcess("--capacity", str(CAPACITY)) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield kvstore_pb2_grpc.KVStoreStub(channel)


def connect(server, stub, ticket: bytes | None = None) -> tuple[socket.socket, tuple]:
    """A raw bulk connection: OpenBulk, connect, HELLO; (socket, the HELLO reply)."""
    reply = stub.OpenBulk(pb.OpenBulkRequest())
    assert reply.port > 0 and not reply.tls and len(reply.ticket) == 32
    sock = socket.create_connection((server.host, reply.port), timeout=10)
    sock.sendall(MAGIC + (reply.ticket if ticket is None else ticket))
    return sock, read_reply(sock)


def put(sock, key: bytes, value: bytes) -> None:
    sock.sendall(put_frame(key, len(value)) + value)


def sync(sock) -> tuple:
    sock.sendall(SYNC_FRAME)
    return read_reply(sock)


def stored_value(stub, key: bytes) -> bytes | None:
    data = bytearray()
    for message in stub.Get(pb.GetRequest(keys=[key])):
        for chunk in message.chunks:
            data += chunk.data
    return bytes(data) or None


def test_put_over_the_stream_then_get_over_grpc(server, stub):
    sock, hello = connect(server, stub)
    assert hello[0] == OK
    items = [(k, block_value(k, n)) for k, n in ((new_key(), 100), (new_key(), 5000), (new_key(), 300_000))]
    for key, value in items:
        put(sock, key, value)
    assert sync(sock) == (OK, 3, 0, "")
    assert sync(sock) == (OK, 0, 0, "")  # counts are per SYNC
    sock.close()
    for key, value in items:
        assert stored_value(stub, key) == value


def test_tickets_are_single_use_and_unknown_ones_are_refused(server, stub):
    reply = stub.OpenBulk(pb.OpenBulkRequest())
    for ticket, expected in ((reply.ticket, OK), (reply.ticket, UNAUTHENTICATED), (os.urandom(32), UNAUTHENTICATED)):
        sock = socket.create_connection((server.host, reply.port), timeout=10)
        sock.sendall(MAGIC + ticket)
        status, _, _, message = read_reply(sock)
        assert status == expected
        if expected != OK:
            assert "ticket" in message and sock.recv(1) == b""  # and the server hung up
        sock.close()


def test_a_bad_value_is_rejected_alone_and_the_stream_goes_on(server, stub):
    sock, _ = connect(server, stub)
    good, flipped, foreign, after = (new_key() for _ in range(4))
    corrupt = bytearray(block_value(flipped))
    corrupt[-1] ^= 1
    put(sock, good, block_value(good))
    put(sock, flipped, bytes(corrupt))
    put(sock, foreign, block_value(new_key()))  # a valid value, but made for another key
    status, stored, rejected, message = sync(sock)
    assert (status, stored, rejected) == (INVALID_ARGUMENT, 1, 2) and "block 1" in message and "checksum" in message
    put(sock, after, block_value(after))
    assert sync(sock) == (OK, 1, 0, "")
    sock.close()
    assert stored_value(stub, good) and stored_value(stub, after)
    assert stored_value(stub, flipped) is None and stored_value(stub, foreign) is None


@pytest.mark.parametrize("frame, status, words", [
    (FRAME.pack(OP_PUT, 0, 1000), INVALID_ARGUMENT, "key of 0 bytes"),
    (FRAME.pack(OP_PUT, 300, 1000), INVALID_ARGUMENT, "key of 300 bytes"),
    (FRAME.pack(OP_PUT, 41, CAPACITY + 1), RESOURCE_EXHAUSTED, "capacity"),
    (FRAME.pack(OP_PUT, 41, 10), INVALID_ARGUMENT, "shorter than a block header"),
    (FRAME.pack(9, 0, 0), INVALID_ARGUMENT, "unknown frame op 9"),
])
def test_an_untrustworthy_frame_ends_the_connection_keeping_earlier_blocks(server, stub, frame, status, words):
    sock, _ = connect(server, stub)
    before = new_key()
    put(sock, before, block_value(before))
    sock.sendall(frame)
    got_status, stored, _, message = read_reply(sock)
    assert got_status == status and words in message and stored == 1
    assert sock.recv(1) == b""
    sock.close()
    assert stored_value(stub, before) is not None


def test_a_connection_that_breaks_inside_a_block_stores_nothing_of_it(server, stub):
    sock, _ = connect(server, stub)
    key = new_key()
    value = block_value(key, 100_000)
    sock.sendall(put_frame(key, len(value)) + value[:50_000])
    sock.close()
    sock, hello = connect(server, stub)  # the server still serves
    assert hello[0] == OK and sync(sock)[0] == OK
    sock.close()
    assert stored_value(stub, key) is None


def test_the_stream_stores_exactly_what_grpc_put_stores():
    """The fast path (bulk stream) against the reference (gRPC Put): the same blocks in two
    namespaces end up byte-identical."""
    keys = [BlockKey(b"model", os.urandom(32)) for _ in range(13)]
    data = [torch.randn(SHAPE) for _ in range(12)] + [torch.randn(32, 2, 16, 8, 64)]  # 16 MiB: chunked by gRPC
    with KVServerProcess("--capacity", "256MiB") as server:
        fast = GrpcTier([server.address], namespace="fast", timeout_s=30)
        reference = GrpcTier([server.address], namespace="reference", bulk=False, timeout_s=30)
        try:
            fast.put(keys, data)
            reference.put(keys, data)
            assert len(fast._servers[0].bulk._idle) == 1  # the bulk stream carried it
            assert reference._servers[0].bulk is None
            raw = [k.to_bytes() for k in keys]
            values = fast._servers[0].get(raw)
            assert all(v is not None for v in values)
            assert [bytes(v) for v in values] == [bytes(v) for v in reference._servers[0].get(raw)]
        finally:
            fast.close()
            reference.close()


def test_without_a_bulk_port_puts_fall_back_to_grpc():
    with KVServerProcess("--capacity", "16MiB", "--bulk-listen", "off") as server:
        tier = GrpcTier([server.address])
        keys = [BlockKey(b"model", os.urandom(32)) for _ in range(4)]
        data = [torch.randn(SHAPE) for _ in keys]
        tier.put(keys, data)
        assert tier.lookup_prefix(keys) == 4 and tier.stats().errors == 0
        assert tier._servers[0].bulk.connection() is None
        tier.close()


def test_pooled_connections_survive_a_server_restart():
    """After a restart the pooled connection is dead; the next put notices before sending
    and opens a new one (the restarted server has a new bulk port) without an error."""
    with KVServerProcess("--capacity", "16MiB") as server:
        tier = GrpcTier([server.address], timeout_s=5.0, cooldown_s=0.1)
        keys = [BlockKey(b"model", os.urandom(32)) for _ in range(4)]
        data = [torch.randn(SHAPE) for _ in keys]
        tier.put(keys[:2], data[:2])
        assert server.terminate() == 0
        server.start()
        tier.put(keys[2:], data[2:])
        assert tier.contains(keys) == [False, False, True, True]  # memory only: the first two went
        assert tier.stats().errors == 0 and tier.stats().skipped_writes == 0
        tier.close()


def test_tickets_carry_the_namespace_of_the_grpc_call(tmp_path):
    (tmp_path / "tokens").write_text("alpha\nbeta\n")
    with KVServerProcess("--capacity", "16MiB", "--auth-token-file", str(tmp_path / "tokens"),
                         "--namespace-per-token") as server:
        alpha, beta = (GrpcTier([server.address], token=t, timeout_s=5.0) for t in ("alpha", "beta"))
        anonymous = GrpcTier([server.address], timeout_s=5.0)
        keys = [BlockKey(b"model", os.urandom(32)) for _ in range(3)]
        data = [torch.randn(SHAPE) for _ in keys]
        alpha.put(keys, data)
        assert alpha._servers[0].bulk._idle, "the put did not use the bulk stream"
        assert alpha.lookup_prefix(keys) == 3 and beta.lookup_prefix(keys) == 0
        with pytest.raises(grpc.RpcError) as refused:
            anonymous._servers[0].bulk.connection()  # OpenBulk itself needs the token
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for t in (alpha, beta, anonymous):
            t.close()


def test_mutual_tls_refuses_clients_without_a_certificate(certs):
    with KVServerProcess("--capacity", "16MiB", "--tls-cert", str(certs.server_cert), "--tls-key",
                         str(certs.server_key), "--tls-client-ca", str(certs.ca)) as server:
        spec = f"grpc://{server.address}?tls=1&ca={certs.ca}&timeout=5&cooldown=0.1"
        layout = BlockLayout(SHAPE, torch.float32, torch.device("cpu"))
        with_cert = build_tier(f"{spec}&cert={certs.client_cert}&key={certs.client_key}", layout)
        without = build_tier(spec, layout)
        keys = [BlockKey(b"model", os.urandom(32)) for _ in range(3)]
        data = [torch.randn(SHAPE) for _ in keys]
        with_cert.put(keys, data)
        assert with_cert.lookup_prefix(keys) == 3 and with_cert.stats().errors == 0
        assert with_cert._servers[0].bulk._idle, "the put did not use the bulk stream"
        without.put(keys, data)  # the handshake fails: a skipped write, never an exception
        assert without.lookup_prefix(keys) == 0
        assert without.stats().skipped_writes == 3 and without.stats().errors > 0
        # the bulk port itself also wants the certificate, ticket or not
        reply = with_cert._servers[0]._open_bulk()
        context = ssl.create_default_context(cafile=str(certs.ca))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with socket.create_connection((server.host, reply.port), timeout=5) as raw:
                with context.wrap_socket(raw, server_hostname=server.host) as sock:
                    sock.sendall(MAGIC + reply.ticket)
                    read_reply(sock)
        for t in (with_cert, without):
            t.close()


def test_sigterm_closes_idle_connections_and_lets_a_busy_one_finish_its_batch():
    with KVServerProcess("--capacity", "16MiB", "--drain-seconds", "20") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = kvstore_pb2_grpc.KVStoreStub(channel)
            busy, _ = connect(server, stub)
            idle, _ = connect(server, stub)
        key = new_key()
        value = block_value(key, 100_000)
        busy.sendall(put_frame(key, len(value)) + value[:50_000])
        server.proc.send_signal(signal.SIGTERM)
        assert idle.recv(1) == b""  # closed at once
        assert server.proc.poll() is None  # still waiting for the busy one
        busy.sendall(value[50_000:])
        assert sync(busy) == (OK, 1, 0, "")
        assert busy.recv(1) == b""  # closed once its batch was answered
        assert server.proc.wait(30) == 0


def test_get_over_the_stream_answers_in_order_with_absent_keys_empty(server, stub):
    sock, _ = connect(server, stub)
    present, absent = new_key(), new_key()
    value = block_value(present, 70_000)
    put(sock, present, value)
    assert sync(sock)[:2] == (OK, 1)
    sock.sendall(get_request([absent, present, present]))
    answers = []
    for _ in range(3):
        size = VALUE_LENGTH.unpack(recv_exactly(sock, VALUE_LENGTH.size))[0]
        answers.append(recv_exactly(sock, size) if size else None)
    assert answers == [None, value, value]
    sock.sendall(get_request([b""]))  # an empty key ends the connection with a reason
    status, _, _, message = read_reply(sock)
    assert status == INVALID_ARGUMENT and "GET key 0" in message
    sock.close()


def recv_exactly(sock, n: int) -> bytes:
    out = bytearray(n)
    recv_exact_into(sock, memoryview(out))
    return bytes(out)


def test_gets_into_tensors_match_the_grpc_reference():
    """The fast path (GET straight into the tensors) against the reference (gRPC Get, then
    decode): raw float32 and bfloat16 blocks, an fp8 tier, a non-contiguous destination and
    a destination of another dtype all read back the same."""
    with KVServerProcess("--capacity", "64MiB") as server:
        for codec, dtype in (("raw", torch.float32), ("raw", torch.bfloat16), ("fp8", torch.float32)):
            fast = GrpcTier([server.address], codec=codec, namespace=f"f-{codec}")
            reference = GrpcTier([server.address], codec=codec, namespace=f"f-{codec}", bulk=False)
            keys = [BlockKey(b"model", os.urandom(32)) for _ in range(6)]
            data = [torch.randn(SHAPE).to(dtype) for _ in keys]
            fast.put(keys, data)
            into_fast = [torch.empty_like(d) for d in data]
            into_ref = [torch.empty_like(d) for d in data]
            into_fast[1] = torch.empty(SHAPE[::-1], dtype=dtype).permute(4, 3, 2, 1, 0)  # not contiguous
            into_fast[2] = torch.empty(SHAPE, dtype=torch.float64)  # converted on the way
            assert fast.get(keys, into_fast) == [True] * 6
            assert reference.get(keys, into_ref) == [True] * 6
            assert fast._servers[0].bulk._idle, "the get did not use the bulk stream"
            for a, b in zip(into_fast, into_ref):
                assert torch.equal(a.to(b.dtype), b)
            if codec == "raw":
                assert all(torch.equal(a.to(d.dtype), d) for a, d in zip(into_fast, data))
            fast.close()
            reference.close()


def test_a_value_corrupted_on_the_servers_disk_is_a_miss_and_is_deleted(tmp_path):
    keys = [BlockKey(b"model", os.urandom(32)) for _ in range(3)]
    data = [torch.randn(SHAPE) for _ in keys]
    with KVServerProcess("--capacity", "16MiB", "--persist", str(tmp_path / "kv")) as server:
        tier = GrpcTier([server.address], timeout_s=5.0)
        tier.put(keys, data)
        tier.close()
        assert server.terminate() == 0
        disk = tmp_path / "kv" / "data.mdb"
        raw = bytearray(disk.read_bytes())
        where = raw.find(data[1].numpy().tobytes()[:64])
        assert where > 0
        raw[where + 100] ^= 0x40
        disk.write_bytes(raw)
        server.start()
        tier = GrpcTier([server.address], timeout_s=5.0)
        into = [torch.empty_like(d) for d in data]
        assert tier.get(keys, into) == [True, False, True]
        assert torch.equal(into[0], data[0]) and torch.equal(into[2], data[2])
        assert tier.stats().errors == 1
        assert tier.contains(keys) == [True, False, True]  # the corrupt value was deleted
        tier.close()
