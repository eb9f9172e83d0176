"""The whole engine on models with sliding-window and SSM (Mamba2) layers, against
transformers' greedy generate: prompts longer than the window, chunked prefill over a
budget that is not a multiple of the block size, preemption, and prefix hits on the device
and from the cpu and LMDB tiers. Reloaded KV and SSM state give the same tokens as cold."""
import random

import pytest
from hf_checkpoints import load_hf_model, make_variant
from hf_compare import check_against_hf, hf_greedy

from kvtier import LLM, SamplingParams

MAX_TOKENS = 8
LENGTHS = [1, 7, 17, 33, 64, 150, 300]  # the window is 24 tokens; block size 16
PARAMS = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module", params=["mistral_sliding", "qwen2_sliding", "qwen3_sliding", "mamba2",
                                        "granite_hybrid"])
def case(request, tmp_path_factory):
    path = make_variant(tmp_path_factory.mktemp(request.param), request.param)
    hf = load_hf_model(path)
    rng = random.Random(11)
    prompts = [[rng.randrange(3, hf.config.vocab_size) for _ in range(n)] for n in LENGTHS]
    return dict(name=request.param, path=path, hf=hf, prompts=prompts, refs=hf_greedy(hf, prompts, MAX_TOKENS))


def _run(llm, case):
    return llm.generate([{"prompt_token_ids": p} for p in case["prompts"]], PARAMS, use_tqdm=False)


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_matches_hf_cold_and_from_the_device_prefix_cache(case):
    with LLM(case["path"], max_model_len=512) as llm:
        outs = _run(llm, case)
        check_against_hf(case["hf"], case["prompts"], case["refs"], outs, MAX_TOKENS)
        again = _run(llm, case)
    assert _tokens(again) == _tokens(outs)
    assert sum(o.num_cached_tokens for o in again) > 0
    assert all(o.kv_sources["device"] == o.num_cached_tokens for o in again)


def test_matches_hf_with_chunked_prefill_and_preemption(case):
    with LLM(case["path"], max_model_len=512) as probe:
        sizes = [p[0].numel() * p.element_size() for p in probe.engine.kv_pools]
        # The 300-token prompt alone needs 19 full-attention blocks; sliding groups far fewer.
        blocks = 26 if any(g.kind == "full" for g in probe.engine.groups) else 6
    # max_num_batched_tokens 50 is not a multiple of the block size; `blocks` blocks (state
    # slots) per group cannot hold every sequence at once.
    with LLM(case["path"], max_model_len=512, max_num_batched_tokens=50, kv_cache_memory_bytes=blocks * sum(sizes),
             kv_group_memory_fractions=[s / sum(sizes) for s in sizes]) as llm:
        outs = _run(llm, case)
        check_against_hf(case["hf"], case["prompts"], case["refs"], outs, MAX_TOKENS)
        if case["name"] not in ("mamba2",):  # state slots never grow: an SSM-only model waits instead
            assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("tier", ["cpu", "lmdb"])
def test_prefix_hits_from_a_tier_give_the_cold_tokens(case, tier, tmp_path):
    spec = "cpu:256MiB" if tier == "cpu" else f"lmdb:{tmp_path / 'kv'}?size=256MiB"
    with LLM(case["path"], max_model_len=512, kv_tiers=[spec], kv_connector_config={"load_or_recompute": False}) as llm:
        cold = _run(llm, case)
        assert llm.engine.connector.flush(timeout=30)
        assert llm.engine.kv.reset_prefix_cache()  # device copies gone: hits must come from the tier
        warm = _run(llm, case)
    assert _tokens(warm) == _tokens(cold)
    check_against_hf(case["hf"], case["prompts"], case["refs"], cold, MAX_TOKENS)
    assert sum(o.kv_sources.get(tier, 0) for o in warm) > 0
