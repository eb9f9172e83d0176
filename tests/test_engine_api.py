"""The LLM API's contract beyond greedy equality: bad requests fail alone, stop conditions,
logprobs, seeded sampling independent of the batch, prefix caching on/off equivalence."""
import random

import pytest
from hf_checkpoints import make_variant

from kvtier import LLM, SamplingParams
from kvtier.engine.model_config import load_model_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = make_variant(tmp_path_factory.mktemp("qwen2"), "qwen2")
    cfg = load_model_config(path)
    llm = LLM(path, max_model_len=256, kv_cache_memory_bytes=64 * cfg.num_layers * 2 * 16 * cfg.num_kv_heads
              * cfg.head_dim * 4)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, cfg.vocab_size) for _ in range(n)] for n in (5, 30, 70)]
    yield dict(path=path, llm=llm, cfg=cfg, prompts=prompts)
    llm.close()


def _ids(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def test_bad_prompts_fail_alone(setup):
    llm, cfg, prompts = setup["llm"], setup["cfg"], setup["prompts"]
    batch = _ids(prompts[:1]) + [
        {"prompt_token_ids": [1] * 300},  # longer than max_model_len=256
        {"prompt_token_ids": []},
        {"prompt_token_ids": [cfg.vocab_size + 5]},
    ] + _ids(prompts[1:])
    outs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "error", "error", "error", "length", "length"]
    assert "max_model_len" in outs[1].error and "empty" in outs[2].error and "vocabulary" in outs[3].error
    assert all(len(o.outputs[0].token_ids) == 4 for o in (outs[0], outs[4], outs[5]))


def test_prompt_larger_than_the_pool_fails_alone(setup):
    cfg = setup["cfg"]
    block_bytes = cfg.num_layers * 2 * 16 * cfg.num_kv_heads * cfg.head_dim * 4
    with LLM(setup["path"], kv_cache_memory_bytes=4 * block_bytes) as small:
        outs = small.generate([{"prompt_token_ids": [7] * 100}, {"prompt_token_ids": [7] * 20}],
                              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error" and "KV pool" in outs[0].error
    assert outs[1].outputs[0].finish_reason == "length" and len(outs[1].outputs[0].token_ids) == 3


def test_stop_token_ids_and_max_model_len(setup):
    llm, prompts = setup["llm"], setup["prompts"]
    free = llm.generate(_ids(prompts[:1]), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    stop_at = free[3]
    out = llm.generate(_ids(prompts[:1]), SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_at],
                                                          ignore_eos=True), use_tqdm=False)[0].outputs[0]
    cut = free.index(stop_at)
    assert out.token_ids == free[: cut + 1] and out.finish_reason == "stop" and out.stop_reason == stop_at
    long = llm.generate({"prompt_token_ids": [9] * 250}, SamplingParams(temperature=0, max_tokens=50,
                                                                        ignore_eos=True), use_tqdm=False)[0]
    assert long.outputs[0].finish_reason == "length" and len(long.outputs[0].token_ids) == 6


def test_stop_strings_cut_the_text(setup):
    llm = setup["llm"]
    free = llm.generate("hello there", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert len(free.text) >= 4
    stop = free.text[2:4]
    out = llm.generate("hello there", SamplingParams(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[: free.text.index(stop)]


def test_logprobs_are_top_k_and_consistent(setup):
    llm, prompts = setup["llm"], setup["prompts"]
    out = llm.generate(_ids(prompts[1:2]), SamplingParams(temperature=0, max_tokens=5, logprobs=3,
                                                          ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert entry[tok].rank == 1  # greedy picks the top token
        values = [lp.logprob for lp in entry.values()]
        assert len(entry) == 3 and values == sorted(values, reverse=True) and values[0] <= 0
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_seeded_sampling_is_independent_of_the_batch(setup):
    llm, prompts = setup["llm"], setup["prompts"]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate(_ids(prompts[1:2]), seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True)
    batch = llm.generate(_ids([prompts[0], prompts[1], prompts[2]]), [others, seeded, others],
                         use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    other_seed = llm.generate(_ids(prompts[1:2]), SamplingParams(temperature=1.0, top_p=0.9, seed=99,
                                                                 max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert other_seed[0].outputs[0].token_ids != alone


def test_prefix_caching_on_and_off_give_identical_outputs(setup):
    rng = random.Random(8)
    shared = [rng.randrange(3, setup["cfg"].vocab_size) for _ in range(64)]
    prompts = [shared + [rng.randrange(3, 400) for _ in range(n)] for n in (3, 17, 40)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    results = []
    for caching in (True, False):
        with LLM(setup["path"], enable_prefix_caching=caching) as llm:
            outs = llm.generate(_ids(prompts), params, use_tqdm=False) + llm.generate(_ids(prompts), params,
                                                                                      use_tqdm=False)
            results.append(([o.outputs[0].token_ids for o in outs], sum(o.num_cached_tokens for o in outs)))
    assert results[0][0] == results[1][0]
    assert results[0][1] > 0 and results[1][1] == 0


def test_sampling_params_list_must_match_prompts(setup):
    with pytest.raises(ValueError, match="sampling_params"):
        setup["llm"].generate(_ids(setup["prompts"]), [SamplingParams()] * 2, use_tqdm=False)


def test_cache_salt_isolates_tenants(setup):
    llm, prompt = setup["llm"], setup["prompts"][2]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    llm.generate({"prompt_token_ids": prompt, "cache_salt": "tenant-a"}, params, use_tqdm=False)
    same = llm.generate({"prompt_token_ids": prompt, "cache_salt": "tenant-a"}, params, use_tqdm=False)[0]
    other = llm.generate({"prompt_token_ids": prompt, "cache_salt": "tenant-b"}, params, use_tqdm=False)[0]
    assert same.num_cached_tokens == 64 and other.num_cached_tokens == 0
    assert same.outputs[0].token_ids == other.outputs[0].token_ids


def test_incremental_stop_detection_matches_decoding_everything_each_step(setup):
    """The fast path (a few tokens decoded per step) against the reference (the whole output
    decoded each step): the first step at which a stop string shows up is the same, over
    random outputs and stop strings cut from their own text, except where the reference's
    text ends in an unfinished UTF-8 character, which the fast path holds back until the
    next token completes it (as vLLM's detokenizer does)."""
    from kvtier.engine.output_builder import OutputBuilder
    from kvtier.engine.request import Request

    builder = OutputBuilder(setup["llm"].engine.tokenizer)
    tok, rng = builder.tokenizer, random.Random(11)
    held_back = 0
    for case in range(40):
        prompt = [rng.randrange(3, setup["cfg"].vocab_size) for _ in range(4)]
        output = [rng.randrange(3, setup["cfg"].vocab_size) for _ in range(30)]
        text = tok.decode(output)
        at = rng.randrange(len(text) - 3)
        stops = [text[at : at + rng.randint(1, 6)].replace("\ufffd", "") or "x", "\u2603never"]
        reference = next((n for n in range(1, 31) if any(s in tok.decode(output[:n]) for s in stops)), None)
        req = Request(f"r{case}", prompt, SamplingParams(stop=stops))
        fast = None
        for n in range(1, 31):
            req.output_token_ids.append(output[n - 1])
            if builder.hit_stop_string(req):
                fast = n
                break
        if fast != reference:
            assert tok.decode(output[:reference]).endswith("\ufffd") and (fast is None or fast > reference)
            held_back += 1
        builder.build(req)
    assert held_back <= 10 and not builder._texts  # finished requests leave nothing behind


def test_token_ids_of_any_integer_type_run_like_python_ints(setup):
    """numpy and torch integer scalars, 1-D arrays and tensors are token ids like ints."""
    import numpy as np
    import torch

    llm, prompt = setup["llm"], setup["prompts"][1]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    forms = [prompt, [np.int64(t) for t in prompt], np.array(prompt, dtype=np.int32),
             torch.tensor(prompt), [torch.tensor(t) for t in prompt]]
    outs = llm.generate([{"prompt_token_ids": f} for f in forms] + [np.array(prompt)], params, use_tqdm=False)
    assert [o.error for o in outs] == [None] * len(outs)
    assert all(o.outputs[0].token_ids == outs[0].outputs[0].token_ids for o in outs)
    assert all(type(t) is int for o in outs for t in o.prompt_token_ids)


def test_token_ids_that_are_not_integers_are_named_as_such(setup):
    llm = setup["llm"]
    params = SamplingParams(temperature=0, max_tokens=2)
    out = llm.generate({"prompt_token_ids": [5, 2.0, 7]}, params, use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "error" and "not an integer" in out.error
    with pytest.raises(ValueError, match="1-D"):
        import numpy as np

        llm.generate({"prompt_token_ids": np.ones((2, 3), dtype=np.int64)}, params, use_tqdm=False)
