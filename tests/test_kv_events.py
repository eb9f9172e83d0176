"""KV events from a real engine (tiny random Llama) with a cpu and an LMDB tier: replayed into
a router-side index they agree with kv_stats() and with each tier's own lookups; the ZMQ
stream decodes with vLLM's field layout; a consumer that never reads loses events (counted)
without stalling the engine; the JSON-lines file parses."""
import json
import random
import sys
import time

import msgpack
import pytest
import zmq
from hf_checkpoints import make_variant

from kvtier import LLM, SamplingParams
from kvtier.engine.config import EngineConfig
from kvtier.engine.kv_events.vllm_wire import wire_events
from kvtier.engine.kv_events.zmq_publisher import require_zmq
from kvtier.engine.model_config import load_model_config
from kvtier.kvstore.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBus
from kvtier.kvstore.keys import BlockKey

BS = 16
PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_variant(tmp_path_factory.mktemp("llama"), "llama")
    cfg = load_model_config(path)
    block_bytes = cfg.num_layers * 2 * BS * cfg.num_kv_heads * cfg.head_dim * 4
    rng = random.Random(5)
    shared = [rng.randrange(3, cfg.vocab_size) for _ in range(48)]  # a common 3-block prefix
    prompts = [shared + [rng.randrange(3, cfg.vocab_size) for _ in range(n)] for n in (40, 70, 90, 110)]
    return dict(path=path, block_bytes=block_bytes, prompts=prompts)


def _gen(llm, prompts):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
    assert all(o.error is None and len(o.outputs[0].token_ids) == 4 for o in outs)
    return outs


class RouterIndex:
    """What a KV-aware router keeps: for each medium, the (group, hash) it holds."""

    def __init__(self):
        self.media: dict[str, set] = {}
        self.causes: set = set()

    def apply(self, e):
        held = self.media.setdefault(e.medium, set())
        if isinstance(e, BlockStored):
            held.add((e.group, e.block_hash))
            self.causes.add((e.medium, e.cause))
        elif isinstance(e, BlockRemoved):
            held.discard((e.group, e.block_hash))
            self.causes.add((e.medium, "removed"))
        else:
            held.clear()


def test_replayed_events_agree_with_kv_stats_and_tier_lookups(model, tmp_path):
    bb = model["block_bytes"]
    tiers = [f"cpu:{6 * bb}", f"lmdb:{tmp_path / 'disk'}?size=64MiB"]
    with LLM(model["path"], device="cpu", kv_cache_memory_bytes=14 * bb, kv_tiers=tiers,
             kv_connector_config={"load_or_recompute": False}) as llm:
        pools = [m.pool for m in llm.engine.kv.managers]
        assert all(p.events is None for p in pools), "no consumer yet: nothing may be recorded"
        events = llm.kv_events(max_events=1_000_000)
        _gen(llm, model["prompts"])
        llm.engine.connector.flush()
        _gen(llm, model["prompts"][:2])  # their prefix left the device and the cpu tier: lmdb serves it
        llm.engine.connector.flush()

        index = RouterIndex()
        for e in events:
            index.apply(e)
        assert events.dropped == 0

        # Device pool: exactly the blocks its prefix cache holds, as many as kv_stats counts.
        device = index.media["device"]
        cached = {(m.index, h) for m in llm.engine.kv.managers for h in m.pool.cached}
        assert device == cached
        stats = llm.kv_stats()
        assert len(device) == stats["device"]["cached_blocks"]

        cpu, disk = llm.engine.connector.hierarchy.tiers
        for tier, medium in ((cpu, "cpu"), (disk, "lmdb")):
            held = index.media[medium]
            assert held, f"no blocks announced on {medium}"
            keys = [llm.engine.connector.context.key(h, g) for g, h in held]
            assert all(tier.contains(keys)), f"{medium}: the index names blocks the tier does not hold"
            assert len(held) * bb <= stats[medium]["used_bytes"]
        assert {(k.group, k.block_hash) for k in cpu.keys_lru()} == index.media["cpu"]
        assert len(index.media["cpu"]) * bb == stats["cpu"]["used_bytes"]
        assert len(index.media["lmdb"]) == disk.disk_usage()[1]

        # The moves a router cares about were all reported, with their causes.
        for medium_cause in [("device", "computed"), ("device", "removed"), ("device", "loaded"),
                             ("cpu", "saved"), ("cpu", "removed"), ("cpu", "promoted"), ("lmdb", "saved")]:
            assert medium_cause in index.causes, medium_cause


def test_write_back_moves_are_demotions(model, tmp_path):
    bb = model["block_bytes"]
    tiers = [f"cpu:{4 * bb}", f"lmdb:{tmp_path / 'disk'}?size=64MiB"]
    with LLM(model["path"], device="cpu", kv_cache_memory_bytes=14 * bb, kv_tiers=tiers,
             kv_connector_config={"write_policy": "write-back"}) as llm:
        events = llm.kv_events(max_events=1_000_000)
        _gen(llm, model["prompts"])
        llm.engine.connector.flush()
        index = RouterIndex()
        for e in events:
            index.apply(e)
        cpu, disk = llm.engine.connector.hierarchy.tiers
        assert {(k.group, k.block_hash) for k in cpu.keys_lru()} == index.media["cpu"]
        keys = [llm.engine.connector.context.key(h, g) for g, h in index.media["lmdb"]]
        assert keys and all(disk.contains(keys))
    # device evictions go down to cpu, cpu evictions down to lmdb: both are demotions
    assert {("cpu", "demoted"), ("lmdb", "demoted")} <= index.causes
    assert ("cpu", "saved") not in index.causes


def test_device_events_carry_parent_and_tokens(model):
    with LLM(model["path"], device="cpu") as llm:
        events = llm.kv_events()
        prompt = model["prompts"][0]
        _gen(llm, [prompt])
        stored = [e for e in events if isinstance(e, BlockStored)]
    full = (len(prompt) + 3) // BS  # prompt + 3 fed-back tokens have KV
    assert len(stored) == full
    assert stored[0].parent_hash is None
    for i, e in enumerate(stored):
        assert e.token_ids == tuple(prompt[i * BS:(i + 1) * BS]) or i * BS + BS > len(prompt)
        assert e.num_tokens == BS and e.group == 0 and e.medium == "device" and e.cause == "computed"
        if i:
            assert e.parent_hash == stored[i - 1].block_hash


def test_zmq_subscriber_decodes_vllm_layout(model):
    with LLM(model["path"], device="cpu", kv_tiers=["cpu:64MiB"], kv_events_endpoint="tcp://127.0.0.1:*",
             kv_events_topic="kv") as llm:
        endpoint = llm.engine.kv_events.sinks[0].endpoint
        assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith(":*")
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"kv")
        sub.connect(endpoint)
        # ZMQ's slow joiner: a SUB sees only what is sent after it joined. Generate throwaway
        # prompts until one reaches it, then drain.
        rng = random.Random(1)
        deadline = time.monotonic() + 30
        while not sub.poll(200):
            assert time.monotonic() < deadline, "the subscriber never received anything"
            _gen(llm, [[rng.randrange(3, 200) for _ in range(20)]])
        while sub.poll(300):
            first_seq = int.from_bytes(sub.recv_multipart()[1], "big") + 1
        prompt = model["prompts"][1]
        _gen(llm, [prompt])
        llm.engine.connector.flush()
        frames = []
        while sub.poll(1000):
            frames.append(sub.recv_multipart())
        sub.close(0)
        ctx.term()
    assert frames
    assert [f[0] for f in frames] == [b"kv"] * len(frames)
    assert [int.from_bytes(f[1], "big") for f in frames] == list(range(first_seq, first_seq + len(frames)))
    stored = {}
    for _, _, payload in frames:
        batch = msgpack.unpackb(payload, raw=False)
        assert len(batch) == 2 and isinstance(batch[0], float)  # [ts, events], no dp rank
        for ev in batch[1]:
            assert ev[0] in ("BlockStored", "BlockRemoved", "AllBlocksCleared")
            if ev[0] == "BlockStored":
                tag, hashes, parent, token_ids, block_size, lora_id, medium = ev
                assert all(isinstance(h, bytes) and len(h) == 32 for h in hashes)
                assert block_size == BS and lora_id is None
                stored.setdefault(medium, []).append((hashes, parent, token_ids))
    # The device's new blocks arrive as one chained BlockStored with the prompt's tokens.
    hashes, parent, token_ids = stored["device"][0]
    assert parent is None and len(hashes) == (len(prompt) + 3) // BS
    assert token_ids[: len(prompt) // BS * BS] == prompt[: len(prompt) // BS * BS]
    # Tier copies: the tier as medium, the same hashes, no token ids (a tier does not know them).
    cpu_hashes = [h for hs, _, toks in stored["cpu"] for h in hs]
    assert set(cpu_hashes) <= set(hashes) and cpu_hashes
    assert all(toks == [] for _, _, toks in stored["cpu"])


def _replay(endpoint: str, start: bytes) -> list[tuple[int, bytes]]:
    """Ask the replay socket from a DEALER (REQ's envelope): [(sequence, payload)] up to the end marker."""
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    dealer.send_multipart([b"", start])
    got = []
    while dealer.poll(5000):
        empty, seq, payload = dealer.recv_multipart()
        got.append((int.from_bytes(seq, "big", signed=True), payload))
        if not payload:
            break
    dealer.close(0)
    ctx.term()
    return got


def test_replay_socket_resends_the_kept_batches(model):
    with LLM(model["path"], device="cpu", kv_events_endpoint="tcp://127.0.0.1:*",
             kv_events_replay_endpoint="tcp://127.0.0.1:*", kv_events_replay_batches=3) as llm:
        publisher = llm.engine.kv_events.sinks[0]
        rng = random.Random(3)
        deadline = time.monotonic() + 30
        while publisher.sent < 5:  # no subscriber: every batch is missed, and kept for replay
            assert time.monotonic() < deadline
            _gen(llm, [[rng.randrange(3, 200) for _ in range(40)]])
            time.sleep(0.05)
        sent = publisher.sent
        everything = _replay(publisher.replay_endpoint, (0).to_bytes(8, "big"))
        last_one = _replay(publisher.replay_endpoint, (sent - 1).to_bytes(8, "big"))
        malformed = _replay(publisher.replay_endpoint, b"bad")
    # Only the last 3 batches are kept; each is the published msgpack batch; -1 ends a replay.
    assert [seq for seq, _ in everything] == [sent - 3, sent - 2, sent - 1, -1]
    for _, payload in everything[:-1]:
        ts, events = msgpack.unpackb(payload, raw=False)
        assert isinstance(ts, float) and events and all(ev[0] in ("BlockStored", "BlockRemoved") for ev in events)
    assert last_one == [everything[2], (-1, b"")]
    assert malformed == [(-1, b"")] and publisher.replays == 3


def test_never_reading_consumer_drops_counted_and_engine_finishes(model):
    with LLM(model["path"], device="cpu", kv_events_queue=3) as llm:
        slow = llm.kv_events()  # never read
        outs = _gen(llm, model["prompts"])
        assert len(outs) == len(model["prompts"])
        assert slow.queued <= 3
        assert slow.dropped > 0
        assert llm.engine.kv_events.stats()["dropped"] == slow.dropped
        assert llm.engine.kv_events.bus.published == slow.dropped + slow.queued


def test_jsonl_file_parses_and_reset_clears(model, tmp_path):
    path = tmp_path / "events.jsonl"
    with LLM(model["path"], device="cpu", kv_events_file=str(path)) as llm:
        _gen(llm, model["prompts"][:2])
        assert llm.reset_prefix_cache()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines
    kinds = [d["kind"] for d in lines]
    assert "stored" in kinds and kinds[-1] == "cleared"
    first = lines[0]
    assert first["kind"] == "stored" and first["parent_hash"] is None and len(first["block_hash"]) == 64
    assert first["token_ids"] == model["prompts"][0][:BS] and first["size_bytes"] == model["block_bytes"]
    assert {"ts", "seq", "medium", "group", "cause", "num_tokens"} <= set(first)
    assert [d["seq"] for d in lines] == sorted(d["seq"] for d in lines)


@pytest.mark.gpu
def test_gpu_pool_is_the_gpu_medium(model):
    with LLM(model["path"], device="cuda", kv_tiers=["cpu:64MiB"]) as llm:
        events = llm.kv_events()
        _gen(llm, model["prompts"][:2])
        llm.engine.connector.flush()
        index = RouterIndex()
        for e in events:
            index.apply(e)
        cached = {(m.index, h) for m in llm.engine.kv.managers for h in m.pool.cached}
        assert index.media["GPU"] == cached and cached
        cpu = llm.engine.connector.hierarchy.tiers[0]
        assert {(k.group, k.block_hash) for k in cpu.keys_lru()} == index.media["cpu"]
        assert ("cpu", "saved") in index.causes


def test_wire_merges_only_chains():
    h = [bytes([i]) * 32 for i in range(4)]
    events = [
        BlockStored(h[0], None, (1, 2), 2, 0, "GPU", 8),
        BlockStored(h[1], h[0], (3, 4), 2, 0, "GPU", 8),
        BlockStored(h[2], None, None, 2, 0, "cpu", 8, "saved"),
        BlockStored(h[3], None, None, 2, 0, "cpu", 8, "saved"),  # not chained: separate
        BlockRemoved(h[0], 0, "GPU", 8),
        BlockRemoved(h[1], 0, "GPU", 8),
        AllBlocksCleared("GPU"),
    ]
    assert wire_events(events) == [
        ["BlockStored", [h[0], h[1]], None, [1, 2, 3, 4], 2, None, "GPU"],
        ["BlockStored", [h[2]], None, [], 2, None, "cpu"],
        ["BlockStored", [h[3]], None, [], 2, None, "cpu"],
        ["BlockRemoved", [h[0], h[1]], "GPU"],
        ["AllBlocksCleared"],
    ]


def test_bus_without_subscribers_publishes_nothing():
    bus = KVEventBus(4)
    bus.publish([AllBlocksCleared("GPU")])
    assert not bus.active and bus.published == 0
    sub = bus.subscribe()
    bus.publish([AllBlocksCleared("GPU")] * 3)
    bus.publish([AllBlocksCleared("GPU")] * 2)  # does not fit beside the first batch: dropped whole
    assert [e.medium for e in sub] == ["GPU"] * 3 and sub.dropped == 2
    sub.close()
    assert not bus.active


@pytest.mark.parametrize("kwargs, key", [
    (dict(kv_events_endpoint="localhost:5557"), "kv_events_endpoint"),
    (dict(kv_events_queue=0), "kv_events_queue"),
    (dict(kv_events_file=""), "kv_events_file"),
    (dict(kv_events_topic=3), "kv_events_topic"),
    (dict(kv_events_endpoint="tcp://*:5557", kv_events_replay_endpoint="5558"), "kv_events_replay_endpoint"),
    (dict(kv_events_replay_endpoint="tcp://*:5558"), "kv_events_replay_endpoint"),  # nothing to replay
    (dict(kv_events_endpoint="tcp://*:5557", kv_events_replay_batches=0), "kv_events_replay_batches"),
])
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        EngineConfig(model="m", **kwargs)


def test_unbindable_endpoint_fails_at_start(model):
    with pytest.raises(ValueError, match="kv_events_endpoint: cannot bind"):
        LLM(model["path"], device="cpu", kv_events_endpoint="tcp://256.0.0.1:1")
    with pytest.raises(ValueError, match="kv_events_replay_endpoint: cannot bind"):
        LLM(model["path"], device="cpu", kv_events_endpoint="tcp://127.0.0.1:*",
            kv_events_replay_endpoint="tcp://256.0.0.1:1")


def test_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "zmq", None)  # as if pyzmq were not installed
    with pytest.raises(ImportError, match=r"kvtier\[events\]"):
        require_zmq()


def test_block_key_roundtrip_for_tier_events():
    key = BlockKey(b"n" * 8, b"h" * 32, 2)
    assert BlockKey.from_bytes(key.to_bytes()) == key
