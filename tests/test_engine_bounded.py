"""A long-lived engine's bookkeeping stays bounded, whatever the configuration: thousands of
requests through an engine with no tiers leave every per-request and per-step structure at
the size it had after the first few."""
import random

from hf_checkpoints import make_variant

from kvtier import LLM, SamplingParams
from kvtier.engine.model_config import load_model_config


def _sizes(llm: LLM) -> dict[str, int]:
    engine = llm.engine
    sched = engine.scheduler
    managers = engine.kv.managers
    return {
        "pool.evicted": sum(len(m.pool.evicted) for m in managers),
        "kv.newly_full": sum(len(m.newly_full) for m in managers),
        "kv.req_blocks": sum(len(m.req_blocks) for m in managers),
        "kv.num_published": sum(len(m.num_published) for m in managers),
        "engine.requests": len(engine.requests),
        "engine.ended_outside_loop": len(engine._ended_outside_loop),
        "outputs.texts": len(engine.outputs._texts),
        "scheduler.queues": len(sched.waiting) + len(sched.running) + len(sched.loading) + len(sched.held),
    }


def test_no_tier_engine_bookkeeping_stays_bounded(tmp_path):
    path = make_variant(tmp_path, "llama")
    cfg = load_model_config(path)
    block_bytes = cfg.num_layers * 2 * 16 * cfg.num_kv_heads * cfg.head_dim * 4
    # A small pool, so blocks are evicted and reused all the time.
    llm = LLM(path, max_model_len=256, kv_cache_memory_bytes=24 * block_bytes, max_num_seqs=16)
    rng = random.Random(0)
    params = [SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=3, stop=["zz"], ignore_eos=True)]
    try:
        for _ in range(40):  # 40 x 64 = 2560 requests, about 90k tokens
            prompts = [{"prompt_token_ids": [rng.randrange(3, cfg.vocab_size) for _ in range(rng.randrange(17, 60))]}
                       for _ in range(64)]
            llm.generate(prompts, [params[i % 2] for i in range(64)], use_tqdm=False)
            sizes = _sizes(llm)
            assert sizes == dict.fromkeys(sizes, 0), sizes
        pool = llm.engine.kv.managers[0].pool
        assert pool.num_evictions > 1000  # the pool really turned over
        assert len(pool.cached) <= pool.num_blocks
    finally:
        llm.close()
