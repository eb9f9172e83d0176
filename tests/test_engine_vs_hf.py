"""The whole engine (scheduler, paged KV, prefix cache, preemption, chunked prefill) against
Hugging Face transformers `generate`, greedy, float32, on random-weight checkpoints.

Near-ties are tolerated as tests/hf_compare.py describes; every logprob is compared with HF's.
"""
import random

import pytest
from hf_checkpoints import load_hf_model, make_variant
from hf_compare import check_against_hf, hf_greedy

from kvtier import LLM, SamplingParams
from kvtier.engine.model_config import load_model_config

MAX_TOKENS = 10
LENGTHS = [1, 7, 16, 17, 33, 64, 150, 300]  # crosses block boundaries (block_size 16)


@pytest.fixture(scope="module", params=["llama3_rope", "llama_tied", "mistral", "qwen2", "qwen3"])
def case(request, tmp_path_factory):
    path = make_variant(tmp_path_factory.mktemp(request.param), request.param)
    hf = load_hf_model(path)
    cfg = load_model_config(path)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, cfg.vocab_size) for _ in range(n)] for n in LENGTHS]
    refs = hf_greedy(hf, prompts, MAX_TOKENS)
    block_bytes = cfg.num_layers * 2 * 16 * cfg.num_kv_heads * cfg.head_dim * 4
    return dict(path=path, hf=hf, prompts=prompts, refs=refs, block_bytes=block_bytes)


def _generate(case, **engine_args):
    llm = LLM(case["path"], **engine_args)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in case["prompts"]], params, use_tqdm=False)
    return llm, outs


def _check_against_hf(case, outs):
    check_against_hf(case["hf"], case["prompts"], case["refs"], outs, MAX_TOKENS)


def test_matches_hf_generate(case):
    llm, outs = _generate(case)
    _check_against_hf(case, outs)
    # Second pass over the same prompts: served from the prefix cache, same tokens.
    again = llm.generate(
        [{"prompt_token_ids": p} for p in case["prompts"]],
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1),
        use_tqdm=False,
    )
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]
    assert sum(o.num_cached_tokens for o in again) >= sum((n - 1) // 16 * 16 for n in LENGTHS)
    assert all(o.kv_sources["device"] == o.num_cached_tokens for o in again)


def test_matches_hf_with_preemption(case):
    # 20 blocks of 16 tokens, and prompts admitted chunk by chunk: the 300-token prompt alone
    # needs all 20 blocks, so admitted requests outgrow the pool and get preempted.
    llm, outs = _generate(case, kv_cache_memory_bytes=20 * case["block_bytes"], max_num_batched_tokens=64)
    assert llm.engine.scheduler.num_preemptions > 0
    _check_against_hf(case, outs)


def test_matches_hf_with_chunked_prefill(case):
    llm, outs = _generate(case, max_num_batched_tokens=24, enable_prefix_caching=False)
    _check_against_hf(case, outs)
    assert all(o.num_cached_tokens == 0 for o in outs)
