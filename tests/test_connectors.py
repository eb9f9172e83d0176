"""The connector API end to end: the tiered connector with a CPU tier under a small device
pool, injected tier faults, MultiConnector, and third-party connectors by entry point and path."""
import logging
import pathlib
import random

import pytest
import torch
from hf_checkpoints import make_variant

from kvtier import LLM, SamplingParams
from kvtier.connectors.registry import get_connector_class
from kvtier.engine.model_config import load_model_config
from kvtier.kvstore.tiers.byte_store import ByteStoreTier, StoreUnavailable
from kvtier.kvstore.tiers.cpu_tier import CpuTier
from kvtier.kvstore.tiers.spec import BlockLayout

PLUGIN_DIR = pathlib.Path(__file__).parent / "plugins"
LENGTHS = [40, 100, 150, 200, 260]
PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_variant(tmp_path_factory.mktemp("llama"), "llama")
    cfg = load_model_config(path)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, cfg.vocab_size) for _ in range(n)] for n in LENGTHS]
    block_bytes = cfg.num_layers * 2 * 16 * cfg.num_kv_heads * cfg.head_dim * 4
    with LLM(path) as llm:
        reference = llm.generate(_prompts(prompts), PARAMS, use_tqdm=False)
    return dict(path=path, prompts=prompts, block_bytes=block_bytes, reference=reference)


def _prompts(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def _assert_same_as_reference(model, outs, tol=1e-5):
    for ref, out in zip(model["reference"], outs):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        for step, tok in enumerate(out.outputs[0].token_ids):
            ours = out.outputs[0].logprobs[step][tok].logprob
            assert abs(ours - ref.outputs[0].logprobs[step][tok].logprob) <= tol


def test_cpu_tier_serves_prefixes_evicted_from_a_small_device_pool(model):
    # 24 device blocks cannot hold the working set (~50 blocks): the second pass must come
    # back from the CPU tier, not from the device and not by recomputing.
    with LLM(model["path"], kv_cache_memory_bytes=24 * model["block_bytes"], kv_tiers=["cpu:64MiB"]) as llm:
        first = llm.generate(_prompts(model["prompts"]), PARAMS, use_tqdm=False)
        second = llm.generate(_prompts(model["prompts"]), PARAMS, use_tqdm=False)
        stats = llm.kv_stats()
    _assert_same_as_reference(model, first)
    _assert_same_as_reference(model, second)
    cpu_tokens = sum(o.kv_sources.get("cpu", 0) for o in second)
    assert cpu_tokens >= sum((n - 1) // 16 * 16 for n in LENGTHS) - 16 * 24
    for o, n in zip(second, LENGTHS):
        assert sum(o.kv_sources.values()) == n
        assert o.num_cached_tokens == o.kv_sources["device"] + o.kv_sources.get("cpu", 0)
    assert stats["cpu"]["hits"] * 16 == cpu_tokens
    assert stats["cpu"]["used_bytes"] <= 64 << 20 and stats["cpu"]["errors"] == 0


def test_preempted_requests_come_back_from_the_cpu_tier(model):
    # Six 64-token prompts growing by 48 tokens each in a 16-block pool: requests get
    # preempted and the survivors' growth evicts their cached blocks from the device.
    prompts = [p[:64] for p in model["prompts"]] + [model["prompts"][-1][64:128]]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=1)
    with LLM(model["path"]) as llm:
        reference = llm.generate(_prompts(prompts), params, use_tqdm=False)
    with LLM(model["path"], kv_cache_memory_bytes=16 * model["block_bytes"], kv_tiers=["cpu:64MiB"]) as llm:
        outs = llm.generate(_prompts(prompts), params, use_tqdm=False)
        stats = llm.kv_stats()
    assert stats["device"]["preemptions"] > 0
    assert stats["device"]["preempted_tokens"] >= stats["device"]["preemptions"]  # each threw work away
    assert stats["cpu"]["hits"] > 0, "preempted requests must come back from the CPU tier"
    _assert_same_as_reference(dict(model, reference=reference), outs)


class FlakyTier(ByteStoreTier):
    """An in-memory byte store that corrupts every `corrupt_every`-th value it returns and
    is unreachable for every `down_every`-th read call: the checksum and the fault contract
    must turn both into misses that the engine recomputes."""

    name = "flaky"

    def __init__(self, corrupt_every=3, down_every=4):
        super().__init__(1 << 30)
        self.values: dict[bytes, bytes] = {}
        self.corrupt_every, self.down_every = corrupt_every, down_every
        self.reads = self.calls = 0

    def _exists(self, keys):
        return [k in self.values for k in keys]

    def _read(self, keys):
        self.calls += 1
        if self.calls % self.down_every == 0:
            raise StoreUnavailable("injected outage")
        out = []
        for k in keys:
            v = self.values.get(k)
            self.reads += 1
            if v is not None and self.reads % self.corrupt_every == 0:
                v = bytearray(v)
                v[len(v) // 2] ^= 0x40
                v = bytes(v)
            out.append(v)
        return out

    def _write(self, keys, values):
        self.values.update(zip(keys, values))

    def _remove(self, keys):
        for k in keys:
            self.values.pop(k, None)


def test_failed_and_corrupt_loads_recompute_and_are_counted(model):
    tier = FlakyTier()
    with LLM(model["path"], kv_cache_memory_bytes=24 * model["block_bytes"], kv_connector="tiered",
             kv_connector_config={"tiers": [tier], "load_or_recompute": False}) as llm:
        llm.generate(_prompts(model["prompts"]), PARAMS, use_tqdm=False)
        llm.engine.connector.flush()
        outs = llm.generate(_prompts(model["prompts"]), PARAMS, use_tqdm=False)
        stats = llm.kv_stats()
    _assert_same_as_reference(model, outs)
    assert stats["flaky"]["errors"] > 0 and stats["flaky"]["hits"] > 0
    assert stats["device"]["load_failures"] > 0
    assert any(0 < o.kv_sources.get("flaky", 0) for o in outs)


def test_multi_connector_loads_from_the_child_that_has_the_prefix(model):
    config = {"connectors": [
        {"name": "tiered", "config": {"tiers": ["cpu:64MiB"]}},
        {"name": "kvtier_test_plugin:DictConnector"},
    ]}
    import sys
    sys.path.insert(0, str(PLUGIN_DIR))
    try:
        with LLM(model["path"], kv_cache_memory_bytes=24 * model["block_bytes"], kv_connector="multi",
                 kv_connector_config=config) as llm:
            llm.generate(_prompts(model["prompts"]), PARAMS, use_tqdm=False)
            tiered, plugin = llm.engine.connector.children
            assert len(plugin.store) > 0, "saves go to every child"
            outs = llm.generate(_prompts(model["prompts"]), PARAMS, use_tqdm=False)
        _assert_same_as_reference(model, outs)
        assert sum(o.kv_sources.get("cpu", 0) for o in outs) > 0
        assert plugin.num_loaded_blocks == 0, "ties go to the first child"
    finally:
        sys.path.remove(str(PLUGIN_DIR))


def _install_entry_point(tmp_path, name):
    dist = tmp_path / "kvtier_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kvtier-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[kvtier.connectors]\n{name} = kvtier_test_plugin:DictConnector\n")
    (tmp_path / "kvtier_test_plugin.py").write_text((PLUGIN_DIR / "kvtier_test_plugin.py").read_text())


@pytest.mark.parametrize("how", ["entry_point", "module_path"])
def test_third_party_connector(model, tmp_path, monkeypatch, how):
    if how == "entry_point":
        _install_entry_point(tmp_path, "dict-store")
        monkeypatch.syspath_prepend(str(tmp_path))
        name = "dict-store"
    else:
        monkeypatch.syspath_prepend(str(PLUGIN_DIR))
        name = "kvtier_test_plugin:DictConnector"
    assert get_connector_class(name).__name__ == "DictConnector"
    with LLM(model["path"], kv_cache_memory_bytes=24 * model["block_bytes"], kv_connector=name) as llm:
        llm.generate(_prompts(model["prompts"]), PARAMS, use_tqdm=False)
        outs = llm.generate(_prompts(model["prompts"]), PARAMS, use_tqdm=False)
        assert llm.engine.connector.num_loaded_blocks > 0
    _assert_same_as_reference(model, outs)
    assert sum(o.kv_sources.get("dict", 0) for o in outs) > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(kv_tiers=["cpu:lots"]), "cpu:lots"),
    (dict(kv_tiers=["tape:1GiB"]), "unknown tier"),
    (dict(kv_tiers="cpu:1GiB"), "kv_tiers"),
    (dict(kv_connector="no-such-connector"), "unknown 'no-such-connector'"),
    (dict(kv_connector="os:path"), "not a KVConnector"),
    (dict(kv_tiers=["cpu:1GiB"], enable_prefix_caching=False), "enable_prefix_caching"),
    (dict(kv_connector="tiered", kv_connector_config={"tiers": ["cpu:1GiB"], "write_policy": "sometimes"}),
     "write_policy"),
    (dict(kv_tiers=["cpu:1GiB"], kv_connector_config={"lookup_budget_s": -1}), "lookup_budget_s"),
    (dict(kv_tiers=["cpu:1GiB"], kv_connector_config={"lookup_budget_s": "soon"}), "lookup_budget_s"),
    (dict(kv_tiers=["cpu:1GiB"], kv_connector_config={"lookup_wait_s": 0.5}), "lookup_wait_s"),
])
def test_bad_connector_config_fails_fast(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(model["path"], **kwargs)


def test_plan_prefix_load_matches_brute_force():
    from kvtier.connectors.tiered import plan_prefix_load

    rng = random.Random(0)
    for _ in range(300):
        costs = [rng.choice([0.1, 0.5, 1.0, 2.0, 5.0]) for _ in range(rng.randint(0, 7))]
        recompute = rng.choice([0.3, 1.0, 3.0])
        total = [sum(costs[:n]) + recompute * (len(costs) - n) for n in range(len(costs) + 1)]
        best = plan_prefix_load(costs, recompute)
        assert total[best] == pytest.approx(min(total))
    assert plan_prefix_load([], 1.0) == 0


class _SlowCpuTier(CpuTier):
    """A real CPU tier whose measured read bandwidth is far below the recompute speed."""

    def read_bandwidth(self) -> float:
        return 1.0  # bytes/s: loading any block would take days


def test_planner_recomputes_instead_of_loading_from_a_slow_tier(model):
    cfg = load_model_config(model["path"])
    layout = BlockLayout((cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim), torch.float32,
                         torch.device("cpu"))
    tier = _SlowCpuTier(64 << 20, layout)
    with LLM(model["path"], kv_cache_memory_bytes=24 * model["block_bytes"], kv_connector="tiered",
             kv_connector_config={"tiers": [tier]}) as llm:
        llm.generate(_prompts(model["prompts"]), PARAMS, use_tqdm=False)
        assert llm.kv_stats()["cpu"]["puts"] > 0
        outs = llm.generate(_prompts(model["prompts"]), PARAMS, use_tqdm=False)
        assert llm.kv_stats()["cpu"]["hits"] == 0, "a tier slower than recompute must not be read"
    _assert_same_as_reference(model, outs)
    assert all(o.kv_sources.get("cpu", 0) == 0 for o in outs)


class CountingCpuTier(CpuTier):
    """A CPU tier that counts the presence probes the hierarchy sends it."""

    probes = 0

    def contains(self, keys):
        self.probes += 1
        return super().contains(keys)


@pytest.mark.parametrize("reuse_s", [0.0, 60.0])
def test_a_waiting_requests_tier_lookup_is_reused_while_it_waits(model, monkeypatch, reuse_s):
    """Under a device pool too small for all requests, the head waiting request is looked up
    every step until it fits. With reuse, the tiers hear about each request about once;
    without, once per step. Outputs are the same either way."""
    import kvtier.connectors.tiered as tiered

    monkeypatch.setattr(tiered, "LOOKUP_REUSE_S", reuse_s)
    cfg = load_model_config(model["path"])
    layout = BlockLayout((cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim), torch.float32, torch.device("cpu"))
    tier = CountingCpuTier(64 << 20, layout)
    with LLM(model["path"], kv_cache_memory_bytes=24 * model["block_bytes"], kv_connector="tiered",
             kv_connector_config={"tiers": [tier]}) as llm:
        llm.generate(_prompts(model["prompts"]), PARAMS, use_tqdm=False)
        llm.engine.connector.flush()
        schedule, steps = llm.engine.scheduler.schedule, []
        monkeypatch.setattr(llm.engine.scheduler, "schedule", lambda: steps.append(1) or schedule())
        tier.probes = 0
        outs = llm.generate(_prompts(model["prompts"]), PARAMS, use_tqdm=False)
    _assert_same_as_reference(model, outs)
    assert sum(o.kv_sources.get("cpu", 0) for o in outs) > 0
    if reuse_s:
        assert tier.probes <= 2 * len(LENGTHS) < len(steps)
    else:
        assert tier.probes > 2 * len(LENGTHS)


def test_a_lookup_answered_later_holds_up_only_its_own_request(model, monkeypatch):
    """The lookup contract: None means "ask again next step". The scheduler passes over that
    request (it keeps its place) and admits the ones behind it meanwhile."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    with LLM(model["path"], kv_cache_memory_bytes=24 * model["block_bytes"],
             kv_connector="kvtier_test_plugin:SlowLookupConnector",
             kv_connector_config={"slow": ["0"], "defer": 3}) as llm:
        outs = llm.generate(_prompts(model["prompts"]), PARAMS, use_tqdm=False)
        answers = llm.engine.connector.answers
    _assert_same_as_reference(model, outs)
    first_known = {}
    for i, (rid, answer) in enumerate(answers):
        if answer is not None:
            first_known.setdefault(rid, i)
    assert [a for rid, a in answers if rid == "0"][:3] == [None] * 3
    assert first_known["1"] < first_known["0"], "the request behind the slow one must not wait for it"


def test_a_crashed_load_is_logged_counted_and_recomputed(model, monkeypatch, caplog):
    with LLM(model["path"], kv_cache_memory_bytes=24 * model["block_bytes"], kv_tiers=["cpu:64MiB"]) as llm:
        llm.generate(_prompts(model["prompts"]), PARAMS, use_tqdm=False)
        connector = llm.engine.connector

        def crash(*args, **kwargs):
            raise RuntimeError("injected load crash")

        monkeypatch.setattr(connector.hierarchy, "load", crash)
        with caplog.at_level(logging.WARNING):
            outs = llm.generate(_prompts(model["prompts"]), PARAMS, use_tqdm=False)
        stats = llm.kv_stats()
    _assert_same_as_reference(model, outs)
    crashed = stats["connector"]["crashed_loads"]
    assert crashed > 0 and stats["connector"]["faults"] == {"load: RuntimeError": crashed}
    assert stats["device"]["load_failures"] > 0, "the blocks of a crashed load are load failures"
    logged = [r for r in caplog.records if "injected load crash" in r.getMessage()]
    assert len(logged) == 1, "logged once, then rate-limited"


def test_a_load_from_a_fast_tier_runs_in_the_step_that_started_it(model, monkeypatch):
    from kvtier.engine import engine_core

    # The mechanism, not the timing: a generous wait so a busy machine cannot make it flaky.
    monkeypatch.setattr(engine_core, "JOIN_WAIT_S", 1.0)
    prompt = _prompts(model["prompts"][-1:])
    with LLM(model["path"], kv_tiers=["cpu:64MiB"]) as llm:
        llm.generate(prompt, PARAMS, use_tqdm=False)
        assert llm.engine.kv.reset_prefix_cache()  # only the CPU tier holds the prefix now
        req = llm.engine.add_request(prompt[0], PARAMS)
        llm.engine.step()
        assert req.kv_sources.get("cpu", 0) > 0
        assert len(req.output_token_ids) == 1, "the loaded request computed its first token in the same step"
