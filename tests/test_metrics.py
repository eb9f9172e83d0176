"""Engine metrics: a real engine on a tiny random model with a CPU tier, scraped through
`LLM.metrics_text()`, its HTTP port, and `kvtier serve`'s GET /metrics, parsed with
prometheus_client's parser and compared with kv_stats() and the requests' outputs."""
import contextlib
import random

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from kvtier import LLM, SamplingParams
from kvtier.engine.config import EngineConfig
from kvtier.engine.engine_core import Engine
from kvtier.engine.make_model import make_model
from kvtier.engine.model_config import load_model_config
from kvtier.engine.serving.async_engine import AsyncEngine
from kvtier.engine.serving.chat_template import DEFAULT_TEMPLATE, ChatTemplate
from kvtier.engine.serving.openai_server import create_app

PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
BLOCKS = 8  # a device pool too small for two 100-token prompts: the second evicts the first


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("metrics") / "model"), "llama", "tiny")


def parse(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value}; every family must carry HELP text."""
    out = {}
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("kvtier_") and family.documentation, family.name
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(m, name, **labels) -> float:
    return m[(name, tuple(sorted(labels.items())))]


def prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, 200) for _ in range(100)]} for _ in range(n)]


def block_bytes(path: str) -> int:
    cfg = load_model_config(path)
    return cfg.num_layers * 2 * 16 * cfg.num_kv_heads * cfg.head_dim * 4  # float32, block_size 16


def test_two_turns_with_a_cpu_tier(model_dir):
    first, other = prompts(1, 1), prompts(1, 2)
    size = block_bytes(model_dir)
    with LLM(model_dir, kv_tiers=["cpu:64MiB"], kv_cache_memory_bytes=BLOCKS * size) as llm:
        outs = llm.generate(first, PARAMS, use_tqdm=False)
        # one request alone: one prefill step, then one decode step per further token
        assert get(parse(llm.metrics_text()), "kvtier_engine_steps_total") == PARAMS.max_tokens
        outs += llm.generate(other, PARAMS, use_tqdm=False)  # evicts the first prompt's blocks
        outs += llm.generate(first, PARAMS, use_tqdm=False)  # its prefix comes back from the cpu tier
        assert outs[-1].kv_sources.get("cpu", 0) > 0
        stats = llm.kv_stats()
        m = parse(llm.metrics_text())

    assert get(m, "kvtier_engine_step_seconds_total") > 0
    cpu = stats["cpu"]
    assert get(m, "kvtier_tier_hits_total", tier="cpu") == cpu["hits"] > 0
    assert get(m, "kvtier_tier_read_bytes_total", tier="cpu") == cpu["bytes_read"] > 0
    assert get(m, "kvtier_tier_written_bytes_total", tier="cpu") == cpu["bytes_written"] > 0
    assert get(m, "kvtier_tier_used_bytes", tier="cpu") == cpu["used_bytes"]
    assert get(m, "kvtier_tier_capacity_bytes", tier="cpu") == 64 << 20
    assert get(m, "kvtier_tier_read_latency_seconds_count", tier="cpu") == sum(cpu["read_latency_buckets"]) > 0

    # once per finished request
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "time_per_output_token_seconds"):
        assert get(m, f"kvtier_{name}_count") == len(outs)
    assert get(m, "kvtier_time_to_first_token_seconds_sum") == pytest.approx(sum(o.metrics.ttft for o in outs))
    assert get(m, "kvtier_requests_finished_total", reason="length") == len(outs)

    # prompt tokens by source add up to the outputs' kv_sources; the ratios to 1
    for source in ("device", "cpu", "computed"):
        assert get(m, "kvtier_prompt_tokens_by_source_total", source=source) == sum(
            o.kv_sources.get(source, 0) for o in outs)
    ratios = [get(m, "kvtier_prefix_hit_ratio", source=s) for s in ("device", "cpu", "computed")]
    assert sum(ratios) == pytest.approx(1.0) and ratios[1] > 0

    # the device pool, idle now
    device = stats["device"]
    assert get(m, "kvtier_kv_blocks") == device["blocks"] == BLOCKS
    assert get(m, "kvtier_kv_capacity_bytes") == BLOCKS * size
    assert get(m, "kvtier_kv_used_blocks") == 0 and get(m, "kvtier_kv_free_blocks") == BLOCKS
    assert get(m, "kvtier_kv_evictions_total") == device["evictions"] > 0
    assert get(m, "kvtier_preemptions_total") == device["preemptions"]
    assert get(m, "kvtier_recomputed_tokens_total", reason="load_failure") == 0
    for queue in ("running", "waiting", "loading", "parked", "engine"):
        assert get(m, f"kvtier_{queue}_requests") == 0


def test_metrics_port_serves_the_same_registry(model_dir):
    with LLM(model_dir, metrics_port=0) as llm:
        port = llm.engine.metrics.port
        assert port
        llm.generate(prompts(3, 5), PARAMS, use_tqdm=False)
        m = parse(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
        assert get(m, "kvtier_time_to_first_token_seconds_count") == 3
        assert not any(name.startswith("kvtier_tier_") and labels for name, labels in m)  # no tiers
    with pytest.raises(httpx.TransportError):  # close() stops the HTTP server
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


@pytest.mark.parametrize("bad", [-1, 70000, "9090", True, 1.5])
def test_metrics_port_is_validated(model_dir, bad):
    with pytest.raises(ValueError, match="metrics_port"):
        EngineConfig(model=model_dir, metrics_port=bad)


def test_serve_metrics_has_engine_and_server_metrics(model_dir):
    engine = AsyncEngine(Engine(EngineConfig(model=model_dir, kv_tiers=["cpu:16MiB"])))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        await engine.shutdown(1.0)

    app = create_app(engine, "tiny", ChatTemplate(DEFAULT_TEMPLATE), api_key="k", lifespan=lifespan)
    with TestClient(app) as client:
        for _ in range(2):
            r = client.post("/v1/completions", headers={"Authorization": "Bearer k"},
                            json={"model": "tiny", "prompt": "hello metrics " * 10, "max_tokens": 3})
            assert r.status_code == 200, r.text
        r = client.get("/metrics")  # open, like /health
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        m = parse(r.text)
    assert get(m, "kvtier_time_to_first_token_seconds_count") == 2
    assert get(m, "kvtier_requests_finished_total", reason="length") == 2
    assert get(m, "kvtier_prompt_tokens_by_source_total", source="device") > 0  # the repeated prompt
    assert get(m, "kvtier_requests_in_flight") == 0 and get(m, "kvtier_requests_aborted_total") == 0
    assert get(m, "kvtier_tier_capacity_bytes", tier="cpu") == 16 << 20


def test_queues_and_pool_usage_while_requests_run(model_dir):
    with LLM(model_dir, max_num_seqs=1) as llm:
        engine = llm.engine
        for p in prompts(2, 9):
            engine.add_request(p, PARAMS)
        engine.step()  # the first request is prefilled and holds its blocks; the second waits
        m = parse(llm.metrics_text())
        size = block_bytes(model_dir)
        used = get(m, "kvtier_kv_used_blocks")
        assert used == 7  # 100 prompt tokens + 1 sampled token in 16-token blocks
        assert get(m, "kvtier_kv_used_bytes") == used * size
        assert get(m, "kvtier_kv_usage_ratio") == pytest.approx(used * size / get(m, "kvtier_kv_capacity_bytes"))
        assert (get(m, "kvtier_running_requests"), get(m, "kvtier_waiting_requests")) == (1, 1)
        assert get(m, "kvtier_engine_requests") == 2
        while engine.has_unfinished():
            engine.step()
        assert get(parse(llm.metrics_text()), "kvtier_kv_used_blocks") == 0
