"""Tool-call parking under a simulated multi-agent workload: discard vs keep vs offload vs auto.

N agents share a system prompt and grow their own history turn by turn: each turn the model
answers briefly (a tool call), the agent waits for its tool (a pause drawn per tool name from
a heavy-tailed distribution), then sends the tool's result. The device KV budget holds only
part of the agents' contexts; a CPU tier sits below it. Every policy runs the same agents,
turns, pauses and tokens; "discard, no tier" is what an engine without parking or offloading
does. Prints JSON (throughput, turns/s, TTFT p50/p99, recomputed tokens per policy and mix)
and draws a PNG when matplotlib is installed (`pip install -e '.[bench]'`).

    python benchmarks/agentic.py [--agents N] [--turns 10] [--mixes fast,slow,mixed] [--repeats 3] [--png agentic.png]

Each repeat runs every policy once, in an order rotated per repeat, so a slow spell on a
shared machine lands on different policies; each figure is the median over repeats.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

from bench_io import emit

# Per mix, per tool: (probability of a long pause, short range s, long range s).
MIXES = {
    "fast": {"grep": (0.0, (0.01, 0.15), (0, 0)), "read": (0.05, (0.02, 0.2), (0.5, 1.0))},
    "slow": {"test": (0.6, (0.3, 0.8), (1.5, 4.0)), "build": (0.8, (0.5, 1.0), (2.0, 5.0))},
    "mixed": {"grep": (0.0, (0.01, 0.15), (0, 0)), "test": (0.3, (0.1, 0.4), (1.5, 4.0)),
              "human": (0.5, (0.2, 0.6), (3.0, 6.0))},
}
# Agents per mix: slower tools need more agents to offer the engine the same load (Little's
# law: agents = turn rate x (mean pause + time in the engine)); at 12 agents the slow mix
# leaves the engine idle most of the time and every policy waits on the tools alike.
MIX_AGENTS = {"fast": 12, "slow": 24, "mixed": 18}
POLICY_RUNS = [("discard, no tier", "discard", False), ("discard", "discard", True), ("keep", "keep", True),
               ("offload", "offload", True), ("auto", "auto", True)]


def _plan(args, agents: int, vocab: int, mix: str, seed: int) -> list[list[tuple]]:
    """Per agent, per turn: (tokens sent, tool name, pause after the answer). Same for every policy."""
    rng = random.Random(seed)
    system = [rng.randrange(3, vocab) for _ in range(args.system_tokens)]
    tools = MIXES[mix]
    plans = []
    for _ in range(agents):
        turns = [(system + [rng.randrange(3, vocab) for _ in range(args.first_tokens)], None, 0.0)]
        for _ in range(args.turns - 1):
            tool = rng.choice(sorted(tools))
            p_long, short, long = tools[tool]
            lo, hi = long if rng.random() < p_long else short
            turns.append(([rng.randrange(3, vocab) for _ in range(rng.randint(*args.result_tokens))], tool,
                          rng.uniform(lo, hi)))
        plans.append(turns)
    return plans


def run_policy(model: str, args, plans, policy: str, tier: bool) -> dict:
    from kvtier import LLM, ParkParams, SamplingParams

    kwargs = dict(park_policy=policy, kv_cache_memory_bytes=args.device_kv, max_num_seqs=len(plans))
    if tier:
        kwargs["kv_tiers"] = ["cpu:4GiB"]
    with LLM(model, **kwargs) as llm:
        engine = llm.engine
        turn = [0] * len(plans)
        due = [0.0] * len(plans)
        parked: list[str | None] = [None] * len(plans)
        owner: dict[str, int] = {}
        ttfts, computed, out_tokens, prompt_tokens = [], 0, 0, 0
        start = time.perf_counter()
        while any(t < len(p) for t, p in zip(turn, plans)):
            now = time.perf_counter() - start
            for a, plan in enumerate(plans):
                if turn[a] >= len(plan) or due[a] > now or a in owner.values():
                    continue
                tokens, tool, _ = plan[turn[a]]
                nxt = plan[turn[a] + 1][1] if turn[a] + 1 < len(plan) else None
                params = SamplingParams(temperature=0, max_tokens=args.output_tokens, ignore_eos=True,
                                        park=ParkParams(ttl_s=60, tool=nxt) if nxt else None)
                prompt = {"prompt_token_ids": tokens}
                req = engine.resume(parked[a], prompt, params) if parked[a] else engine.add_request(prompt, params)
                owner[req.request_id] = a
            if not engine.has_unfinished():
                waits = [d for t, d, p in zip(turn, due, plans) if t < len(p)]
                time.sleep(max(0.0, min(waits) - (time.perf_counter() - start)))
                continue
            for out in engine.step():
                a = owner.pop(out.request_id)
                if out.error:
                    raise RuntimeError(f"agent {a}: {out.error}")
                ttfts.append(out.metrics.ttft)
                computed += out.kv_sources.get("computed", 0)
                out_tokens += len(out.outputs[0].token_ids)
                prompt_tokens += len(out.prompt_token_ids)
                parked[a] = out.parked_id
                turn[a] += 1
                if turn[a] < len(plans[a]):
                    due[a] = time.perf_counter() - start + plans[a][turn[a]][2]
        wall = time.perf_counter() - start
        stats = llm.kv_stats()["parking"]
    ttfts.sort()
    turns = sum(len(p) for p in plans)
    return {"seconds": round(wall, 2), "turns_per_s": round(turns / wall, 3),
            "tokens_per_s": round((prompt_tokens + out_tokens) / wall, 1), "recomputed_tokens": computed,
            "ttft_ms_p50": round(1e3 * ttfts[len(ttfts) // 2], 1),
            "ttft_ms_p99": round(1e3 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 1),
            "decisions": stats["decisions"], "demoted": stats["demoted"], "resumes": stats["resumes"]}


def _repeated(model: str, args, plans) -> dict:
    """Every policy `args.repeats` times, rotating the order; medians plus each repeat's turns/s."""
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in POLICY_RUNS}
    for r in range(args.repeats):
        order = POLICY_RUNS[r % len(POLICY_RUNS):] + POLICY_RUNS[:r % len(POLICY_RUNS)]
        for name, policy, tier in order:
            runs[name].append(run_policy(model, args, plans, policy, tier))
    rows = {}
    for name, samples in runs.items():
        row = {key: statistics.median(s[key] for s in samples) for key, value in samples[0].items()
               if isinstance(value, (int, float))}
        row["decisions"] = samples[0]["decisions"]
        row["turns_per_s_runs"] = [s["turns_per_s"] for s in samples]
        rows[name] = row
    return rows


def _plot(result: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    mixes = list(result["mixes"])
    names = [name for name, _, _ in POLICY_RUNS]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [m + i * width for m in range(len(mixes))]
        axes[0].bar(xs, [result["mixes"][m][name]["turns_per_s"] for m in mixes], width, label=name)
        axes[1].bar(xs, [result["mixes"][m][name]["ttft_ms_p50"] for m in mixes], width, label=name)
    for ax, title in zip(axes, ("turns / s (higher is better)", "TTFT p50, ms (lower is better)")):
        ax.set_xticks([m + 0.4 - width / 2 for m in range(len(mixes))], mixes)
        ax.set_title(title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(names), fontsize=8)
    agents = ", ".join(f"{m} {n}" for m, n in result["agents"].items())
    fig.suptitle(f"kvtier parking: agents per mix {agents}; {result['turns']} turns each")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir (default: the 'small' llama, made in a temp dir)")
    ap.add_argument("--agents", type=int, default=None,
                    help=f"agents in every mix (default per mix: {MIX_AGENTS})")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--system-tokens", type=int, default=512)
    ap.add_argument("--first-tokens", type=int, default=256)
    ap.add_argument("--result-tokens", type=int, nargs=2, default=(64, 192), metavar=("MIN", "MAX"))
    ap.add_argument("--output-tokens", type=int, default=8)
    ap.add_argument("--device-kv", type=int, default=48 << 20, help="device KV bytes (too few for every agent)")
    ap.add_argument("--mixes", default="fast,slow,mixed")
    ap.add_argument("--repeats", type=int, default=3, help="runs per policy; figures are medians")
    ap.add_argument("--png", default="agentic.png")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.agents is not None and args.agents < 1:
        ap.error("--agents must be at least 1")
    from kvtier.engine.make_model import make_model
    from kvtier.engine.model_config import load_model_config

    with tempfile.TemporaryDirectory(prefix="kvtier-agentic-") as tmp:
        model = args.model or make_model(os.path.join(tmp, "model"), arch="llama", size="small", seed=0)
        vocab = load_model_config(model).vocab_size
        result = {"agents": {m: args.agents or MIX_AGENTS[m] for m in args.mixes.split(",") if m in MIXES},
                  "turns": args.turns, "repeats": args.repeats, "device_kv_bytes": args.device_kv, "mixes": {}}
        for m, mix in enumerate(args.mixes.split(",")):
            if mix not in MIXES:
                raise SystemExit(f"--mixes: unknown {mix!r}; choose from {', '.join(MIXES)}")
            plans = _plan(args, result["agents"][mix], vocab, mix, seed=m)
            rows = _repeated(model, args, plans)
            best = max(rows[n]["turns_per_s"] for n in ("keep", "offload", "discard"))
            rows["auto_over_discard_no_tier"] = round(rows["auto"]["turns_per_s"] / rows["discard, no tier"]["turns_per_s"], 3)
            rows["auto_over_best_fixed"] = round(rows["auto"]["turns_per_s"] / best, 3)
            result["mixes"][mix] = rows
    result["png"] = _plot(result, args.png) if args.png else None
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
