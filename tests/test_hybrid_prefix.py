"""What KV groups buy: sliding groups hold about window/block_size + 1 blocks however long a
sequence decodes; SSM models reuse a shared prefix that only branch points checkpoint; and
KV and state reloaded from a tier are bitwise what was computed."""
import random

import pytest
import torch
from hf_checkpoints import make_variant

from kvtier import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def _ids(rng, n):
    return [rng.randrange(3, 500) for _ in range(n)]


def test_sliding_blocks_stay_bounded_while_a_long_sequence_decodes(tmp_path):
    path = make_variant(tmp_path, "qwen2_sliding")  # layer 0 full attention, the others slide (window 24)
    rng = random.Random(1)
    with LLM(path, max_model_len=1024, max_num_batched_tokens=64) as llm:
        engine = llm.engine
        kinds = [g.kind for g in engine.groups]
        sliding, full = kinds.index("sliding"), kinds.index("full")
        engine.add_request({"prompt_token_ids": _ids(rng, 300)},
                           SamplingParams(temperature=0, max_tokens=400, ignore_eos=True), request_id="long")
        most, held = 0, []
        while engine.has_unfinished():
            engine.step()
            req = engine.requests.get("long")
            if req is not None and req.num_computed_tokens > 301:  # decoding (the prefill chunks are freed)
                counts = engine.kv.num_held_blocks("long")
                most = max(most, counts[sliding])
                held.append(counts[full])
        # A decode step reads the 24-token window: at most ceil(24 / 16) + 1 blocks, plus the
        # block the new token lands in; the full-attention group grows with the sequence.
        assert most <= 24 // 16 + 2
        assert held[-1] >= 690 // 16
        for m in engine.kv.managers:  # everything is back in its pool
            assert m.pool.num_free_blocks == m.pool.num_blocks


@pytest.mark.parametrize("variant", ["mamba2", "granite_hybrid"])
def test_a_shared_prefix_is_reused_through_a_branch_point(tmp_path, variant):
    path = make_variant(tmp_path, variant)
    rng = random.Random(2)
    prefix = _ids(rng, 48)  # a shared system prompt
    prompts = [{"prompt_token_ids": prefix + _ids(rng, 21)} for _ in range(4)]
    with LLM(path) as cold_llm:  # no reuse at all: the reference tokens
        cold = [cold_llm.generate(p, GREEDY, use_tqdm=False)[0] for p in prompts]
        cold_llm.engine.kv.reset_prefix_cache()
    # No interval checkpoints: only prompt ends and branch points are saved.
    with LLM(path, ssm_checkpoint_interval=4096) as llm:
        outs = [llm.generate(p, GREEDY, use_tqdm=False)[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in cold]
    # The first request checkpoints its own prompt end only; the second shares 48 tokens with
    # it and saves a checkpoint there (its branch point); the third and fourth resume from it.
    assert [o.num_cached_tokens for o in outs] == [0, 0, 48, 48]


def test_state_and_kv_reloaded_from_a_tier_are_bitwise_the_computed_ones(tmp_path):
    path = make_variant(tmp_path, "granite_hybrid")
    rng = random.Random(3)
    prompts = [{"prompt_token_ids": _ids(rng, n)} for n in (50, 90, 130)]
    with LLM(path, kv_tiers=["cpu:64MiB"], kv_connector_config={"load_or_recompute": False}) as llm:
        llm.generate(prompts, GREEDY, use_tqdm=False)
        kv = llm.engine.kv
        computed = {(m.index, h): llm.engine.kv_pools[m.index][b.block_id].clone()
                    for m in kv.managers for h, b in m.pool.cached.items()}
        assert kv.reset_prefix_cache()
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert sum(o.kv_sources.get("cpu", 0) for o in outs) > 0
        compared = 0
        for m in kv.managers:
            for h, b in m.pool.cached.items():
                if (m.index, h) in computed:
                    assert torch.equal(llm.engine.kv_pools[m.index][b.block_id], computed[(m.index, h)])
                    compared += 1
        assert {m.group.kind for m in kv.managers} == {"full", "ssm"} and compared > 0
        ssm = next(m for m in kv.managers if m.group.kind == "ssm")
        assert any((ssm.index, h) in computed for h in ssm.pool.cached), "a reloaded checkpoint was compared"
