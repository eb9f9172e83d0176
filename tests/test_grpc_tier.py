"""GrpcTier against real kv-server processes: round trips, sharding, outages, persistence,
auth, tenants, TLS, concurrency."""
import os
import ssl
import threading
import time

import pytest
import torch
from grpc_server import KVServerProcess
from kvtier.kvstore.tiers.grpc_tier import GrpcTier
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.service.rendezvous import Rendezvous
from kvtier.kvstore.tiers.spec import BlockLayout, build_tier, parse_tier_spec

SHAPE = (2, 2, 16, 2, 32)  # [layers, k/v, block_size, kv_heads, head_dim]: 8 KiB of fp32
LAYOUT = BlockLayout(SHAPE, torch.float32, torch.device("cpu"))
FAST = dict(timeout_s=2.0, cooldown_s=0.2)  # quick recovery for the outage tests


def blocks(n, shape=SHAPE, dtype=torch.float32):
    keys = [BlockKey(b"model", os.urandom(32)) for _ in range(n)]
    return keys, [torch.randn(shape).to(dtype) for _ in range(n)]


def read_back(tier, keys, like):
    into = [torch.empty_like(b) for b in like]
    return tier.get(keys, into), into


def wait_until(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def two_servers():
    with KVServerProcess("--capacity", "64MiB") as a, KVServerProcess("--capacity", "64MiB") as b:
        yield a, b


def test_round_trip_of_several_dtypes_and_chunked_blocks(two_servers):
    a, _ = two_servers
    tier = GrpcTier([a.address], max_message_bytes=16 << 10)  # 8 KiB blocks fit; 64 KiB ones are chunked
    try:
        for shape, dtype in [(SHAPE, torch.float32), (SHAPE, torch.bfloat16), ((4, 2, 16, 4, 64), torch.float16)]:
            keys, data = blocks(5, shape, dtype)
            tier.put(keys, data)
            assert tier.lookup_prefix(keys) == 5
            ok, into = read_back(tier, keys, data)
            assert ok == [True] * 5 and all(torch.equal(x, y) for x, y in zip(into, data))
        missing = BlockKey(b"model", os.urandom(32))
        assert tier.lookup_prefix([keys[0], missing, keys[1]]) == 1
        assert tier.contains([keys[0], missing, keys[1]]) == [True, False, True]
        tier.delete(keys[:2])
        assert tier.contains(keys) == [False, False, True, True, True]
        stats = tier.stats()
        assert stats.errors == 0 and stats.puts == 15 and stats.hits == 15
    finally:
        tier.close()


def test_from_spec_builds_the_tier_and_rejects_bad_specs(two_servers, tmp_path):
    a, b = two_servers
    tier = build_tier(f"grpc://{a.address},{b.address}?timeout=3&max_message=1MiB&size=1GiB", LAYOUT)
    try:
        assert tier.name == "grpc" and tier.capacity_bytes == 1 << 30 and tier.timeout_s == 3.0
        keys, data = blocks(8)
        tier.put(keys, data)
        assert read_back(tier, keys, data)[0] == [True] * 8
    finally:
        tier.close()
    for bad in ("grpc://host?tls=1&colour=blue", "grpc://nohostport", f"grpc://{a.address}?timeout=soon",
                f"grpc://{a.address}?token_file={tmp_path / 'missing'}", f"grpc://{a.address}?ca=x.pem"):
        with pytest.raises(ValueError):
            build_tier(parse_tier_spec(bad), LAYOUT)


def test_keys_are_sharded_over_both_servers(two_servers):
    a, b = two_servers
    tier = GrpcTier([a.address, b.address])
    try:
        before = {k: v["puts"] for k, v in tier.server_stats().items()}
        keys, data = blocks(64)
        tier.put(keys, data)
        after = tier.server_stats()
        added = {addr: after[addr]["puts"] - before[addr] for addr in before}
        assert sum(added.values()) == 64 and min(added.values()) >= 16  # both take a fair share
        # a client with the servers listed the other way round finds every block
        other = GrpcTier([b.address, a.address])
        assert other.lookup_prefix(keys) == 64
        other.close()
    finally:
        tier.close()


def test_rendezvous_moves_about_one_nth_of_the_keys():
    keys = [os.urandom(41) for _ in range(20000)]
    four = Rendezvous([f"10.0.0.{i}:50051" for i in range(4)])
    five = Rendezvous(four.nodes + ["10.0.0.9:50051"])
    moved = [k for k in keys if four.nodes[four.owner(k)] != five.nodes[five.owner(k)]]
    assert 0.16 < len(moved) / len(keys) < 0.24  # ideal: 1/5
    assert all(five.owner(k) == 4 for k in moved)  # only to the new server
    counts = [len(p) for p in five.assign(keys).values()]
    assert min(counts) > 0.8 * len(keys) / 5
    # removing a server moves only its own keys
    three = Rendezvous(four.nodes[:3])
    assert all(three.owner(k) == four.owner(k) for k in keys if four.owner(k) != 3)


def test_a_dead_server_is_misses_and_skips_and_comes_back_after_restart(two_servers):
    a, _ = two_servers
    with KVServerProcess("--capacity", "64MiB") as doomed:
        tier = GrpcTier([a.address, doomed.address], **FAST)
        try:
            keys, data = blocks(32)
            tier.put(keys, data)
            doomed.kill()
            ok, into = read_back(tier, keys, data)  # a's half is still served
            assert 0 < sum(ok) < 32
            assert all(torch.equal(into[i], data[i]) for i in range(32) if ok[i])
            new_keys, new_data = blocks(32)
            tier.put(new_keys, new_data)  # no exception; the dead server's half is skipped
            stats = tier.stats()
            assert stats.skipped_writes > 0 and stats.errors > 0
            assert stats.puts + stats.skipped_writes == 64
            assert tier.lookup_prefix(keys) < 32
            doomed.start()  # same port, empty memory store
            assert wait_until(lambda: (tier.put(new_keys, new_data), tier.contains(new_keys))[1] == [True] * 32)
            assert read_back(tier, new_keys, new_data)[0] == [True] * 32
        finally:
            tier.close()


def test_all_servers_down_never_raises():
    with KVServerProcess("--capacity", "8MiB") as server:
        tier = GrpcTier([server.address], **FAST)
        server.kill()
        keys, data = blocks(4)
        tier.put(keys, data)
        assert tier.lookup_prefix(keys) == 0 and read_back(tier, keys, data)[0] == [False] * 4
        tier.delete(keys)
        assert tier.stats().skipped_writes == 4
        tier.close()


def test_data_persists_across_a_server_restart(tmp_path):
    with KVServerProcess("--capacity", "16MiB", "--persist", str(tmp_path / "kv")) as server:
        tier = GrpcTier([server.address], **FAST)
        keys, data = blocks(10)
        tier.put(keys, data)
        value_bytes = tier.stats().bytes_written
        stats = tier.server_stats()[server.address]
        assert (stats["disk_blocks"], stats["disk_bytes"]) == (10, value_bytes)
        assert server.terminate() == 0
        server.start()
        assert wait_until(lambda: tier.lookup_prefix(keys) == 10)
        stats = tier.server_stats()[server.address]
        assert stats["persistent"] and stats["blocks"] == 0  # memory starts empty; disk still counts
        assert (stats["disk_blocks"], stats["disk_bytes"]) == (10, value_bytes)
        ok, into = read_back(tier, keys, data)
        assert ok == [True] * 10 and all(torch.equal(x, y) for x, y in zip(into, data))
        tier.close()


def test_tokens_and_tenant_isolation_through_the_tier(tmp_path):
    (tmp_path / "tokens").write_text("alpha\nbeta\n")
    for name in ("alpha", "beta", "wrong"):
        (tmp_path / name).write_text(name + "\n")
    with KVServerProcess("--capacity", "16MiB", "--auth-token-file", str(tmp_path / "tokens"),
                         "--namespace-per-token") as server:
        spec = f"grpc://{server.address}?token_file={tmp_path}/%s&cooldown=0.1"
        alpha, beta, wrong = (build_tier(spec % n, LAYOUT) for n in ("alpha", "beta", "wrong"))
        anonymous = GrpcTier([server.address], **FAST)
        keys, data = blocks(4)
        alpha.put(keys, data)
        assert alpha.lookup_prefix(keys) == 4
        assert beta.lookup_prefix(keys) == 0 and read_back(beta, keys, data)[0] == [False] * 4
        for outsider in (wrong, anonymous):
            outsider.put(keys, data)  # refused, counted, never raised
            assert outsider.lookup_prefix(keys) == 0
            assert outsider.stats().errors > 0
        assert read_back(alpha, keys, data)[0] == [True] * 4
        for t in (alpha, beta, wrong, anonymous):
            t.close()


def test_tls_with_a_certificate_from_a_private_ca(certs):
    with KVServerProcess("--capacity", "16MiB", "--tls-cert", str(certs.server_cert),
                         "--tls-key", str(certs.server_key)) as server:
        tier = build_tier(f"grpc://{server.address}?tls=1&ca={certs.ca}", LAYOUT)
        keys, data = blocks(6)
        tier.put(keys, data)
        ok, into = read_back(tier, keys, data)
        assert ok == [True] * 6 and all(torch.equal(x, y) for x, y in zip(into, data))
        bulk = tier._servers[0].bulk._idle  # the bulk stream carried the blocks, over TLS too
        assert len(bulk) == 1 and isinstance(bulk[0], ssl.SSLSocket)
        plaintext = GrpcTier([server.address], **FAST)  # no TLS: cannot talk to it, no exception
        assert plaintext.lookup_prefix(keys) == 0 and plaintext.stats().errors > 0
        untrusted = GrpcTier([server.address], tls=True, **FAST)  # system roots do not know the cert
        assert untrusted.lookup_prefix(keys) == 0
        for t in (tier, plaintext, untrusted):
            t.close()


def test_concurrent_clients(two_servers):
    a, b = two_servers
    failures: list[str] = []

    def client(i: int) -> None:
        tier = GrpcTier([a.address, b.address])
        try:
            for _ in range(5):
                keys, data = blocks(8)
                tier.put(keys, data)
                ok, into = read_back(tier, keys, data)
                if ok != [True] * 8 or not all(torch.equal(x, y) for x, y in zip(into, data)):
                    failures.append(f"client {i}: {ok}")
        finally:
            tier.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures


def test_a_block_the_codec_cannot_store_raises_without_blaming_the_server(two_servers):
    a, _ = two_servers
    tier = GrpcTier([a.address], failure_threshold=1)
    try:
        keys, data = blocks(3)
        data[1] = torch.zeros(SHAPE, dtype=torch.int64)  # no dtype id in the block format
        with pytest.raises(ValueError):
            tier.put(keys, data)
        assert tier.contains(keys) == [True, False, False]  # the stream ended at the bad block
        assert tier.stats().errors == 0 and tier._servers[0].breaker.state == "closed"
    finally:
        tier.close()
