"""Deterministic mode: its throughput cost, and whether a "needle" request really comes out
the same in every batch.

1. Throughput: the same requests (prompts 64-512 tokens, 48 output tokens each, greedy) through
   three engines on one random-weight `small` llama: mode off, mode on, and mode on with
   half of the requests opting out (`SamplingParams(deterministic=False)`). Each repeat runs
   the three in a rotated order; the figures are medians, and the ratios are against mode off.
2. Needle: one request (a long prompt, 16 tokens, logprobs) run `--needle-runs` times, each
   time batched with 1-31 random other requests in a shuffled order, on engines with
   different `max_num_batched_tokens` (different prefill chunking), with the prefix cache
   sometimes reset (cold) and sometimes hit. Counts the distinct (tokens, logprobs) results:
   1 means bitwise invariant. The same runs with the mode off are the control.

    python benchmarks/determinism.py [--requests 32] [--repeats 3] [--needle-runs 100] [--out F]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

from bench_io import emit, model_dir_or_small
import torch

_CHUNKINGS = (2048, 256, 97)  # max_num_batched_tokens of the needle engines


def make_prompts(n: int, vocab: int, rng: random.Random, lo: int, hi: int) -> list[list[int]]:
    return [[rng.randrange(5, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def throughput(model_dir: str, prompts, max_tokens: int, repeats: int) -> dict:
    from kvtier import LLM, SamplingParams

    greedy = dict(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    modes = {
        "off": (False, [SamplingParams(**greedy)] * len(prompts)),
        "on": (True, [SamplingParams(**greedy)] * len(prompts)),
        "on_50pct": (True, [SamplingParams(**greedy, deterministic=i % 2 == 0) for i in range(len(prompts))]),
    }
    engines = {name: LLM(model_dir, deterministic=det, enable_prefix_caching=False) for name, (det, _) in modes.items()}
    inputs = [{"prompt_token_ids": p} for p in prompts]
    for name, llm in engines.items():  # warm-up: first-use probes and allocations, untimed
        llm.generate(inputs[:4], modes[name][1][:4], use_tqdm=False)
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    names = list(modes)
    for rep in range(repeats):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            start = time.perf_counter()
            engines[name].generate(inputs, modes[name][1], use_tqdm=False)
            seconds[name].append(time.perf_counter() - start)
    tokens = sum(len(p) + max_tokens for p in prompts)
    result = {name: {"seconds_median": round(statistics.median(s), 2), "runs": [round(x, 2) for x in s],
                     "total_tok_s": round(tokens / statistics.median(s), 1)} for name, s in seconds.items()}
    off = statistics.median(seconds["off"])
    for name in ("on", "on_50pct"):
        result[f"throughput_ratio_{name}_vs_off"] = round(off / statistics.median(seconds[name]), 3)
    return result


def needle_runs(model_dir: str, deterministic: bool, runs: int, vocab: int, seed: int) -> dict:
    from kvtier import LLM, SamplingParams

    rng = random.Random(seed)
    needle = make_prompts(1, vocab, rng, 300, 300)[0]
    engines = [LLM(model_dir, deterministic=deterministic, max_num_batched_tokens=m) for m in _CHUNKINGS]
    needle_params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=0, ignore_eos=True)
    other_params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    seen: dict[tuple, int] = {}
    for run in range(runs):
        llm = engines[run % len(engines)]
        if rng.random() < 0.5:
            llm.reset_prefix_cache()  # cold prefill, else a device prefix hit from an earlier run
        prompts = make_prompts(rng.randint(1, 31), vocab, rng, 16, 200)
        at = rng.randint(0, len(prompts))
        prompts.insert(at, needle)
        params = [other_params] * len(prompts)
        params[at] = needle_params
        out = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)[at].outputs[0]
        logprobs = tuple(entry[token].logprob for entry, token in zip(out.logprobs, out.token_ids))
        key = (tuple(out.token_ids), logprobs)
        seen[key] = seen.get(key, 0) + 1
    return {"runs": runs, "distinct_outputs": len(seen), "chunkings": list(_CHUNKINGS)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir (default: make the 'small' llama in a temp dir)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--needle-runs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()

    from kvtier.engine.model_config import load_model_config

    model_dir, _tmp = model_dir_or_small(args.model, args.seed)
    vocab = load_model_config(model_dir).vocab_size
    prompts = make_prompts(args.requests, vocab, random.Random(args.seed), 64, 512)
    result = {
        "benchmark": "determinism",
        "model": "llama small (random weights)" if args.model is None else model_dir,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "torch_threads": torch.get_num_threads(),
        "throughput": throughput(model_dir, prompts, args.max_tokens, args.repeats),
        "needle_on": needle_runs(model_dir, True, args.needle_runs, vocab, args.seed),
        "needle_off": needle_runs(model_dir, False, args.needle_runs, vocab, args.seed),
    }
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
