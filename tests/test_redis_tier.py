"""The Redis tier against real redis-server processes started here (never a shared one):
round trips, TTL, key namespaces, a server killed and restarted, one unreachable from the
start, one hung, a cluster, bad specs; and the circuit breaker on its own."""
import hashlib
import signal
import time
import warnings

import pytest
import torch
from redis_server import RedisServer, cluster_or_skip, free_port, tls_server_or_skip

from kvtier.kvstore.circuit_breaker import CircuitBreaker
from kvtier.kvstore.format.codec import HEADER_BYTES
from kvtier.kvstore.hierarchy import TierHierarchy
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.tiers.redis_tier import RedisTier
from kvtier.kvstore.tiers.spec import BlockLayout, build_tier

SHAPE = (2, 2, 4, 2, 8)
LAYOUT = BlockLayout(SHAPE, torch.float32, torch.device("cpu"))
FAST = "timeout=0.2&breaker_failures=2&breaker_cooldown=0.2"



def key(i: int, ns: bytes = b"model-a") -> BlockKey:
    return BlockKey(ns, hashlib.sha256(str(i).encode()).digest())


def block(i: int) -> torch.Tensor:
    return torch.arange(256, dtype=torch.float32).view(SHAPE) + 1000 * i


def fetch(tier, idx):
    out = [torch.zeros(SHAPE) for _ in idx]
    return tier.get([key(i) for i in idx], out), out


def put_all(tier, idx):
    tier.put([key(i) for i in idx], [block(i) for i in idx])
    assert tier.flush(timeout=10)


@pytest.fixture(scope="module")
def server():
    s = RedisServer().start()
    yield s
    s.stop()


@pytest.fixture
def tier(server):
    server.client().flushall()
    t = build_tier(f"{server.url}?{FAST}", LAYOUT)
    yield t
    t.close()


def test_round_trip_prefix_and_delete(tier):
    put_all(tier, range(5))
    assert tier.lookup_prefix([key(i) for i in range(8)]) == 5
    ok, out = fetch(tier, [0, 4, 6])
    assert ok == [True, True, False] and torch.equal(out[1], block(4))
    tier.delete([key(0)])
    assert tier.contains([key(0), key(1)]) == [False, True]
    s = tier.stats()
    assert (s.hits, s.misses, s.puts, s.errors) == (2, 1, 5, 0)


def test_one_value_per_block_under_the_prefix_with_ttl(server):
    server.client().flushall()
    t = build_tier(f"{server.url}?ttl=100&prefix=tenant7:&codec=fp8", LAYOUT)
    try:
        put_all(t, [3])
        client = server.client()
        (name,) = client.keys("*")
        assert name == b"tenant7:" + key(3).hex().encode()
        assert 0 < client.ttl(name) <= 100
        assert len(client.get(name)) == HEADER_BYTES + 256 + 4 * 2 * 2 * 2  # fp8 values + scales
        ok, out = fetch(t, [3])
        assert ok == [True] and (out[0] - block(3)).abs().max() <= 2**-4 * block(3).abs().max()
    finally:
        t.close()


def test_namespaces_do_not_see_each_other(server):
    server.client().flushall()
    a = build_tier(f"{server.url}?prefix=a:", LAYOUT)
    b = build_tier(f"{server.url}?prefix=b:", LAYOUT)
    try:
        put_all(a, [1])
        assert a.lookup_prefix([key(1)]) == 1 and b.lookup_prefix([key(1)]) == 0
    finally:
        a.close()
        b.close()


def test_corrupt_value_is_a_counted_deleted_miss(tier, server):
    put_all(tier, [0, 1])
    client = server.client()
    name = b"kvtier:" + key(0).hex().encode()
    value = bytearray(client.get(name))
    value[-5] ^= 0x10
    client.set(name, bytes(value))
    client.set(b"kvtier:" + key(1).hex().encode(), b"not a block")
    ok, _ = fetch(tier, [0, 1])
    assert ok == [False, False] and tier.stats().errors == 2
    assert client.exists(name) == 0


def test_killed_server_is_a_miss_then_works_again_after_restart():
    server = RedisServer().start()
    t = build_tier(f"{server.url}?{FAST}", LAYOUT)
    try:
        put_all(t, range(3))
        assert fetch(t, [0])[0] == [True]
        server.kill()
        start = time.perf_counter()
        for _ in range(5):  # every call returns, fast, as a miss or a skipped write
            assert fetch(t, [0, 1])[0] == [False, False]
            assert t.lookup_prefix([key(0)]) == 0
            t.put([key(7)], [block(7)])
        assert t.flush(timeout=5)
        assert time.perf_counter() - start < 2.0
        s = t.stats()
        assert s.errors >= 2 and s.misses >= 10 and s.skipped_writes >= 1
        assert t.breaker.times_opened >= 1
        server.start()  # same port, empty (no persistence)
        time.sleep(0.25)  # the breaker's cool-down
        deadline = time.monotonic() + 5
        while t.lookup_prefix([key(0)]) == 0 and time.monotonic() < deadline:
            put_all(t, [0])
            time.sleep(0.05)
        assert fetch(t, [0])[0] == [True]
        assert t.breaker.state == "closed"
    finally:
        t.close()
        server.stop()


def test_unreachable_from_the_start_never_raises():
    t = build_tier(f"redis://127.0.0.1:{free_port()}/0?{FAST}", LAYOUT)
    try:
        start = time.perf_counter()
        for _ in range(20):
            assert t.lookup_prefix([key(0), key(1)]) == 0
            assert fetch(t, [0])[0] == [False]
            t.put([key(0)], [block(0)])
            t.delete([key(0)])
        assert t.flush(timeout=5)
        assert time.perf_counter() - start < 2.0
        s = t.stats()
        assert s.misses == 20 and s.skipped_writes == 20 and s.puts == 0
        assert t.breaker.state in ("open", "half_open")
    finally:
        t.close()


def test_hung_server_times_out_then_the_breaker_answers_at_once():
    server = RedisServer().start()
    t = build_tier(f"{server.url}?timeout=0.2&breaker_failures=2&breaker_cooldown=30", LAYOUT)
    h = TierHierarchy([t])
    try:
        put_all(t, [0])
        server.proc.send_signal(signal.SIGSTOP)  # alive, accepting, silent
        try:
            start = time.perf_counter()
            h.store([key(1)], [block(1)])  # queued for the tier's writer thread: no wait here
            assert time.perf_counter() - start < 0.05
            times = []
            for _ in range(4):
                start = time.perf_counter()
                assert fetch(t, [0])[0] == [False]
                times.append(time.perf_counter() - start)
            assert max(times[:2]) < 0.6  # bounded by the socket timeout
            assert max(times[2:]) < 0.05  # the breaker is open: no socket touched
            assert t.breaker.state == "open"
        finally:
            server.proc.send_signal(signal.SIGCONT)
    finally:
        h.close()
        server.stop()


def test_tls_round_trip():
    with tls_server_or_skip() as server:
        t = build_tier(f"{server.url}?ssl_ca_certs={server.ca_file}&timeout=1", LAYOUT)
        try:
            put_all(t, [0, 1])
            assert t.url.startswith("rediss://") and fetch(t, [0, 1])[0] == [True, True]
        finally:
            t.close()


@pytest.mark.slow  # forming a cluster takes redis-cli a few seconds
def test_cluster_spreads_keys_over_nodes():
    with cluster_or_skip() as cluster:
        t = build_tier(f"{cluster.url}?timeout=1", LAYOUT)
        try:
            put_all(t, range(30))
            assert t.lookup_prefix([key(i) for i in range(32)]) == 30
            ok, out = fetch(t, range(30))
            assert all(ok) and all(torch.equal(o, block(i)) for i, o in enumerate(out))
            counts = [node.client().dbsize() for node in cluster.nodes]
            assert sum(counts) == 30 and min(counts) > 0
            t.delete([key(i) for i in range(10)])
            assert t.lookup_prefix([key(i) for i in range(30)]) == 0
            assert t.stats().errors == 0
        finally:
            t.close()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("redis://h:1?ttl=soon", "not an integer"),
        ("redis://h:1?ttl=-1", ">= 0"),
        ("redis://h:1?timeout=0", "must be > 0"),
        ("redis://h:1?timeout=fast", "not a number"),
        ("redis://h:1?breaker_failures=0", ">= 1"),
        ("redis://h:1?codec=zip", "unknown 'zip'"),
        ("redis://h:1?size=big", "cannot parse"),
        ("redis://h:1?admit=2", "unknown option"),
        ("redis://h:1?async=1", "async was removed"),
        ("redis://h:1?queue=lots", "cannot parse"),
        ("memcached://h:1", "unknown tier"),
    ],
)
def test_bad_specs_fail_fast(spec, message):
    with pytest.raises(ValueError, match=message):
        build_tier(spec, LAYOUT)


# --- the circuit breaker alone (a fake clock; no store involved) ----------------------
class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def test_breaker_opens_after_n_failures_and_probes_once_after_cooldown():
    clock = Clock()
    b = CircuitBreaker(failure_threshold=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    b.record_success()  # a success resets the count of consecutive failures
    for _ in range(3):
        assert b.allow()
        b.record_failure()
    assert b.state == "open" and not b.allow()
    clock.now = 10
    assert b.state == "half_open"
    assert b.allow() and not b.allow()  # exactly one probe
    b.record_failure()
    assert b.state == "open" and not b.allow() and b.times_opened == 2
    clock.now = 20
    assert b.allow()
    b.record_success()
    assert b.state == "closed" and b.allow() and b.allow()


def test_breaker_rejects_bad_settings():
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(cooldown_s=-1)


def test_zero_copy_sets_store_exactly_what_the_reference_path_stores():
    """The hand-pipelined SET path (header and payload sent as two pieces) against redis-py's
    own pipeline of joined values: same bytes under the same keys, same TTL."""
    from kvtier.kvstore.format.codec import encode_parts

    server = RedisServer().start()
    try:
        fast = RedisTier(server.url, ttl=300, prefix="fast:")
        ref = RedisTier(server.url, ttl=300, prefix="ref:")
        keys = [BlockKey(b"nsnsnsns", bytes([i]) * 32) for i in range(9)]
        blocks = [torch.randn(3, 2, 16, 2, 8) for _ in keys]
        parts = [encode_parts(k, b) for k, b in zip(keys, blocks)]
        fast._write_parts([k.to_bytes() for k in keys], parts)
        ref._write([k.to_bytes() for k in keys], [b"".join(p) for p in parts])
        client = server.client()
        for k in keys:
            raw = k.to_bytes()
            assert client.get(fast._rkey(raw)) == client.get(ref._rkey(raw)) is not None
            assert 0 < client.ttl(fast._rkey(raw)) <= 300
        out = [torch.empty_like(b) for b in blocks]
        assert fast.get(keys, out) == [True] * len(keys)
        assert all(torch.equal(a, b) for a, b in zip(out, blocks))
        fast.close()
        ref.close()
    finally:
        server.stop()


def _round_trip_through_the_hierarchy(url: str, prefix: str) -> RedisTier:
    """Store 4 blocks through a hierarchy (the tier's writer thread), read them back."""
    tier = RedisTier(url, prefix=prefix)
    h = TierHierarchy([tier])
    keys = [BlockKey(b"nsnsnsns", bytes([i]) * 32) for i in range(4)]
    blocks = [torch.randn(3, 2, 16, 2, 8) for _ in keys]
    h.store(keys, blocks)
    assert h.flush(timeout=10)
    into = [torch.empty_like(b) for b in blocks]
    assert tier.get(keys, into) == [True] * 4 and all(torch.equal(a, b) for a, b in zip(into, blocks))
    s = h.stats()["redis"]
    assert (s.puts, s.errors, s.skipped_writes) == (4, 0, 0)
    h.close()
    return tier


def test_block_transfers_round_trip_without_redis_py_warnings(recwarn):
    """Gets and puts go over the tier's own connections; redis-py (probes, setup) is called
    only through its public API, so no DeprecationWarning and no fault."""
    server = RedisServer().start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            tier = _round_trip_through_the_hierarchy(server.url, "raw:")
        assert tier.stats().faults == {}
    finally:
        server.stop()


def test_presence_probes_go_over_the_tiers_own_connection(tier, server):
    """A single node's EXISTS pipeline is the tier's own (redis-py is not on the path from
    lookup to load): it answers even when no redis-py client can be built."""
    put_all(tier, range(3))

    def no_client():
        raise ConnectionError("redis-py must not be used for presence probes")

    tier._connect = no_client
    tier._client = None
    assert tier.contains([key(i) for i in range(5)]) == [True, True, True, False, False]
    assert tier.lookup_prefix([key(0), key(1), key(7), key(2)]) == 2
    assert tier.stats().errors == 0 and tier.breaker.state == "closed"


def test_refused_presence_probes_are_misses_and_the_connection_stays_in_step(server):
    """Error replies to EXISTS (here an ACL without it) are a counted miss, not a breaker
    failure; the replies are read to the end, so the pooled connection serves the next call."""
    admin = server.client()
    admin.flushall()
    admin.execute_command("ACL", "SETUSER", "noexists", "on", ">pw", "~*", "+@all", "-exists")
    try:
        t = build_tier(f"redis://noexists:pw@127.0.0.1:{server.port}/0?{FAST}", LAYOUT)
        try:
            put_all(t, range(2))
            assert t.contains([key(0), key(1), key(2)]) == [False, False, False]
            assert t.stats().errors == 1 and t.breaker.state == "closed"
            assert fetch(t, [0, 1, 2])[0] == [True, True, False]  # same pool, still in step
            assert len(t._pool()._idle) == 1
        finally:
            t.close()
    finally:
        admin.execute_command("ACL", "DELUSER", "noexists")
