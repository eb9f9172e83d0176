"""Loads shared between requests (engine/kv_loads.py): N requests that arrive together and
share a long prefix held by a connector load each of its blocks once, into one device block
that all of them then share, for a third-party plugin and for the tiered connector alike;
their outputs equal a run without any connector."""
import pathlib
import random

import pytest
from hf_checkpoints import make_variant

from kvtier import LLM, SamplingParams

PLUGIN_DIR = pathlib.Path(__file__).parent / "plugins"
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
PREFIX = 200  # 12 whole blocks of 16 tokens, then 8 tokens into the 13th
N = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_variant(tmp_path_factory.mktemp("llama"), "llama")
    rng = random.Random(17)
    prefix = [rng.randrange(3, 500) for _ in range(PREFIX)]
    prompts = [{"prompt_token_ids": prefix + [rng.randrange(3, 500) for _ in range(30)]} for _ in range(N + 1)]
    with LLM(path) as llm:
        reference = _tokens(llm.generate(prompts[1:], PARAMS, use_tqdm=False))
    return dict(path=path, seed_prompt=prompts[:1], prompts=prompts[1:], reference=reference)


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def _run(model, **engine_args):
    """One request stores the prefix, the device forgets it, then N requests share it."""
    llm = LLM(model["path"], **engine_args)
    llm.generate(model["seed_prompt"], PARAMS, use_tqdm=False)
    if llm.engine.connector is not None and hasattr(llm.engine.connector, "flush"):
        assert llm.engine.connector.flush(timeout=10)
    assert llm.engine.kv.reset_prefix_cache()
    return llm, llm.generate(model["prompts"], PARAMS, use_tqdm=False)


def test_a_plugin_loads_each_shared_block_once(model, monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    llm, outs = _run(model, kv_connector="kvtier_faulty_plugin:CountingConnector")
    with llm:
        loads = llm.engine.connector.loads_per_key
        waits = llm.engine.scheduler.loads.num_shared_waits
        stats = llm.engine.kv.stats()
    assert _tokens(outs) == model["reference"]
    assert len(loads) == PREFIX // 16 and set(loads.values()) == {1}, loads
    assert waits >= N - 1
    assert stats["free_blocks"] == stats["blocks"]
    # One request loaded the prefix; the others found it on the device, loaded by it.
    by_source = sorted(o.kv_sources.get("CountingConnector", 0) for o in outs)
    assert by_source == [0] * (N - 1) + [PREFIX // 16 * 16]
    assert all(o.num_cached_tokens == PREFIX // 16 * 16 for o in outs)


def test_the_tiered_connector_loads_each_shared_block_once(model):
    llm, outs = _run(model, kv_tiers=["cpu:64MiB"], kv_connector_config={"load_or_recompute": False})
    with llm:
        stats = llm.kv_stats()
    assert _tokens(outs) == model["reference"]
    assert stats["cpu"]["hits"] == PREFIX // 16, "one read per distinct block"
    assert sum(o.kv_sources.get("cpu", 0) for o in outs) == PREFIX // 16 * 16


def test_a_hybrid_models_shared_prefix_loads_once_in_every_group(tmp_path, monkeypatch):
    """Attention blocks and SSM checkpoints alike: one load each, the rest shared."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    path = make_variant(tmp_path, "granite_hybrid")
    rng = random.Random(19)
    prefix = [rng.randrange(3, 500) for _ in range(PREFIX)]
    prompts = [{"prompt_token_ids": prefix + [rng.randrange(3, 500) for _ in range(30)]} for _ in range(N + 1)]
    args = dict(ssm_checkpoint_interval=16)  # a checkpoint at every block boundary
    with LLM(path, **args) as llm:
        reference = _tokens(llm.generate(prompts[1:], PARAMS, use_tqdm=False))
    model = dict(path=path, seed_prompt=prompts[:1], prompts=prompts[1:], reference=reference)
    llm, outs = _run(model, kv_connector="kvtier_faulty_plugin:CountingConnector", **args)
    with llm:
        loads = llm.engine.connector.loads_per_key
        stats = llm.engine.kv.stats()
    assert _tokens(outs) == reference
    assert len({k.group for k in loads}) > 1, "blocks of every kind of group were loaded"
    assert loads and set(loads.values()) == {1}, loads
    assert stats["free_blocks"] == stats["blocks"]
    assert sorted(o.num_cached_tokens for o in outs) == [PREFIX // 16 * 16] * N
