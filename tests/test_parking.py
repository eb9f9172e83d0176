"""Tool-call parking end to end: a resumed turn gives exactly the tokens and logprobs of one
uninterrupted request over the same sequence, with kv_sources proving where the parked KV
came from under each policy; TTL, release, implicit resume, errors, memory pressure."""
import random
import time

import pytest
from hf_checkpoints import make_variant

from kvtier import LLM, ParkParams, SamplingParams
from kvtier.engine.model_config import load_model_config

GREEDY = dict(temperature=0, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_variant(tmp_path_factory.mktemp("llama"), "llama")
    cfg = load_model_config(path)
    rng = random.Random(4)
    prompt = [rng.randrange(3, cfg.vocab_size) for _ in range(90)]
    tool = [rng.randrange(3, cfg.vocab_size) for _ in range(23)]
    filler = [[rng.randrange(3, cfg.vocab_size) for _ in range(150)] for _ in range(2)]
    block_bytes = cfg.num_layers * 2 * 16 * cfg.num_kv_heads * cfg.head_dim * 4
    return dict(path=path, prompt=prompt, tool=tool, filler=filler, block_bytes=block_bytes)


def _ids(tokens):
    return {"prompt_token_ids": list(tokens)}


def _reference(model, tokens, max_tokens):
    """One uninterrupted request over the whole sequence, in a fresh engine."""
    with LLM(model["path"]) as llm:
        return llm.generate(_ids(tokens), SamplingParams(max_tokens=max_tokens, **GREEDY), use_tqdm=False)[0]


def _same(out, ref):
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    for step, tok in enumerate(out.outputs[0].token_ids):
        assert abs(out.outputs[0].logprobs[step][tok].logprob - ref.outputs[0].logprobs[step][tok].logprob) <= 1e-5


@pytest.mark.parametrize("policy", ["keep", "offload", "discard", "auto"])
def test_a_resumed_turn_equals_one_uninterrupted_request(model, policy):
    tiers = ["cpu:64MiB"] if policy in ("offload", "auto") else None
    # A long expected pause: no prefetch brings offloaded blocks back during the test.
    park = ParkParams(expected_pause_s=60)
    with LLM(model["path"], park_policy=policy, kv_tiers=tiers, kv_cache_memory_bytes=24 * model["block_bytes"]) as llm:
        first = llm.generate(_ids(model["prompt"]), SamplingParams(max_tokens=5, park=park, **GREEDY),
                             use_tqdm=False)[0]
        assert first.parked_id and first.outputs[0].finish_reason == "length"
        for f in model["filler"]:  # other traffic while the tool runs
            llm.generate(_ids(f), SamplingParams(max_tokens=2, **GREEDY), use_tqdm=False)
        if policy in ("offload", "discard"):  # nothing pins them: the device copies may go
            assert llm.engine.kv.reset_prefix_cache()
        resumed = llm.resume(first.parked_id, _ids(model["tool"]), SamplingParams(max_tokens=6, **GREEDY))
        stats = llm.kv_stats()["parking"]
    sequence = model["prompt"] + first.outputs[0].token_ids + model["tool"]
    _same(resumed, _reference(model, sequence, 6))
    context = len(model["prompt"]) + 5
    src = resumed.kv_sources
    if policy == "keep":
        assert src["device"] == resumed.num_cached_tokens == context - 1  # only the tool result (+1) ran
        assert stats["resumes"]["device"] == 1
    elif policy == "auto":  # kept while the pool is idle, maybe demoted under the filler traffic
        assert src["device"] + src.get("cpu", 0) >= context - 16
    elif policy == "offload":
        assert src.get("cpu", 0) >= context - 16 and stats["resumes"]["tier"] == 1
    else:
        assert src["computed"] == len(sequence) and stats["resumes"]["recomputed"] == 1
    # auto keeps at first: the pool is idle when the request parks, keeping costs nothing.
    assert stats["parked"] == 0 and stats["decisions"][policy if policy != "auto" else "keep"] == 1


def test_park_at_a_stop_token_then_resume_twice(model):
    with LLM(model["path"], park_policy="keep") as llm:
        probe = llm.generate(_ids(model["prompt"]), SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)[0]
        stop = probe.outputs[0].token_ids[2]  # the model's third token plays "</tool_call>"
        params = SamplingParams(max_tokens=50, stop_token_ids=[stop], park=ParkParams(tool="search"), **GREEDY)
        first = llm.generate(_ids(model["prompt"]), params, use_tqdm=False)[0]
        assert first.outputs[0].finish_reason == "stop" and first.outputs[0].stop_reason == stop
        second = llm.resume(first.parked_id, _ids(model["tool"][:9]), params)  # parks again
        assert second.parked_id and second.parked_id != first.parked_id
        third = llm.resume(second.parked_id, _ids(model["tool"][9:]), SamplingParams(max_tokens=4, **GREEDY))
        assert third.parked_id is None
        assert llm.kv_stats()["parking"]["tools"]["search"]["pauses"] == 2
    sequence = (model["prompt"] + first.outputs[0].token_ids + model["tool"][:9] + second.outputs[0].token_ids
                + model["tool"][9:])
    _same(third, _reference(model, sequence, 4))
    assert third.num_cached_tokens == len(sequence) - len(model["tool"][9:]) - 1


def test_implicit_resume_by_a_longer_conversation(model):
    with LLM(model["path"], park_policy="keep") as llm:
        first = llm.generate(_ids(model["prompt"]), SamplingParams(max_tokens=5, park=ParkParams(), **GREEDY),
                             use_tqdm=False)[0]
        sequence = model["prompt"] + first.outputs[0].token_ids + model["tool"]
        again = llm.generate(_ids(sequence), SamplingParams(max_tokens=6, **GREEDY), use_tqdm=False)[0]
        assert again.num_cached_tokens == len(sequence) - len(model["tool"]) - 1
        assert llm.kv_stats()["parking"]["resumes"]["device"] == 1
        with pytest.raises(KeyError, match="resumed"):
            llm.resume(first.parked_id, _ids([5]))
    _same(again, _reference(model, sequence, 6))


def test_ttl_release_and_unknown_ids(model):
    with LLM(model["path"], park_policy="keep") as llm:
        pool = llm.engine.kv.managers[0].pool
        short = SamplingParams(max_tokens=3, park=ParkParams(ttl_s=0.05), **GREEDY)
        expired = llm.generate(_ids(model["prompt"]), short, use_tqdm=False)[0]
        assert pool.num_free_blocks < pool.num_blocks  # pinned
        time.sleep(0.1)
        llm.engine.step()  # the TTL is checked as the engine steps
        assert pool.num_free_blocks == pool.num_blocks, "an expired park is demoted: nothing stays pinned"
        with pytest.raises(KeyError, match="expired"):
            llm.resume(expired.parked_id, _ids([5]))
        kept = llm.generate(_ids(model["filler"][0]), SamplingParams(max_tokens=3, park=ParkParams(), **GREEDY),
                            use_tqdm=False)[0]
        llm.release(kept.parked_id)
        assert pool.num_free_blocks == pool.num_blocks
        with pytest.raises(KeyError, match="released"):
            llm.resume(kept.parked_id, _ids([5]))
        with pytest.raises(KeyError, match="unknown"):
            llm.resume("no-such-id", _ids([5]))
        stats = llm.kv_stats()["parking"]
    assert stats["ttl_expiries"] == 1 and stats["released"] == 1 and stats["parked"] == 0


def test_parked_requests_are_demoted_before_anyone_is_preempted(model):
    # 30 blocks; 4 parked conversations of 7 blocks each pin nearly all of them.
    with LLM(model["path"], park_policy="keep", max_parked_fraction=1.0,
             kv_cache_memory_bytes=30 * model["block_bytes"]) as llm:
        rng = random.Random(9)
        convs = [[rng.randrange(3, 500) for _ in range(95)] for _ in range(4)]
        firsts = llm.generate([_ids(c) for c in convs], SamplingParams(max_tokens=4, park=ParkParams(), **GREEDY),
                              use_tqdm=False)
        assert all(f.parked_id for f in firsts)
        assert llm.kv_stats()["device"]["preemptions"] == 0
        outs = llm.generate([_ids(f) for f in model["filler"]], SamplingParams(max_tokens=8, **GREEDY),
                            use_tqdm=False)
        stats = llm.kv_stats()
        assert stats["parking"]["demoted"] > 0 and stats["device"]["preemptions"] == 0
        for f, out in zip(model["filler"], outs):
            _same(out, _reference(model, f, 8))
        for c, f in zip(convs, firsts):  # demoted ones resume from what is left: still exact
            r = llm.resume(f.parked_id, _ids(model["tool"]), SamplingParams(max_tokens=3, **GREEDY))
            _same(r, _reference(model, c + f.outputs[0].token_ids + model["tool"], 3))


@pytest.mark.parametrize("variant", ["granite_hybrid", "mistral_sliding"])
@pytest.mark.parametrize("policy", ["keep", "offload"])
def test_hybrid_models_park(tmp_path, variant, policy):
    path = make_variant(tmp_path, variant)
    rng = random.Random(6)
    prompt, tool = [rng.randrange(3, 500) for _ in range(70)], [rng.randrange(3, 500) for _ in range(20)]
    with LLM(path, park_policy=policy, kv_tiers=["cpu:64MiB"]) as llm:
        first = llm.generate(_ids(prompt), SamplingParams(max_tokens=5, park=ParkParams(), **GREEDY),
                             use_tqdm=False)[0]
        if policy == "offload":
            assert llm.engine.kv.reset_prefix_cache()  # the device copies are gone: the tier serves
        resumed = llm.resume(first.parked_id, _ids(tool), SamplingParams(max_tokens=5, **GREEDY))
    with LLM(path) as fresh:
        ref = fresh.generate(_ids(prompt + first.outputs[0].token_ids + tool), SamplingParams(max_tokens=5, **GREEDY),
                             use_tqdm=False)[0]
    assert resumed.outputs[0].token_ids == ref.outputs[0].token_ids
    if policy == "keep":
        assert resumed.num_cached_tokens == 74
    else:
        assert resumed.kv_sources.get("cpu", 0) >= 64


def test_an_offloaded_request_is_prefetched_before_its_expected_resume(model, monkeypatch):
    from kvtier.engine.parking import parking_lot

    monkeypatch.setattr(parking_lot, "PREFETCH_MIN_S", 0.0)  # a host-memory tier is too fast to bother
    with LLM(model["path"], park_policy="offload", kv_tiers=["cpu:64MiB"]) as llm:
        first = llm.generate(_ids(model["prompt"]),
                             SamplingParams(max_tokens=5, park=ParkParams(expected_pause_s=0.0), **GREEDY),
                             use_tqdm=False)[0]
        assert llm.engine.connector.flush(timeout=10)
        assert llm.engine.kv.reset_prefix_cache()  # the device copies are gone
        time.sleep(0.06)
        for _ in range(5):  # the lot notices the resume is due and loads the KV back meanwhile
            llm.engine.step()
        resumed = llm.resume(first.parked_id, _ids(model["tool"]), SamplingParams(max_tokens=3, **GREEDY))
    assert resumed.kv_sources["device"] >= len(model["prompt"]) + 5 - 16
    assert resumed.kv_sources.get("cpu", 0) == 0
