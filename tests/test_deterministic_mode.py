"""Deterministic mode end to end: one "needle" request gives bitwise the same tokens and
logprobs alone, in batches of 2-32 other requests in any order, with any prefill chunking,
cold or from the device prefix cache, the CPU tier or the LMDB tier, and after preemption;
for a dense model, a sliding-window model and a hybrid (Mamba2 + attention) model. With the
mode off the same drill gives different bits (the negative control)."""
import random

import pytest
from hf_checkpoints import make_variant

from kvtier import LLM, SamplingParams
from kvtier.engine.model_config import load_model_config

NEEDLE_LEN = 150
GREEDY = SamplingParams(temperature=0, max_tokens=12, logprobs=1, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.8, seed=7, max_tokens=12, logprobs=1, ignore_eos=True)
OTHER = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
# (other requests, max_num_batched_tokens): batch sizes 2-32, one-shot and chunked prefills.
BATCHES = [(1, 2048), (7, 64), (15, 100), (31, 512)]


@pytest.fixture(scope="module", params=["llama", "mistral_sliding", "granite_hybrid"])
def case(request, tmp_path_factory):
    path = make_variant(tmp_path_factory.mktemp(request.param), request.param)
    vocab = load_model_config(path).vocab_size
    rng = random.Random(5)
    return dict(name=request.param, path=path, vocab=vocab,
                needle=[rng.randrange(3, vocab) for _ in range(NEEDLE_LEN)])


def _others(case, n: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(3, case["vocab"]) for _ in range(rng.randint(5, 260))] for _ in range(n)]


def _bits(out) -> tuple:
    """Tokens and the exact float logprob of each sampled token."""
    o = out.outputs[0]
    return tuple(o.token_ids), tuple(entry[t].logprob for entry, t in zip(o.logprobs, o.token_ids))


def _run_needle(llm, needle, params, others, rng) -> tuple:
    prompts = list(others)
    at = rng.randint(0, len(prompts))
    prompts.insert(at, needle)
    plist = [OTHER] * len(prompts)
    plist[at] = params
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], plist, use_tqdm=False)
    return _bits(outs[at]), outs[at]


def _batched_results(case, deterministic: bool, params) -> tuple[tuple, list[tuple]]:
    rng = random.Random(17)
    with LLM(case["path"], deterministic=deterministic) as llm:
        alone, _ = _run_needle(llm, case["needle"], params, [], rng)
    results = []
    for n, budget in BATCHES:
        with LLM(case["path"], deterministic=deterministic, max_num_batched_tokens=budget) as llm:
            results.append(_run_needle(llm, case["needle"], params, _others(case, n, rng), rng)[0])
    return alone, results


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_needle_is_bitwise_equal_in_any_batch_order_and_chunking(case, params):
    alone, batched = _batched_results(case, True, params)
    assert all(r == alone for r in batched), [r == alone for r in batched]


@pytest.mark.parametrize("variant", ["mamba2", "qwen3"])
def test_needle_is_bitwise_equal_for_the_other_families(variant, tmp_path):
    """An SSM-only model and Qwen3 (per-head q/k norms): the batched drill, greedy."""
    path = make_variant(tmp_path, variant)
    vocab = load_model_config(path).vocab_size
    needle = [random.Random(5).randrange(3, vocab) for _ in range(NEEDLE_LEN)]
    alone, batched = _batched_results(dict(path=path, vocab=vocab, needle=needle), True, GREEDY)
    assert all(r == alone for r in batched)


def test_mode_off_is_not_batch_invariant_on_this_machine():
    """The negative control: the stock kernels change the needle's bits with the batch.
    If this ever passes with equal bits, the CPU kernels became invariant on their own and
    the mode's guarantee must be re-checked against a new control."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        case = dict(path=make_variant(tmp, "llama"), vocab=500, needle=[random.Random(5).randrange(3, 500)
                                                                          for _ in range(NEEDLE_LEN)])
        alone, batched = _batched_results(case, False, GREEDY)
    assert any(r != alone for r in batched)
    assert all(r[0] == alone[0] for r in batched)  # same tokens: only the low bits moved


def test_needle_is_bitwise_equal_from_device_cpu_and_lmdb_hits(case, tmp_path):
    rng = random.Random(23)
    with LLM(case["path"], deterministic=True) as llm:
        cold, _ = _run_needle(llm, case["needle"], GREEDY, [], rng)
    lmdb = f"lmdb:{tmp_path / 'kv'}?size=256MiB"
    tiers = ["cpu:256MiB", lmdb]
    with LLM(case["path"], deterministic=True, kv_tiers=tiers, kv_connector_config={"load_or_recompute": False}) as llm:
        first, out = _run_needle(llm, case["needle"], GREEDY, _others(case, 5, rng), rng)
        assert first == cold and out.num_cached_tokens == 0
        device, out = _run_needle(llm, case["needle"], GREEDY, _others(case, 5, rng), rng)
        assert device == cold and out.kv_sources.get("device", 0) > 0
        assert llm.engine.connector.flush(timeout=30)
        assert llm.engine.kv.reset_prefix_cache()
        cpu, out = _run_needle(llm, case["needle"], GREEDY, _others(case, 5, rng), rng)
        assert cpu == cold and out.kv_sources.get("cpu", 0) > 0
    with LLM(case["path"], deterministic=True, kv_tiers=[lmdb], kv_connector_config={"load_or_recompute": False}) as llm:
        from_disk, out = _run_needle(llm, case["needle"], GREEDY, _others(case, 3, rng), rng)
    assert from_disk == cold and out.kv_sources.get("lmdb", 0) > 0


def test_needle_is_bitwise_equal_after_preemption(case):
    rng = random.Random(29)
    with LLM(case["path"], deterministic=True, max_model_len=512) as llm:
        alone, _ = _run_needle(llm, case["needle"], GREEDY, [], rng)
        sizes = [p[0].numel() * p.element_size() for p in llm.engine.kv_pools]
        full = any(g.kind == "full" for g in llm.engine.groups)
    # A pool that holds the needle but not the whole batch: requests get preempted and
    # recomputed. Sliding-only models hold few blocks per request and need a tighter setup.
    blocks, budget, count = (26, 64, 5) if full else (11, 32, 9)
    with LLM(case["path"], deterministic=True, max_model_len=512, max_num_batched_tokens=budget,
             kv_cache_memory_bytes=blocks * sum(sizes), kv_group_memory_fractions=[s / sum(sizes) for s in sizes]) as llm:
        long_others = [[rng.randrange(3, case["vocab"]) for _ in range(120)] for _ in range(count)]
        params = SamplingParams(temperature=0, max_tokens=40, logprobs=1, ignore_eos=True)
        prompts = [case["needle"], *long_others]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [GREEDY] + [params] * count, use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0
    assert _bits(outs[0]) == alone


def test_mixed_traffic_keeps_the_guarantee_and_opted_out_requests_use_fast_kernels(case):
    rng = random.Random(31)
    others = _others(case, 9, rng)
    fast_params = SamplingParams(temperature=0, max_tokens=6, logprobs=1, ignore_eos=True, deterministic=False)
    with LLM(case["path"], deterministic=True) as llm:
        alone, _ = _run_needle(llm, case["needle"], GREEDY, [], rng)
        prompts = [case["needle"], *others]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [GREEDY] + [fast_params] * len(others),
                            use_tqdm=False)
    assert _bits(outs[0]) == alone
    with LLM(case["path"]) as plain:
        reference = plain.generate([{"prompt_token_ids": p} for p in others], fast_params, use_tqdm=False)
    for ours, ref in zip(outs[1:], reference):
        assert ours.outputs[0].token_ids == ref.outputs[0].token_ids
        for entry, ref_entry, t in zip(ours.outputs[0].logprobs, ref.outputs[0].logprobs, ref.outputs[0].token_ids):
            assert abs(entry[t].logprob - ref_entry[t].logprob) < 1e-5


def test_deterministic_kernels_compute_the_same_model(case):
    """The invariant kernels are a different summation order, not a different model: greedy
    tokens equal the fast path's and logprobs agree to float32 rounding."""
    rng = random.Random(37)
    prompts = [case["needle"], *_others(case, 5, rng)]
    runs = []
    for deterministic in (True, False):
        with LLM(case["path"], deterministic=deterministic) as llm:
            runs.append(llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False))
    for det, fast in zip(*runs):
        assert det.outputs[0].token_ids == fast.outputs[0].token_ids
        for a, b, t in zip(det.outputs[0].logprobs, fast.outputs[0].logprobs, fast.outputs[0].token_ids):
            assert abs(a[t].logprob - b[t].logprob) < 1e-4


def test_unseeded_sampling_is_reproducible_in_any_batch(case):
    params = SamplingParams(temperature=0.8, max_tokens=12, logprobs=1, ignore_eos=True)  # no seed
    alone, batched = _batched_results(case, True, params)
    assert all(r == alone for r in batched)


def test_bad_determinism_settings_get_clear_errors(tmp_path):
    path = make_variant(tmp_path, "llama")
    with pytest.raises(ValueError, match="codec"):
        LLM(path, deterministic=True, kv_tiers=[f"lmdb:{tmp_path / 'kv'}?size=64MiB&codec=fp8"])
    with pytest.raises(ValueError, match="deterministic"):
        LLM(path, deterministic="yes")
    with pytest.raises(ValueError, match="deterministic"):
        SamplingParams(deterministic=1)
    with LLM(path) as llm:
        with pytest.raises(ValueError, match="deterministic=True"):
            llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(deterministic=True), use_tqdm=False)
