"""Hybrid models through every tier and the connector API: a fresh engine resumes from
Redis and kv-servers with the cold tokens; corrupt or missing SSM checkpoints and sliding
blocks fall back to recompute (never wrong tokens); the multi connector and a third-party
plugin serve every KV group."""
import pathlib
import random

import pytest
from grpc_server import KVServerProcess
from hf_checkpoints import make_variant

from kvtier import LLM, SamplingParams

PLUGIN_DIR = pathlib.Path(__file__).parent / "plugins"
LENGTHS = [40, 70, 100, 130]
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module", params=["granite_hybrid", "mistral_sliding"])
def model(request, tmp_path_factory):
    path = make_variant(tmp_path_factory.mktemp(request.param), request.param)
    rng = random.Random(5)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 500) for _ in range(n)]} for n in LENGTHS]
    with LLM(path) as llm:
        reference = _tokens(llm.generate(prompts, PARAMS, use_tqdm=False))
        kinds = [g.kind for g in llm.engine.groups]
    return dict(name=request.param, path=path, prompts=prompts, reference=reference, kinds=kinds)


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def _fill(model, tier):
    """Run the prompts once so every group's blocks and checkpoints reach the tier."""
    with LLM(model["path"], kv_tiers=[tier]) as llm:
        assert _tokens(llm.generate(model["prompts"], PARAMS, use_tqdm=False)) == model["reference"]
        assert llm.engine.connector.flush(timeout=30)


def _fresh_run(model, tier):
    with LLM(model["path"], kv_tiers=[tier], kv_connector_config={"load_or_recompute": False}) as llm:
        outs = llm.generate(model["prompts"], PARAMS, use_tqdm=False)
        return outs, llm.kv_stats(), llm.engine.scheduler.num_load_failures


@pytest.mark.parametrize("store", ["redis", "grpc"])
def test_a_fresh_engine_resumes_every_group_from_a_remote_store(model, store, redis_server):
    server = KVServerProcess("--capacity", "64MiB") if store == "grpc" else None
    try:
        tier = redis_server.url if server is None else f"grpc://{server.address}"
        _fill(model, tier)
        outs, stats, _ = _fresh_run(model, tier)
    finally:
        if server is not None:
            server.terminate()
    assert _tokens(outs) == model["reference"]
    assert sum(o.kv_sources.get(store, 0) for o in outs) > 0
    assert stats[store]["errors"] == 0


def _group_of_kind(model, kind):
    return model["kinds"].index(kind)


@pytest.mark.parametrize("damage", ["corrupt", "delete"])
def test_damaged_checkpoints_and_window_blocks_fall_back_to_recompute(model, damage, redis_server):
    kind = "ssm" if "ssm" in model["kinds"] else "sliding"
    group = _group_of_kind(model, kind)
    _fill(model, redis_server.url)
    client = redis_server.client()
    keys = [k for k in client.scan_iter(match=b"kvtier:*") if k.endswith(b"%02x" % group)]
    assert keys, f"the {kind} group reached the store"
    for k in keys:
        if damage == "delete":
            client.delete(k)
        else:  # flip one payload byte, as bit rot would: the checksum must catch it
            value = bytearray(client.get(k))
            value[-3] ^= 0x40
            client.set(k, bytes(value))
    outs, stats, failures = _fresh_run(model, redis_server.url)
    assert _tokens(outs) == model["reference"]
    assert all(o.error is None for o in outs)
    if damage == "corrupt":
        assert stats["redis"]["errors"] > 0 and failures > 0


def test_multi_connector_and_a_plugin_serve_every_group(model, monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    config = {"connectors": [{"name": "kvtier_test_plugin:DictConnector"},
                             {"name": "tiered", "config": {"tiers": ["cpu:64MiB"]}}]}
    with LLM(model["path"], kv_connector="multi", kv_connector_config=config) as llm:
        llm.generate(model["prompts"], PARAMS, use_tqdm=False)
        plugin, _ = llm.engine.connector.children
        assert {g for g, _ in plugin.store} == set(range(len(model["kinds"]))), "every group was saved"
        assert llm.engine.kv.reset_prefix_cache()
        outs = llm.generate(model["prompts"], PARAMS, use_tqdm=False)
    assert _tokens(outs) == model["reference"]
    assert plugin.num_loaded_blocks > 0 and sum(o.kv_sources.get("dict", 0) for o in outs) > 0
