"""The same engine on CUDA: float32 greedy tokens equal the CPU run, also when prefixes come
back from the pinned CPU tier. Skipped where no CUDA device is present (conftest.py)."""
import random

import pytest
from hf_checkpoints import make_variant

from kvtier import LLM, SamplingParams
from kvtier.engine.model_config import load_model_config

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    path = make_variant(tmp_path_factory.mktemp("qwen3"), "qwen3")
    cfg = load_model_config(path)
    rng = random.Random(2)
    prompts = [{"prompt_token_ids": [rng.randrange(3, cfg.vocab_size) for _ in range(n)]} for n in (5, 40, 130, 300)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with LLM(path, device="cpu") as llm:
        reference = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    block_bytes = cfg.num_layers * 2 * 16 * cfg.num_kv_heads * cfg.head_dim * 4
    return dict(path=path, prompts=prompts, params=params, reference=reference, block_bytes=block_bytes)


def test_cuda_greedy_matches_cpu(case):
    with LLM(case["path"], device="cuda", dtype="float32") as llm:
        outs = llm.generate(case["prompts"], case["params"], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == case["reference"]


def test_cuda_pool_with_pinned_cpu_tier(case):
    with LLM(case["path"], device="cuda", dtype="float32", kv_cache_memory_bytes=24 * case["block_bytes"],
             kv_tiers=["cpu:64MiB"], kv_connector_config={"load_or_recompute": False}) as llm:
        # load_or_recompute off: on a GPU recomputing may be judged cheaper, and this test is about loads.
        llm.generate(case["prompts"], case["params"], use_tqdm=False)
        outs = llm.generate(case["prompts"], case["params"], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == case["reference"]
    assert sum(o.kv_sources.get("cpu", 0) for o in outs) > 0
