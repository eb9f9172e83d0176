"""The Redis tier's own RESP reader against real redis-server processes: blocks identical to
redis-py's MGET path for several sizes, dtypes and codecs, over one or parallel
connections; absent and wrong-sized values as misses; replies cut, corrupted or stalled
mid-value by a proxy (misses, never wrong KV, never a hang); a server killed mid-batch."""
import hashlib
import time

import pytest
import torch
from redis_proxy import FaultProxy
from redis_server import RedisServer

from kvtier.kvstore.format.codec import HEADER_BYTES, encode_block
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.tiers.byte_store import decode_values
from kvtier.kvstore.tiers.redis_tier import RedisTier

SMALL = ((2, 2, 4, 2, 8), torch.float32)  # 1 KiB
KIB160 = ((4, 2, 16, 8, 80), torch.float16)  # 160 KiB
MIB1 = ((16, 2, 16, 8, 128), torch.bfloat16)  # 1 MiB


def key(i: int) -> BlockKey:
    return BlockKey(b"resp-test", hashlib.sha256(str(i).encode()).digest())


def blocks(n: int, shape, dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(n)]


@pytest.fixture(scope="module")
def server():
    s = RedisServer().start()
    yield s
    s.stop()


@pytest.fixture
def fresh(server):
    server.client().flushall()
    made = []

    def make(url=None, **kw):
        kw.setdefault("timeout", 2)
        t = RedisTier(url or server.url, **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def reference_get(tier: RedisTier, keys, like):
    """redis-py's MGET, decoded by the shared decoder: what the block path must match."""
    out = [torch.full_like(b, 7) for b in like]
    ok, corrupt, _ = decode_values(tier._read([k.to_bytes() for k in keys]), keys, out)
    return ok, out


@pytest.mark.parametrize("codec", ["raw", "fp8"])
@pytest.mark.parametrize("shape, dtype", [SMALL, KIB160, MIB1])
@pytest.mark.parametrize("conns", [1, 4])
def test_blocks_identical_to_redis_py_mget(fresh, codec, shape, dtype, conns):
    n = 6
    src = blocks(n, shape, dtype)
    tier = fresh(codec=codec, conns=conns)
    tier.put([key(i) for i in range(n)], src)
    asked = [key(i) for i in range(n + 2)]  # two absent keys at the end
    like = src + blocks(2, shape, dtype, seed=1)
    ref_ok, ref = reference_get(tier, asked, like)
    out = [torch.full_like(b, 7) for b in like]
    ok = tier.get(asked, out)
    assert ok == ref_ok == [True] * n + [False, False]
    for a, b in zip(out[:n], ref[:n]):
        assert a.view(torch.uint8).equal(b.view(torch.uint8))
    if codec == "raw":
        assert all(torch.equal(a, b) for a, b in zip(out[:n], src))
    s = tier.stats()
    assert (s.hits, s.misses, s.errors, s.faults) == (n, 2, 0, {})


def test_a_batch_is_split_over_parallel_connections(fresh, server):
    src = blocks(8, *MIB1)
    fresh(conns=1).put([key(i) for i in range(8)], src)
    tier = fresh(conns=4)
    admin = server.client()
    mgets = lambda: admin.info("commandstats").get("cmdstat_mget", {}).get("calls", 0)  # noqa: E731
    before = mgets()
    out = [torch.empty_like(b) for b in src]
    assert tier.get([key(i) for i in range(8)], out) == [True] * 8
    assert all(torch.equal(a, b) for a, b in zip(out, src))
    # 8 MiB over conns=4: four MGETs of two blocks each (counted by the server, whichever
    # pooled connections carried them).
    assert mgets() - before == 4


def test_wrong_sized_and_foreign_values_are_misses_and_the_stream_stays_usable(fresh, server):
    src = blocks(4, *KIB160)
    tier = fresh(conns=1)
    keys = [key(i) for i in range(4)]
    tier.put(keys, src)
    client = server.client()
    client.set(tier._rkey(keys[1].to_bytes()), b"tiny")  # shorter than a header
    other_shape = encode_block(keys[2], torch.zeros(2, 2, 4, 2, 8, dtype=torch.float16))
    client.set(tier._rkey(keys[2].to_bytes()), other_shape)  # a header for another shape
    out = [torch.zeros_like(b) for b in src]
    assert tier.get(keys, out) == [True, False, False, True]
    assert torch.equal(out[3], src[3]) and torch.equal(out[0], src[0])
    assert tier.stats().errors == 2  # counted corrupt, and deleted
    assert client.exists(tier._rkey(keys[1].to_bytes()), tier._rkey(keys[2].to_bytes())) == 0


@pytest.fixture
def proxied(server, fresh):
    proxy = FaultProxy(server.port)
    src = blocks(5, *KIB160)
    keys = [key(i) for i in range(5)]
    fresh(conns=1).put(keys, src)  # stored directly, read through the proxy
    tier = fresh(proxy.url(), conns=1, timeout=0.5, breaker_failures=100)
    yield proxy, tier, keys, src
    proxy.close()


VALUE = len(b"$%d\r\n" % (HEADER_BYTES + 163840)) + HEADER_BYTES + 163840 + 2  # one MGET element
REPLY_HEAD = len(b"*5\r\n")


def read_all(tier, keys, src):
    out = [torch.full_like(b, 3) for b in src]
    start = time.monotonic()
    ok = tier.get(keys, out)
    return ok, out, time.monotonic() - start


@pytest.mark.parametrize("kind", ["cut", "stall"])
def test_a_reply_cut_or_stalled_mid_value_keeps_verified_values_and_misses_the_rest(proxied, kind):
    proxy, tier, keys, src = proxied
    proxy.arm(kind, REPLY_HEAD + 2 * VALUE + 5000)  # inside the third value's payload
    ok, out, took = read_all(tier, keys, src)
    assert ok == [True, True, False, False, False]
    assert torch.equal(out[0], src[0]) and torch.equal(out[1], src[1])
    assert took < 2.5  # bounded by the batch deadline (0.5 s), never a hang
    assert tier.stats().errors == 1 and tier.stats().faults
    ok, out, _ = read_all(tier, keys, src)  # a new connection: all hits again
    assert ok == [True] * 5 and all(torch.equal(a, b) for a, b in zip(out, src))


def test_a_flipped_payload_byte_is_a_corrupt_miss_only_for_that_value(proxied):
    proxy, tier, keys, src = proxied
    proxy.arm("flip", REPLY_HEAD + VALUE + 3000)
    ok, out, _ = read_all(tier, keys, src)
    assert ok == [True, False, True, True, True]
    assert all(torch.equal(out[i], src[i]) for i in (0, 2, 3, 4))
    assert tier.stats().errors == 1 and tier.stats().faults == {}  # corrupt, not a broken stream


def test_a_malformed_length_line_closes_the_connection_and_misses_the_rest(proxied):
    proxy, tier, keys, src = proxied
    proxy.arm("flip", REPLY_HEAD + VALUE)  # the '$' of the second element
    ok, out, _ = read_all(tier, keys, src)
    assert ok == [True, False, False, False, False] and torch.equal(out[0], src[0])
    assert list(tier.stats().faults) == ["redis.get: RespBroken"]
    assert read_all(tier, keys, src)[0] == [True] * 5


def test_server_killed_mid_batch_gives_misses_without_a_hang(proxied, server):
    proxy, tier, keys, src = proxied
    try:
        proxy.arm("call", REPLY_HEAD + VALUE + 100, callback=server.kill)
        ok, out, took = read_all(tier, keys, src)
        assert ok == [True, False, False, False, False] and torch.equal(out[0], src[0])
        assert took < 2.5
        ok, _, took = read_all(tier, keys, src)  # the server is gone: misses, fast
        assert ok == [False] * 5 and took < 2.5
    finally:
        server.start()


def test_engine_recomputes_when_redis_dies_mid_batch(tmp_path, server):
    """An engine loading prefixes from Redis through the proxy; the server is killed while
    a reply is in flight: same tokens as without tiers (recomputed), the fault counted."""
    import random

    from hf_checkpoints import make_variant

    from kvtier import LLM, SamplingParams
    from kvtier.engine.model_config import load_model_config

    path = make_variant(tmp_path, "llama")
    cfg = load_model_config(path)
    rng = random.Random(5)
    prompts = [{"prompt_token_ids": [rng.randrange(3, cfg.vocab_size) for _ in range(n)]} for n in (90, 130, 200)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    server.client().flushall()
    with LLM(path, kv_tiers=[f"{server.url}?prefix=e2e:"]) as first:  # fills Redis
        reference = [o.outputs[0].token_ids for o in first.generate(prompts, params, use_tqdm=False)]
        first.engine.connector.flush()
    proxy = FaultProxy(server.port)
    try:
        with LLM(path, kv_tiers=[f"{proxy.url()}?prefix=e2e:&conns=1&timeout=0.5"]) as second:
            proxy.arm("call", 3000, callback=server.kill)  # inside the first MGET reply
            outs = second.generate(prompts, params, use_tqdm=False)
            assert [o.outputs[0].token_ids for o in outs] == reference
            assert all(o.error is None for o in outs)
            stats = second.kv_stats()["redis"]
            assert stats["errors"] > 0 and any(f.startswith("redis.get") for f in stats["faults"])
    finally:
        proxy.close()
        server.start()


def _identical_round_trip(url: str, n: int = 12, **kw) -> RedisTier:
    src = blocks(n, *KIB160)
    keys = [key(i) for i in range(n)]
    tier = RedisTier(url, timeout=2, **kw)
    tier.put(keys, src)
    ref_ok, ref = reference_get(tier, keys, src)
    out = [torch.zeros_like(b) for b in src]
    assert tier.get(keys, out) == ref_ok == [True] * n
    assert all(torch.equal(a, b) and torch.equal(a, r) for a, b, r in zip(out, src, ref))
    assert tier.stats().faults == {}
    return tier


def test_password_and_database_from_the_url_reach_the_block_connections():
    server = RedisServer(password="s3cret").start()
    try:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        _identical_round_trip(url, conns=2).close()
        assert server.client(db=3).dbsize() == 12
        assert server.client(db=0).dbsize() == 0
        wrong = RedisTier(f"redis://:nope@127.0.0.1:{server.port}/3", timeout=1)
        assert wrong.get([key(0)], [torch.zeros(KIB160[0], dtype=KIB160[1])]) == [False]
        assert wrong.stats().errors == 1
        wrong.close()
    finally:
        server.stop()


def test_tls_blocks_identical_to_redis_py():
    from redis_server import tls_server_or_skip

    with tls_server_or_skip() as server:
        _identical_round_trip(f"rediss://127.0.0.1:{server.port}/0", conns=2,
                              client_options={"ssl_ca_certs": server.ca_file}).close()


@pytest.mark.slow  # forming a cluster takes redis-cli a few seconds
def test_cluster_per_slot_mgets_identical_to_redis_py():
    from redis_server import cluster_or_skip

    with cluster_or_skip() as cluster:
        tier = _identical_round_trip(cluster.url, n=30)
        assert min(node.client().dbsize() for node in cluster.nodes) > 0  # spread over nodes
        tier.close()


@pytest.mark.slow  # forming a cluster takes redis-cli a few seconds
def test_cluster_batches_follow_a_resharded_slot():
    """A slot moves to another node while the tier's map still names the old one: the
    node's MOVED reply refreshes the map and the batch is sent again, for puts and gets."""
    from redis.crc import key_slot
    from redis_server import cluster_or_skip

    def empty(src):
        return [torch.empty_like(b) for b in src]

    with cluster_or_skip() as cluster:
        tier = RedisTier(cluster.url, timeout=2)
        keys = [key(i) for i in range(12)]
        first, second = blocks(12, *SMALL), blocks(12, *SMALL, seed=1)
        tier.put(keys, first)
        assert all(tier.get(keys, empty(first)))  # the map is loaded
        slots = [key_slot(tier._rkey(k.to_bytes())) for k in keys[:2]]
        for slot in slots:
            cluster.move_slot(slot, next(n for n in cluster.nodes if n is not cluster.owner(slot)))
            if slot == slots[0]:  # the first move is met by a put, the second by a get
                tier.put(keys, second)
        into = empty(second)
        assert all(tier.get(keys, into))
        assert all(torch.equal(a, b) for a, b in zip(into, second))
        assert tier.stats().skipped_writes == 0 and tier.stats().faults == {}
        tier.close()


@pytest.mark.parametrize("spec, message", [("redis://h:1?conns=0", "conns must be >= 1"),
                                           ("redis://h:1?conns=many", "not an integer"),
                                           ("rediss://h:1?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of"),
                                           ("redis://h:1/zero", "is not a number")])
def test_bad_transfer_options_fail_fast(spec, message):
    from kvtier.kvstore.tiers.spec import BlockLayout, build_tier

    with pytest.raises(ValueError, match=message):
        build_tier(spec, BlockLayout(SMALL[0], SMALL[1], torch.device("cpu")))


class _CountingStream:
    """A socket whose whole reply has arrived: each read returns as much as asked; counts reads."""

    def __init__(self, data: bytes):
        self.data, self.at, self.reads = data, 0, 0

    def recv_into(self, view, n=0):
        n = min(n or len(view), len(self.data) - self.at)
        view[:n] = self.data[self.at:self.at + n]
        self.at += n
        self.reads += 1
        return n


def test_a_value_costs_two_socket_reads_not_three():
    """A payload received straight into its block leaves the reader's buffer empty; the read
    that brings its trailing CRLF also brings the next length line and value header, so each
    value costs its payload read plus one small read (not a separate 2-byte one)."""
    from kvtier.kvstore.format.codec import key_digest
    from kvtier.kvstore.tiers.redis_resp import RespReader, read_mget_into

    shape, dtype = (2, 2, 16, 2, 8), torch.float32  # 4 KiB: far more than one small read
    values = blocks(6, shape, dtype)
    keys = [key(i) for i in range(6)]
    reply = b"*6\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(v), v) for v in
                                 (encode_block(k, b) for k, b in zip(keys, values)))
    sock = _CountingStream(reply)
    into = [torch.zeros(shape, dtype=dtype) for _ in keys]
    ok, corrupt = [False] * 6, []
    read_mget_into(RespReader(sock, float("inf")), [key_digest(k) for k in keys], into, ok, corrupt)
    assert ok == [True] * 6 and not corrupt and all(torch.equal(a, b) for a, b in zip(into, values))
    assert sock.at == len(reply) and sock.reads <= 2 * 6 + 1


def test_a_large_get_is_a_window_of_small_mgets(fresh, monkeypatch):
    """Redis builds a reply whole before sending it: a large get is asked for in MGETs of
    about MGET_BYTES, at most MGETS_IN_FLIGHT ahead of the reply being read, so the server
    reuses a few MiB of reply buffers instead of allocating the whole batch afresh."""
    from kvtier.kvstore.tiers import redis_batches

    values = blocks(22, *KIB160)
    monkeypatch.setattr(redis_batches, "MGET_BYTES", 4 * values[0].nbytes, raising=False)
    log = []
    send, read = redis_batches.send_buffers, redis_batches.read_mget_into

    def counting_send(sock, buffers):
        log.append(sum(bytes(b).count(b"MGET") for b in buffers))
        return send(sock, buffers)

    def counting_read(reader, digests, *args):
        log.append(-1)
        return read(reader, digests, *args)

    monkeypatch.setattr(redis_batches, "send_buffers", counting_send)
    monkeypatch.setattr(redis_batches, "read_mget_into", counting_read)
    tier = fresh()
    keys = [key(i) for i in range(22)]
    tier.put(keys, values)
    into = [torch.zeros_like(v) for v in values]
    log.clear()
    assert tier.get(keys, into) == [True] * 22 and all(torch.equal(a, b) for a, b in zip(into, values))
    in_flight = [sum(log[:i + 1]) for i in range(len(log))]
    assert sum(n for n in log if n > 0) == 6  # 22 blocks in MGETs of at most 4
    assert max(in_flight) <= redis_batches.MGETS_IN_FLIGHT and in_flight[-1] == 0
