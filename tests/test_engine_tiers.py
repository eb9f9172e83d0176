"""LMDB, Redis and gRPC tiers under the whole engine: same tokens as without tiers, hits
reported in kv_sources, warm restart across processes, engines sharing one store, and
faults (a server killed mid-run or never there, corrupt LMDB values, a full LMDB map)."""
import json
import random
import subprocess
import sys
import textwrap
import time

import lmdb
import pytest
from grpc_server import KVServerProcess
from hf_checkpoints import make_variant

from kvtier import LLM, SamplingParams
from kvtier.engine.model_config import load_model_config

LENGTHS = [40, 90, 130, 200]
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_variant(tmp_path_factory.mktemp("llama"), "llama")
    cfg = load_model_config(path)
    rng = random.Random(11)
    prompts = [[rng.randrange(3, cfg.vocab_size) for _ in range(n)] for n in LENGTHS]
    with LLM(path) as llm:
        reference = [o.outputs[0].token_ids for o in llm.generate(_prompts(prompts), PARAMS, use_tqdm=False)]
    block_bytes = cfg.num_layers * 2 * 16 * cfg.num_kv_heads * cfg.head_dim * 4
    return dict(path=path, prompts=prompts, reference=reference, small_pool=16 * block_bytes)


def _prompts(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def _run(llm, model):
    outs = llm.generate(_prompts(model["prompts"]), PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == model["reference"]
    assert all(o.error is None for o in outs)
    return outs


def _tier_tokens(outs, tier):
    return sum(o.kv_sources.get(tier, 0) for o in outs)


def _engine(model, tiers, **kw):
    return LLM(model["path"], kv_cache_memory_bytes=model["small_pool"], kv_tiers=tiers, **kw)


def test_lmdb_tier_hits_after_the_device_forgot(model, tmp_path):
    with _engine(model, [f"lmdb:{tmp_path}?size=64MiB"]) as llm:
        _run(llm, model)
        llm.engine.connector.flush()
        outs = _run(llm, model)
        assert _tier_tokens(outs, "lmdb") > 0
        assert llm.kv_stats()["lmdb"]["hits"] > 0


_CHILD = textwrap.dedent(
    """
    import json, sys
    from kvtier import LLM, SamplingParams
    path, tier, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    with LLM(path, kv_tiers=[tier]) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
        llm.engine.connector.flush()
    print(json.dumps([[o.outputs[0].token_ids, o.kv_sources] for o in outs]))
    """
)


def _child(model, tier):
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, model["path"], tier, json.dumps(model["prompts"])],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_lmdb_warm_restart_across_processes(model, tmp_path):
    tier = f"lmdb:{tmp_path}?size=64MiB"
    first = _child(model, tier)  # process A fills the directory
    second = _child(model, tier)  # process B starts cold on the device, warm on disk
    assert [t for t, _ in first] == model["reference"] == [t for t, _ in second]
    assert sum(s.get("lmdb", 0) for _, s in first) == 0
    assert sum(s.get("lmdb", 0) for _, s in second) >= sum((n - 1) // 16 * 16 for n in LENGTHS)


def test_two_engines_share_one_redis(model, redis_server):
    tier = f"{redis_server.url}?ttl=600&prefix=shared:"
    with _engine(model, [tier]) as first:
        assert _tier_tokens(_run(first, model), "redis") == 0
        first.engine.connector.flush()
    with _engine(model, [tier]) as second:  # a different engine, same Redis
        assert _tier_tokens(_run(second, model), "redis") >= sum((n - 1) // 16 * 16 for n in LENGTHS)


def test_redis_killed_mid_run_then_restarted(model, redis_server):
    tier = f"{redis_server.url}?timeout=0.2&breaker_cooldown=0.3"
    with _engine(model, [tier]) as llm:
        _run(llm, model)
        llm.engine.connector.flush()
        engine = llm.engine
        for p in model["prompts"]:
            engine.add_request({"prompt_token_ids": p}, PARAMS)
        engine.step()
        redis_server.kill()  # SIGKILL while requests are loading and running
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
        by_id = sorted(outs, key=lambda o: int(o.request_id.rpartition("-")[2]))  # ids: <engine>-<n>
        assert [o.outputs[0].token_ids for o in by_id] == model["reference"]
        assert llm.kv_stats()["redis"]["errors"] > 0
        redis_server.start()
        time.sleep(0.4)  # past the breaker's cool-down
        _run(llm, model)  # the restarted Redis is empty: this pass writes to it again
        llm.engine.connector.flush()
        outs = _run(llm, model)
        assert _tier_tokens(outs, "redis") > 0, "the tier must work again without restarting the engine"


def test_redis_unreachable_from_the_start(model, redis_server):
    url = redis_server.url
    redis_server.kill()
    with _engine(model, [f"{url}?timeout=0.1"]) as llm:
        _run(llm, model)
        outs = _run(llm, model)
        assert _tier_tokens(outs, "redis") == 0
        assert llm.kv_stats()["redis"]["errors"] > 0


def test_corrupt_lmdb_values_are_recomputed_and_deleted(model, tmp_path):
    tier = f"lmdb:{tmp_path}?size=64MiB"
    with _engine(model, [tier]) as llm:
        _run(llm, model)
        llm.engine.connector.flush()
    # Flip one byte in the middle of every stored block value, directly in the LMDB file.
    env = lmdb.open(str(tmp_path), max_dbs=8, subdir=True)
    blocks = env.open_db(b"blocks")
    corrupted = 0
    with env.begin(write=True, db=blocks) as txn:
        for key, value in list(txn.cursor()):
            flipped = bytearray(value)
            flipped[len(flipped) // 2] ^= 0xFF
            txn.put(key, bytes(flipped))
            corrupted += 1
    env.close()
    assert corrupted > 0
    with _engine(model, [tier]) as llm:
        _run(llm, model)
        stats = llm.kv_stats()["lmdb"]
    assert stats["errors"] > 0 and stats["hits"] == 0


def test_full_lmdb_map_never_breaks_generation(model, tmp_path):
    # 256 KiB holds a handful of this model's blocks: writes evict or are skipped, never raise.
    with _engine(model, [f"lmdb:{tmp_path}?size=256KiB"]) as llm:
        for _ in range(3):
            _run(llm, model)
        llm.engine.connector.flush()
        stats = llm.kv_stats()["lmdb"]
    assert stats["used_bytes"] <= 256 << 10
    assert stats["evictions"] + stats["skipped_writes"] > 0


@pytest.mark.parametrize("spec, message", [
    ("lmdb:", "needs a directory"),
    ("floppy:/tmp", "unknown tier"),
    ("cpu:12parsecs", "cannot parse"),
    ("lmdb:/tmp/x?size=-1", "size"),
])
def test_bad_tier_specs_fail_fast(model, spec, message):
    with pytest.raises(ValueError, match=message):
        LLM(model["path"], kv_tiers=[spec])


class CliKVServer(KVServerProcess):
    """The server as users start it: `kvtier kv-server`."""

    command = [sys.executable, "-m", "kvtier", "kv-server"]


def test_grpc_tier_through_the_engine_with_two_sharded_servers(model):
    with CliKVServer("--capacity", "64MiB") as a, CliKVServer("--capacity", "64MiB") as b:
        tier = f"grpc://{a.address},{b.address}"
        with _engine(model, [tier]) as llm:
            assert _tier_tokens(_run(llm, model), "grpc") == 0
            llm.engine.connector.flush()
        with _engine(model, [tier]) as llm:  # a fresh engine: its device knows nothing
            outs = _run(llm, model)
            stats = llm.kv_stats()["grpc"]
        assert _tier_tokens(outs, "grpc") >= sum((n - 1) // 16 * 16 for n in LENGTHS)
        assert stats["errors"] == 0


def test_grpc_server_killed_mid_run(model):
    server = KVServerProcess("--capacity", "64MiB")
    try:
        tier = f"grpc://{server.address}?timeout=0.5&cooldown=0.3"
        with _engine(model, [tier]) as llm:
            _run(llm, model)
            llm.engine.connector.flush()
            server.kill()
            _run(llm, model)  # every request completes, on recompute
            assert llm.kv_stats()["grpc"]["errors"] > 0
            server.start()
            # gRPC's reconnect backoff (up to 2 s) and the breaker's cool-down both have to
            # pass before the tier is written again; then the next run reads from it.
            deadline = time.monotonic() + 30
            while True:
                _run(llm, model)
                llm.engine.connector.flush()
                if _tier_tokens(_run(llm, model), "grpc") > 0:
                    break
                assert time.monotonic() < deadline, "the restarted server was never used again"
    finally:
        server.kill()
