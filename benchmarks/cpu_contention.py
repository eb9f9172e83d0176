"""Offline decode speed when something else wants the cores, with torch's default OpenMP spin
and with the short spin kvtier sets (GOMP_SPINCOUNT, kvtier/__init__.py).

Each setting runs in its own process (libgomp reads the variable when torch loads): 8
requests x 32 decode steps on the `small` Llama, alone, next to a process that keeps one
core busy, and next to one that is busy 20% of the time (what a server's event loop and
its clients cost). Runs alternate between the settings; figures are medians. Prints JSON.

    python benchmarks/cpu_contention.py [--repeats 3] [--spincounts default,1000] [--out F]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from bench_io import emit

# What a competing process does: spin for `busy` seconds, sleep for `idle`, until killed.
_LOAD = "import time\nwhile True:\n    s = time.time()\n    while time.time() - s < {busy}: pass\n    time.sleep({idle})"
LOADS = {"alone": None, "one busy core": (1.0, 0.0), "20% busy": (0.002, 0.008)}

_WORKER = """
import json, subprocess, sys, time
import torch  # before kvtier: with GOMP_SPINCOUNT unset, libgomp keeps its own default
import kvtier
from kvtier import LLM, SamplingParams
model, load = sys.argv[1], json.loads(sys.argv[2])
params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
prompts = [{"prompt_token_ids": list(range(3 + i, 400 + i))} for i in range(8)]
with LLM(model, enable_prefix_caching=False) as llm:
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    other = subprocess.Popen([sys.executable, "-c", load]) if load else None
    try:
        time.sleep(0.2 if other else 0)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        print(time.perf_counter() - start)
    finally:
        if other:
            other.kill()
"""


def _run(model: str, spincount: str, load: tuple | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if spincount != "default":
        env["GOMP_SPINCOUNT"] = spincount
    code = _LOAD.format(busy=load[0], idle=load[1]) if load else ""
    done = subprocess.run([sys.executable, "-c", _WORKER, model, json.dumps(code)], env=env,
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir (default: the 'small' llama, made in a temp dir)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--spincounts", default="default,1000", help="GOMP_SPINCOUNT values ('default': libgomp's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    settings = [s for s in args.spincounts.split(",") if s]
    if not settings or any(s != "default" and not s.isdigit() for s in settings):
        ap.error("--spincounts: comma-separated non-negative integers or 'default'")
    from kvtier.engine.make_model import make_model

    with tempfile.TemporaryDirectory(prefix="kvtier-contention-") as tmp:
        model = args.model or make_model(os.path.join(tmp, "model"), arch="llama", size="small", seed=0)
        times = {(s, name): [] for s in settings for name in LOADS}
        for _ in range(args.repeats):
            for name, load in LOADS.items():
                for s in settings:
                    times[(s, name)].append(_run(model, s, load))
    rows = {}
    for s in settings:
        alone = statistics.median(times[(s, "alone")])
        rows[f"GOMP_SPINCOUNT={s}"] = {
            name: {"seconds": round(statistics.median(times[(s, name)]), 2),
                   "runs": [round(t, 2) for t in times[(s, name)]],
                   "slowdown_vs_alone": round(statistics.median(times[(s, name)]) / alone, 2)}
            for name in LOADS}
    return emit({"benchmark": "cpu_contention", "cores": os.cpu_count(), "rows": rows}, args.out)


if __name__ == "__main__":
    sys.exit(main())
