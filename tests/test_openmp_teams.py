"""One OpenMP team per process: torch gives each thread that runs a parallel op a team of
its own, and a second team makes libgomp shorten every team's barrier spin, which slowed
each forward pass (async_engine.py, kvstore/serial_torch.py). The server's engine is built
on its loop thread; kvtier's helper threads run torch ops on themselves alone."""
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
# above all) once the main thread has its team, then after a generate that writes to the tier
# and one served from it (loads on loader threads).
_LOADS_CHILD = """
import os, sys, threading
import torch
torch.set_num_threads(2)
from kvtier import LLM, SamplingParams

llm = LLM(sys.argv[1], kv_tiers=[sys.argv[2]])
torch.ones(1 << 20).mul_(2)  # the main thread's own team, from here on
native = lambda: len(os.listdir("/proc/self/task")) - threading.active_count()
before = native()
params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
prompts = [{"prompt_token_ids": [3 + (i * 11 + j) % 200 for j in range(160)]} for i in range(4)]
llm.generate(prompts, params, use_tqdm=False)
llm.engine.connector.flush()
llm.reset_prefix_cache()
outs = llm.generate(prompts, params, use_tqdm=False)
loaded = sum(n for o in outs for source, n in o.kv_sources.items() if source not in ("device", "computed"))
print(before, native(), loaded)
"""

# Runs in a fresh process: torch's thread count in a helper thread made serial, in the main
# thread after that, and in a thread started after that.
_SERIAL_CHILD = """
import threading
import torch
torch.set_num_threads(2)
from kvtier.kvstore.serial_torch import serial_torch_thread

seen = []
def helper():
    serial_torch_thread()
    torch.ones(1 << 20).mul_(2)
    seen.append(torch.get_num_threads())
def later():
    seen.append(torch.get_num_threads())
for target in (helper, later):
    t = threading.Thread(target=target)
    t.start()
    t.join()
print(seen[0], torch.get_num_threads(), seen[1])
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
@pytest.mark.parametrize("tier", ["cpu:64MiB", "lmdb:{tmp}?size=256MiB&codec=fp8"])
def test_tier_writes_and_loads_start_no_openmp_team(small_model_dir, tmp_path, tier):
    before, after, loaded = _run_child(_LOADS_CHILD, small_model_dir, tier.format(tmp=tmp_path / "lmdb"))
    assert loaded > 0  # the second generate did load from the tier, on loader threads
    # A block's copy_ or fp8 decode on a loader thread, or an fp8 encode on the writer
    # thread, would each add an OpenMP worker.
    assert after == before, (before, after)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OpenMP runtime is found through /proc")
def test_serial_torch_thread_changes_its_own_thread_only():
    helper, main, later = _run_child(_SERIAL_CHILD)
    # torch.set_num_threads(1) in the helper would have made the later thread serial too.
    assert (helper, main, later) == (1, 2, 2)


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
