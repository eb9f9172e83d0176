"""Offline throughput: kvtier vs Hugging Face transformers `generate`, same model, same requests.

Both run in this process, one after the other (each after a short untimed warm-up), on the
same `small` random-weight model and the same 64 requests (prompts 32-1024 tokens, outputs
16-256 tokens, every output forced to its length with ignore_eos / min_new_tokens).
transformers gets its best case: requests sorted by prompt length and batched with left
padding, at each of `--hf-batch-size` (default 8, 16, 32 and one batch of all), and the
fastest is the denominator; its extra tokens past a request's own length are not counted.
Prints one JSON object.

    python benchmarks/throughput.py [--requests 64] [--hf-batch-size 8 16 32 0] [--out results.json]
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

from bench_io import emit, model_dir_or_small
import torch


def make_requests(n: int, vocab: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(vocab) for _ in range(rng.randint(32, 1024))], rng.randint(16, 256)) for _ in range(n)
    ]


def run_kvtier(model_dir: str, requests, max_num_batched_tokens: int) -> tuple[float, list[list[int]]]:
    from kvtier import LLM, SamplingParams

    llm = LLM(model_dir, dtype="float32", max_num_batched_tokens=max_num_batched_tokens)
    prompts = [{"prompt_token_ids": p} for p, _ in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for _, m in requests]
    llm.generate(prompts[:2], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up, untimed
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, [o.outputs[0].token_ids for o in outs]


def run_transformers(model_dir: str, requests, batch_size: int) -> tuple[float, list[list[int]]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = 0
    order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]))
    results: list[list[int]] = [[] for _ in requests]
    with torch.inference_mode():  # warm-up, untimed, as kvtier's
        model.generate(input_ids=torch.tensor([requests[0][0]]), do_sample=False, max_new_tokens=2, pad_token_id=pad)
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            longest = max(len(requests[i][0]) for i in idx)
            new_tokens = max(requests[i][1] for i in idx)
            ids = torch.full((len(idx), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), longest), dtype=torch.long)
            for row, i in enumerate(idx):
                p = requests[i][0]
                ids[row, longest - len(p) :] = torch.tensor(p)
                mask[row, longest - len(p) :] = 1
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=pad,
            )
            for row, i in enumerate(idx):
                results[i] = out[row, longest : longest + requests[i][1]].tolist()
    return time.perf_counter() - start, results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir (default: make the 'small' llama in a temp dir)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--hf-batch-size", type=int, nargs="+", default=[8, 16, 32, 0],
                    help="transformers batch sizes to try (0: one padded batch of all requests); the fastest "
                         "is the denominator")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()

    from kvtier.engine.model_config import load_model_config

    model_dir, _tmp = model_dir_or_small(args.model, args.seed)
    cfg = load_model_config(model_dir)
    requests = make_requests(args.requests, cfg.vocab_size, args.seed)
    prompt_tokens = sum(len(p) for p, _ in requests)
    output_tokens = sum(m for _, m in requests)

    ours_s, ours = run_kvtier(model_dir, requests, args.max_num_batched_tokens)
    tried = {}
    for size in args.hf_batch_size:
        tried[size] = run_transformers(model_dir, requests, size if size > 0 else len(requests))
    best = min(tried, key=lambda size: tried[size][0])
    hf_s, hf = tried[best]
    same = sum(a == b for a, b in zip(ours, hf))
    first_same = sum(a[:1] == b[:1] for a, b in zip(ours, hf))
    result = {
        "benchmark": "throughput",
        "model": "llama small (random weights)" if args.model is None else model_dir,
        "params_millions": round(_param_count(model_dir) / 1e6, 1),
        "requests": args.requests,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "torch_threads": torch.get_num_threads(),
        "kvtier": {"seconds": round(ours_s, 2), "output_tok_s": round(output_tokens / ours_s, 1),
                   "total_tok_s": round((prompt_tokens + output_tokens) / ours_s, 1)},
        "transformers": {"seconds": round(hf_s, 2), "output_tok_s": round(output_tokens / hf_s, 1),
                         "total_tok_s": round((prompt_tokens + output_tokens) / hf_s, 1),
                         "batch_size": best if best > 0 else "all",
                         "seconds_by_batch_size": {str(k if k > 0 else "all"): round(v[0], 2)
                                                   for k, v in tried.items()}},
        "speedup_vs_transformers": round(hf_s / ours_s, 2),
        "identical_outputs": f"{same}/{len(requests)}",
        "identical_first_token": f"{first_same}/{len(requests)}",
    }
    return emit(result, args.out)


def _param_count(model_dir: str) -> int:
    from safetensors import safe_open

    total = 0
    for name in os.listdir(model_dir):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, name), "pt") as f:
                for key in f.keys():
                    total += math.prod(f.get_slice(key).get_shape())
    return total


if __name__ == "__main__":
    sys.exit(main())
