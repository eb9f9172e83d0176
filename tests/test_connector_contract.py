"""The connector contract as written in docs/connectors.md: the guide's example connector,
extracted from the markdown and installed under an entry point, runs end to end on dense and
hybrid models; the integrity helpers reject a corrupted byte; request ids are unique across
engines; a load that names no sources is credited to the connector's name."""
import pathlib
import random
import re

import pytest
import torch
from hf_checkpoints import make_variant

from kvtier import LLM, SamplingParams
from kvtier.connectors.integrity import CorruptBlock, seal_block, unseal_block, unseal_block_or_none
from kvtier.connectors.registry import get_connector_class
from kvtier.kvstore.keys import BlockKey

GUIDE = pathlib.Path(__file__).parent.parent / "docs" / "connectors.md"
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
LENGTHS = [40, 100, 150, 200]
ENTRY_POINT = "sealed-dict"


def _example_source() -> str:
    text = GUIDE.read_text()
    block = re.search(r"<!-- example-connector:start -->\n```python\n(.*?)```\n<!-- example-connector:end -->",
                      text, re.S)
    assert block is not None, "the guide must hold the example between its markers"
    return block.group(1)


@pytest.fixture
def example_plugin(tmp_path, monkeypatch):
    """The guide's example as an installed distribution with a `kvtier.connectors` entry point."""
    (tmp_path / "sealed_dict.py").write_text(_example_source())
    dist = tmp_path / "sealed_dict-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sealed-dict\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[kvtier.connectors]\n{ENTRY_POINT} = sealed_dict:SealedDictConnector\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return ENTRY_POINT


@pytest.fixture(scope="module", params=["llama", "granite_hybrid"])
def model(request, tmp_path_factory):
    path = make_variant(tmp_path_factory.mktemp(request.param), request.param)
    rng = random.Random(11)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 500) for _ in range(n)]} for n in LENGTHS]
    with LLM(path) as llm:
        reference = _tokens(llm.generate(prompts, PARAMS, use_tqdm=False))
        block_bytes = sum(p[0].numel() * p.element_size() for p in llm.engine.kv_pools)
    return dict(name=request.param, path=path, prompts=prompts, reference=reference, block_bytes=block_bytes)


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_the_guides_example_runs_end_to_end_through_its_entry_point(model, example_plugin):
    assert get_connector_class(example_plugin).__name__ == "SealedDictConnector"
    with LLM(model["path"], kv_connector=example_plugin) as llm:
        first = llm.generate(model["prompts"], PARAMS, use_tqdm=False)
        connector = llm.engine.connector
        assert connector.store, "saves reached the example's store"
        assert llm.engine.kv.reset_prefix_cache(), "no request holds blocks any more"
        second = llm.generate(model["prompts"], PARAMS, use_tqdm=False)
        free = llm.engine.kv.stats()
    assert _tokens(first) == model["reference"] and _tokens(second) == model["reference"]
    assert free["free_blocks"] == free["blocks"]
    loaded = sum(o.kv_sources.get(example_plugin, 0) for o in second)
    assert loaded > 0, "the second run's prefixes came from the example connector, under its name"
    for o, n in zip(second, LENGTHS):
        assert "device" not in o.kv_sources or o.kv_sources["device"] == 0
        assert sum(o.kv_sources.values()) == n


def test_under_multi_a_childs_loads_are_credited_to_the_child(model, example_plugin):
    config = {"connectors": [{"name": example_plugin}]}
    with LLM(model["path"], kv_connector="multi", kv_connector_config=config) as llm:
        llm.generate(model["prompts"], PARAMS, use_tqdm=False)
        assert llm.engine.kv.reset_prefix_cache()
        outs = llm.generate(model["prompts"], PARAMS, use_tqdm=False)
    assert _tokens(outs) == model["reference"]
    assert sum(o.kv_sources.get(example_plugin, 0) for o in outs) > 0
    assert all("multi" not in o.kv_sources for o in outs)


def test_the_guides_example_recomputes_a_corrupted_block(model, example_plugin):
    with LLM(model["path"], kv_connector=example_plugin) as llm:
        llm.generate(model["prompts"], PARAMS, use_tqdm=False)
        store = llm.engine.connector.store
        for key in list(store)[::3]:  # flip one byte in every third stored value
            value = bytearray(store[key])
            value[len(value) // 2] ^= 0x10
            store[key] = bytes(value)
        assert llm.engine.kv.reset_prefix_cache()
        outs = llm.generate(model["prompts"], PARAMS, use_tqdm=False)
        failures = llm.engine.scheduler.num_load_failures
    assert _tokens(outs) == model["reference"]
    assert failures > 0, "corrupted blocks were refused and recomputed"


def test_seal_and_unseal_a_block():
    key = BlockKey(b"n" * 8, bytes(range(32)), group=1)
    block = torch.randn(2, 2, 16, 4, 8)
    value = seal_block(key, block)
    out = torch.empty_like(block)
    assert unseal_block(value, key, into=out) is out and torch.equal(out, block)
    assert torch.equal(unseal_block(value, key), block)
    broken = bytearray(value)
    broken[-5] ^= 0x01  # one bit of the payload
    with pytest.raises(CorruptBlock, match="checksum"):
        unseal_block(bytes(broken), key)
    assert unseal_block_or_none(bytes(broken), key, into=out) is None
    assert unseal_block_or_none(None, key) is None
    with pytest.raises(CorruptBlock, match="another key"):
        unseal_block(value, BlockKey(b"n" * 8, bytes(range(32)), group=0))
    with pytest.raises(CorruptBlock):
        unseal_block(value[:-1], key)
    with pytest.raises(CorruptBlock, match="destination"):
        unseal_block(value, key, into=torch.empty(2, 2, 16, 4, 4))


def test_request_ids_are_unique_across_engines(tmp_path):
    path = make_variant(tmp_path, "llama")
    prompts = [{"prompt_token_ids": [5, 6, 7]}] * 2
    ids = []
    for _ in range(2):
        with LLM(path) as llm:
            ids += [o.request_id for o in llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)]
    assert len(set(ids)) == 4, ids
