"""Multi-round QA (the LMCache benchmark's shape): users x rounds over one shared system prompt,
with KV tiers and without.

Every user's conversation starts with the same system prompt. Each round, every user appends
a new question to their whole history (system prompt, earlier questions and answers) and
sends it; all users of a round arrive together, and each answer is appended to its history.
The device KV pool holds only a fraction of all conversations (`--device-fraction`), so
histories leave the device between rounds: without a tier they are recomputed, with one
they come back from it. Every config runs the same tokens, `--repeats` times in an order
rotated per repeat; figures are medians. Reports TTFT p50/p99, throughput, prompt tokens by
KV source, and TTFT per round. Prints JSON; `--png` also draws TTFT per round by source.

    python benchmarks/multiturn.py [--users 8] [--rounds 5] [--configs none,cpu,lmdb] [--repeats 3] [--out F] [--png F]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

from tqdm import tqdm

from bench_io import emit

CONFIGS = {"none": lambda tmp: None, "cpu": lambda tmp: ["cpu:2GiB"],
           "lmdb": lambda tmp: [f"lmdb:{os.path.join(tmp, 'kv-lmdb')}?size=4GiB"],
           "cpu+lmdb": lambda tmp: ["cpu:64MiB", f"lmdb:{os.path.join(tmp, 'kv-lmdb2')}?size=4GiB"]}


def make_workload(args, vocab: int) -> tuple[list[int], list[list[list[int]]]]:
    """The shared system prompt, and per round, per user, the question's token ids."""
    rng = random.Random(args.seed)
    system = [rng.randrange(3, vocab) for _ in range(args.system_tokens)]
    questions = [[[rng.randrange(3, vocab) for _ in range(rng.randint(*args.question_tokens))]
                  for _ in range(args.users)] for _ in range(args.rounds)]
    return system, questions


def device_pool_bytes(args, system, questions, bytes_per_token: int, block_size: int = 16) -> int:
    """`--device-fraction` of the distinct KV of all final conversations (the system prompt
    counted once: it is shared), but at least the longest conversation plus two blocks, so
    one request can always run; whole blocks."""
    finals = [sum(len(questions[r][u]) + args.answer_tokens for r in range(args.rounds)) for u in range(args.users)]
    distinct = args.system_tokens + sum(finals)
    want_tokens = max(args.device_fraction * distinct, args.system_tokens + max(finals) + 2 * block_size)
    return int(-(-want_tokens // block_size)) * block_size * bytes_per_token


def run_config(model: str, args, system, questions, tiers, pool_bytes: int) -> dict:
    from kvtier import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=args.answer_tokens, ignore_eos=True)
    histories = [list(system) for _ in range(args.users)]
    ttfts, per_round, sources = [], [], {}
    prompt_tokens = out_tokens = 0
    with LLM(model, kv_tiers=tiers, kv_cache_memory_bytes=pool_bytes, max_num_seqs=args.users) as llm:
        start = time.perf_counter()
        for r, round_questions in enumerate(questions):
            for h, q in zip(histories, round_questions):
                h.extend(q)
            outs = llm.generate([{"prompt_token_ids": list(h)} for h in histories], params, use_tqdm=False)
            round_sources: dict[str, int] = {}
            for u, (h, out) in enumerate(zip(histories, outs)):
                if out.error:
                    raise RuntimeError(f"round {r + 1} user {u + 1}: {out.error}")
                h.extend(out.outputs[0].token_ids)
                ttfts.append(out.metrics.ttft)
                prompt_tokens += len(out.prompt_token_ids)
                out_tokens += len(out.outputs[0].token_ids)
                for k, v in out.kv_sources.items():
                    round_sources[k] = round_sources.get(k, 0) + v
                    sources[k] = sources.get(k, 0) + v
            mean_ttft = statistics.mean(o.metrics.ttft for o in outs)
            per_round.append({"round": r + 1, "ttft_ms_mean": round(1e3 * mean_ttft, 1),
                              "sources": round_sources,
                              "requests": [{"user": u + 1, "ttft_ms": round(1e3 * o.metrics.ttft, 1),
                                            "sources": dict(o.kv_sources)} for u, o in enumerate(outs)]})
        wall = time.perf_counter() - start
    ttfts.sort()
    return {"seconds": round(wall, 2), "tokens_per_s": round((prompt_tokens + out_tokens) / wall, 1),
            "ttft_ms_p50": round(1e3 * ttfts[len(ttfts) // 2], 1),
            "ttft_ms_p99": round(1e3 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 1),
            "prefix_reuse": round(1 - sources.get("computed", 0) / prompt_tokens, 4),
            "sources": sources, "per_round": per_round}


def _warm_up(model: str, system, first_round, pool_bytes: int) -> None:
    """One untimed round first: the first forward passes of a process are slow (kernel and
    allocator set-up), and would otherwise count against whichever config runs first."""
    from kvtier import LLM, SamplingParams

    with LLM(model, kv_cache_memory_bytes=pool_bytes, max_num_seqs=len(first_round)) as llm:
        llm.generate([{"prompt_token_ids": system + q} for q in first_round], SamplingParams(max_tokens=2),
                     use_tqdm=False)


def run_all(model: str, args, tmp: str) -> dict:
    from kvtier.engine.model_config import load_model_config

    cfg = load_model_config(model)
    system, questions = make_workload(args, cfg.vocab_size)
    bytes_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4  # float32 on CPU
    pool = args.device_kv or device_pool_bytes(args, system, questions, bytes_per_token)
    _warm_up(model, system, questions[0], pool)
    runs: dict[str, list[dict]] = {name: [] for name in args.configs}
    n = len(args.configs)
    work = [(r, args.configs[r % n:] + args.configs[:r % n]) for r in range(args.repeats)]
    with tqdm(total=args.repeats * len(args.configs), desc="multiturn", unit="run", disable=None) as bar:
        for r, order in work:
            for name in order:
                # A fresh store per run: every run starts cold, as the first one did.
                run_tmp = tempfile.mkdtemp(prefix=f"{name}-{r}-", dir=tmp)
                runs[name].append(run_config(model, args, system, questions, CONFIGS[name](run_tmp), pool))
                bar.update(1)
    rows = {}
    for name, samples in runs.items():
        row = {k: statistics.median(s[k] for s in samples) for k in ("seconds", "tokens_per_s", "ttft_ms_p50",
                                                                       "ttft_ms_p99", "prefix_reuse")}
        row["tokens_per_s_runs"] = [s["tokens_per_s"] for s in samples]
        row["sources"] = samples[0]["sources"]
        row["per_round"] = samples[0]["per_round"]
        for i, rnd in enumerate(row["per_round"]):  # the TTFT per round is the median over repeats too
            rnd["ttft_ms_mean"] = statistics.median(s["per_round"][i]["ttft_ms_mean"] for s in samples)
        rows[name] = row
    base = rows.get("none")
    if base:
        for row in rows.values():
            row["ttft_p50_over_none"] = round(row["ttft_ms_p50"] / base["ttft_ms_p50"], 3)
            row["throughput_over_none"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
    return {"benchmark": "multiturn", "users": args.users, "rounds": args.rounds, "system_tokens": args.system_tokens,
            "answer_tokens": args.answer_tokens, "repeats": args.repeats, "device_kv_bytes": pool, "configs": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir (default: the 'small' llama, made in a temp dir)")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--question-tokens", type=int, nargs=2, default=(64, 160), metavar=("MIN", "MAX"))
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--configs", default="none,cpu,lmdb", help=f"comma-separated, from: {', '.join(CONFIGS)}")
    ap.add_argument("--device-fraction", type=float, default=0.3,
                    help="device KV pool as a share of all final conversations' distinct KV")
    ap.add_argument("--device-kv", type=int, default=None, help="device KV bytes (overrides --device-fraction)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per config; figures are medians")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png", default=None, help="also draw TTFT per round by KV source here")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    for key in ("users", "rounds", "repeats", "answer_tokens"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be at least 1")
    if not 0 < args.device_fraction <= 1:
        ap.error("--device-fraction must be in (0, 1]")
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown or not args.configs:
        ap.error(f"--configs: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(CONFIGS)}")
    from kvtier.engine.make_model import make_model

    with tempfile.TemporaryDirectory(prefix="kvtier-multiturn-") as tmp:
        model = args.model or make_model(os.path.join(tmp, "model"), arch="llama", size="small", seed=args.seed)
        result = run_all(model, args, tmp)
    result["model"] = "llama small (random weights)" if args.model is None else args.model
    if args.png:
        from plots import plot_multiturn

        try:
            result["png"] = plot_multiturn(result, args.png)
        except ImportError as e:  # matplotlib is an optional extra: the JSON still counts
            print(f"multiturn: no plot, {e}", file=sys.stderr)
            result["png"] = None
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
