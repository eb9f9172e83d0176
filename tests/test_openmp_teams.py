"""One OpenMP team per process: torch gives each thread that runs a parallel op a team of
its own, and a second team makes libgomp shorten every team's barrier spin, which slowed
each forward pass (async_engine.py, kvstore/host_copy.py). The server's engine is built on
its loop thread; tier loads copy blocks without torch's parallel copy."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from kvtier.engine.config import EngineConfig
from kvtier.engine.engine_core import Engine
from kvtier.engine.make_model import make_model
from kvtier.engine.serving.async_engine import AsyncEngine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("loop-thread") / "model"), "llama", "tiny")


# Runs in a fresh process: the thread count after building an engine (on the main thread or
# by the loop thread) and generating through AsyncEngine, torch at 2 threads.
_CHILD = """
import asyncio, os, sys
import torch
torch.set_num_threads(2)
from kvtier import SamplingParams
from kvtier.engine.config import EngineConfig
from kvtier.engine.engine_core import Engine
from kvtier.engine.serving.async_engine import AsyncEngine

config = EngineConfig(model=sys.argv[1], kv_tiers=[])
build = (lambda: Engine(config)) if sys.argv[2] == "factory" else Engine(config)

async def main():
    engine = AsyncEngine(build, gather_window=0)
    engine.start()
    async for _ in engine.generate("one team of threads " * 16, SamplingParams(max_tokens=4), "r"):
        pass
    threads = len(os.listdir("/proc/self/task"))
    await engine.shutdown(1.0)
    return threads

print(asyncio.run(main()))
"""


# Runs in a fresh process: native threads (all threads but Python's own: OpenMP workers
# above all) after a first generate, then after a second one served from the CPU tier.
_LOADS_CHILD = """
import os, sys, threading
import torch
torch.set_num_threads(2)
from kvtier import LLM, SamplingParams

llm = LLM(sys.argv[1], kv_tiers=["cpu:64MiB"])
params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
prompts = [{"prompt_token_ids": [3 + (i * 11 + j) % 200 for j in range(160)]} for i in range(4)]
native = lambda: len(os.listdir("/proc/self/task")) - threading.active_count()
llm.generate(prompts, params, use_tqdm=False)
before = native()
llm.reset_prefix_cache()
outs = llm.generate(prompts, params, use_tqdm=False)
loaded = sum(o.kv_sources.get("cpu", 0) for o in outs)
print(before, native(), loaded)
"""


def _run_child(code: str, *args: str) -> list:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(x) for x in out.stdout.strip().splitlines()[-1].split()]


def _threads_after_generating(model_dir, how: str) -> int:
    return _run_child(_CHILD, model_dir, how)[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads through /proc")
def test_a_factory_keeps_one_openmp_team(model_dir):
    on_main = _threads_after_generating(model_dir, "engine")
    on_loop = _threads_after_generating(model_dir, "factory")
    # Built on the main thread, the main thread's team (1 worker at 2 threads) stays beside
    # the loop thread's own; built by the loop thread, there is only the loop thread's.
    assert on_main - on_loop == 1, (on_main, on_loop)


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    # Its blocks (40960 values) are above torch's grain for a parallel copy; tiny's are not.
    return make_model(str(tmp_path_factory.mktemp("loop-thread") / "small"), "llama", "small")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads through /proc")
def test_tier_loads_start_no_openmp_team(small_model_dir):
    before, after, loaded = _run_child(_LOADS_CHILD, small_model_dir)
    assert loaded > 0  # the second generate did load from the tier, on loader threads
    # torch.copy_ of a block on a loader thread would add one OpenMP worker per loader thread.
    assert after == before, (before, after)


def test_the_factory_runs_on_the_loop_thread_and_its_error_is_raised(model_dir):
    seen = []

    def build():
        seen.append(threading.current_thread().name)
        return Engine(EngineConfig(model=model_dir, kv_tiers=[]))

    engine = AsyncEngine(build)
    try:
        assert seen == ["kvtier-engine-loop"] and engine.max_model_len > 0
    finally:
        engine.close()
    assert not engine._thread.is_alive()

    def broken():
        raise ValueError("no model here")

    with pytest.raises(ValueError, match="no model here"):
        AsyncEngine(broken)
