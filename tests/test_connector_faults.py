"""The engine contains a faulty connector (connectors/guard.py): a plugin that raises in any
method, over-offers in lookup or never reports a load costs recomputation only. Outputs
equal a run without a connector, every device block is free again afterwards (but those of
a timed-out load, until the connector reports it), the fault is counted, and a load that
never reports neither hangs nor spins the engine loop."""
import pathlib
import random
import time

import pytest
from hf_checkpoints import make_variant

from kvtier import LLM, SamplingParams
from kvtier.engine.config import EngineConfig

PLUGIN_DIR = pathlib.Path(__file__).parent / "plugins"
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
LENGTHS = [40, 100, 150, 200]
METHODS = ["lookup", "on_allocated", "request_blocks_saved", "build_metadata", "start_load", "save",
           "get_finished", "on_request_finished"]


def _model(tmp_path_factory, variant: str) -> dict:
    path = make_variant(tmp_path_factory.mktemp(variant), variant)
    rng = random.Random(13)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 500) for _ in range(n)]} for n in LENGTHS]
    with LLM(path) as llm:
        reference = _tokens(llm.generate(prompts, PARAMS, use_tqdm=False))
    return dict(path=path, prompts=prompts, reference=reference)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _model(tmp_path_factory, "llama")


@pytest.fixture(scope="module", params=["llama", "qwen3_sliding", "granite_hybrid"])
def any_model(request, tmp_path_factory):
    """Dense, sliding-window and SSM KV groups: a timed-out load's stand-in takes all of them."""
    return _model(tmp_path_factory, request.param)


@pytest.fixture(autouse=True)
def plugins(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def _two_runs(model, connector, config=None, timeout_s=0.3):
    """Store every prompt's blocks, drop the device cache, run again: the second run asks
    the connector for every prefix. Returns (second outputs, engine after both runs)."""
    llm = LLM(model["path"], kv_connector=connector, kv_connector_config=config, kv_load_timeout_s=timeout_s)
    first = llm.generate(model["prompts"], PARAMS, use_tqdm=False)
    assert _tokens(first) == model["reference"]
    assert llm.engine.kv.reset_prefix_cache(), "every block is free after the first run"
    return llm, llm.generate(model["prompts"], PARAMS, use_tqdm=False)


def _assert_no_block_held(llm, unsettled: int = 0):
    """Every device block is free, but those of `unsettled` timed-out loads the connector has
    not reported: it may still write into them, so they stay out of use."""
    kv, scheduler = llm.engine.kv, llm.engine.scheduler
    stand_ins = scheduler.loads.unsettled.values()
    assert len(stand_ins) == unsettled == llm.kv_stats()["connector_calls"]["unsettled_loads"]
    held = sum(sum(kv.num_held_blocks(s.request_id)) for s in stand_ins)
    assert (unsettled == 0) == (held == 0), "an unsettled load holds its blocks"
    stats = kv.stats()
    assert stats["free_blocks"] == stats["blocks"] - held, "a device block leaked"
    assert not scheduler.loading and not scheduler.held


@pytest.mark.parametrize("method", METHODS)
def test_a_plugin_raising_in_any_method_costs_only_recomputation(model, method):
    llm, outs = _two_runs(model, "kvtier_faulty_plugin:BrokenConnector", {"break": method})
    with llm:
        assert llm.engine.connector.raised > 0, "the fault was injected"
        assert _tokens(outs) == model["reference"]
        # A get_finished that always raises never reports the loads: they time out unsettled.
        _assert_no_block_held(llm, unsettled=len(LENGTHS) if method == "get_finished" else 0)
        faults = llm.kv_stats()["connector_calls"]["faults"]
        assert any(kind.startswith(f"connector.{method}") for kind in faults), faults
        if method in ("on_allocated", "build_metadata", "start_load", "get_finished"):
            assert llm.engine.scheduler.num_load_failures > 0, "the load failed and was recomputed"
            assert all(o.kv_sources.get("dict", 0) == 0 for o in outs)


def test_a_save_fault_is_logged_once_per_kind_not_per_block(model, caplog):
    with caplog.at_level("WARNING", logger="kvtier.connectors.guard"):
        llm, _ = _two_runs(model, "kvtier_faulty_plugin:BrokenConnector", {"break": "save"})
        with llm:
            count = llm.kv_stats()["connector_calls"]["faults"]["connector.save: RuntimeError"]
    assert count > 1
    assert len([r for r in caplog.records if "connector.save" in r.getMessage()]) == 1


def test_a_load_that_never_reports_times_out_without_spinning(model):
    start = time.monotonic()
    llm, outs = _two_runs(model, "kvtier_faulty_plugin:NeverReports", timeout_s=0.5)
    with llm:
        elapsed = time.monotonic() - start
        connector = llm.engine.connector
        assert connector.num_loaded_blocks > 0, "loads were started and left hanging"
        assert _tokens(outs) == model["reference"]
        _assert_no_block_held(llm, unsettled=len(LENGTHS))
        assert llm.kv_stats()["connector_calls"]["load_timeouts"] == len(LENGTHS)
        # An idle loop that spun would ask tens of thousands of times per second.
        assert connector.get_finished_calls < 400 * elapsed, (connector.get_finished_calls, elapsed)


def test_a_load_that_reports_after_its_timeout_writes_into_no_block_in_use(any_model):
    """The engine gave up on the load and recomputed; the connector's late writes land in
    blocks kept out of use until it reports, never in blocks a request computes into."""
    llm, _ = _two_runs(any_model, "kvtier_faulty_plugin:LateWriter", timeout_s=0.2)
    with llm:
        engine, connector = llm.engine, llm.engine.connector
        # The second run's loads timed out (and recomputed): their blocks are still held.
        assert llm.kv_stats()["connector_calls"]["unsettled_loads"] == len(LENGTHS)
        assert f"kvtier_kv_unsettled_loads {len(LENGTHS)}.0" in llm.metrics_text().splitlines()
        assert not engine.reset_prefix_cache()
        assert connector.write_late() == len(LENGTHS)
        engine.step()  # their late reports free their blocks
        assert llm.kv_stats()["connector_calls"]["unsettled_loads"] == 0
        _assert_no_block_held(llm)
        assert engine.reset_prefix_cache()

        req = engine.add_request(any_model["prompts"][-1], PARAMS)
        deadline = time.monotonic() + 30
        while len(req.output_token_ids) < 2 and time.monotonic() < deadline:  # timed out, recomputed, decoding
            engine.step()
            time.sleep(0.005)
        assert connector.write_late() == 1
        done = []
        while not done and time.monotonic() < deadline:
            done = engine.step()
        assert done[0].outputs[0].token_ids == any_model["reference"][-1]
        assert llm.kv_stats()["connector_calls"]["load_timeouts"] == len(LENGTHS) + 1
        _assert_no_block_held(llm)  # the late report came with the last steps


@pytest.mark.parametrize("offer", ["all", "ragged"])
def test_lookup_offers_are_cut_to_whole_blocks_before_the_last_token(model, offer, caplog):
    with caplog.at_level("DEBUG", logger="kvtier.connectors.guard"):
        llm, outs = _two_runs(model, "kvtier_faulty_plugin:Offering", {"offer": offer})
    with llm:
        assert _tokens(outs) == model["reference"]
        _assert_no_block_held(llm)
        assert llm.kv_stats()["connector_calls"]["clamped_lookups"] > 0
    assert any("offered" in r.getMessage() for r in caplog.records)
    for o, n in zip(outs, LENGTHS):
        offered = n if offer == "all" else n - n % 16 - 3
        assert o.kv_sources["dict"] == min(offered // 16 * 16, (n - 1) // 16 * 16), "whole usable blocks load"


def test_a_lookup_answer_that_is_not_a_token_count_is_a_miss(model):
    llm, outs = _two_runs(model, "kvtier_faulty_plugin:Offering", {"offer": "junk"})
    with llm:
        assert _tokens(outs) == model["reference"]
        _assert_no_block_held(llm)
        assert llm.kv_stats()["connector_calls"]["faults"]["connector.lookup: TypeError"] == len(LENGTHS)
    assert all(o.kv_sources.get("dict", 0) == 0 for o in outs)


@pytest.mark.parametrize("value", [0, -1, None, float("inf"), float("nan"), True, "30"])
def test_kv_load_timeout_s_is_validated(value):
    with pytest.raises(ValueError, match="kv_load_timeout_s"):
        EngineConfig(model="unused", kv_load_timeout_s=value)
