"""KV groups, measured: sliding-window capacity, SSM prefix reuse, and the dense path's speed.

Three sections, each side by side in one run, printed as one JSON object:

- sliding: a sliding-window model (window 512) at a 16k-token context. Peak number of
  sequences running at once in one fixed KV budget, with window freeing vs the same
  weights with every layer treated as full attention.
- granite: a Granite-4.0-H-shaped hybrid (attention + Mamba2 layers), multi-turn chats that
  share a system prompt, on a device pool too small for all of them. Prefix-hit rate and
  TTFT with and without a CPU tier, and with kvtier's checkpoints (prompt ends, interval,
  branch points) vs one checkpoint per request at its last block boundary.
- dense: throughput of a dense model with this tree vs a baseline git ref (the commit before
  KV groups), in alternating subprocesses; the ratio must stay within 3%.

    python benchmarks/hybrid.py [--sections sliding,granite,dense] [--baseline-ref 540416d] [--out F]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

from bench_io import emit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- sliding window capacity ---------------------------------------------------------------
def _sliding_model(tmp: str, window: int | None) -> str:
    from kvtier.engine.make_model import make_model

    path = make_model(os.path.join(tmp, f"mistral-w{window}"), arch="mistral", size="tiny", seed=0,
                      sliding_window=window)
    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        cfg = json.load(f)
    cfg["max_position_embeddings"] = 32768  # a 16k context
    with open(config_file, "w") as f:
        json.dump(cfg, f)
    return path


def _peak_running(path: str, budget: int, context: int, requests: int, decode: int) -> dict:
    """Requests decode long enough that later ones are admitted while earlier ones still run:
    the peak is then set by KV memory, not by the order of prefills."""
    from kvtier import LLM, SamplingParams

    rng = random.Random(0)
    with LLM(path, max_model_len=context + decode, kv_cache_memory_bytes=budget, max_num_seqs=256,
             enable_prefix_caching=False) as llm:
        engine = llm.engine
        for i in range(requests):
            engine.add_request({"prompt_token_ids": [rng.randrange(3, 500) for _ in range(context)]},
                               SamplingParams(temperature=0, max_tokens=decode, ignore_eos=True))
        peak, start = 0, time.perf_counter()
        while engine.has_unfinished():
            engine.step()
            peak = max(peak, len(engine.scheduler.running))
        return {"peak_running": peak, "preemptions": engine.scheduler.num_preemptions,
                "seconds": round(time.perf_counter() - start, 1)}


def sliding_section(args, tmp: str) -> dict:
    window, context = 512, args.context
    sliding, full = _sliding_model(tmp, window), _sliding_model(tmp, None)
    # The budget holds `full_fit` whole contexts of full-attention KV.
    from kvtier.engine.model_config import load_model_config

    cfg = load_model_config(full)
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    budget = args.full_fit * (context + args.decode_tokens) * per_token
    with_window = _peak_running(sliding, budget, context, args.sliding_requests, args.decode_tokens)
    # Full attention cannot run more than full_fit at once: a few more requests show it.
    as_full = _peak_running(full, budget, context, min(args.sliding_requests, 3 * args.full_fit), args.decode_tokens)
    return {"context_tokens": context, "window": window, "kv_budget_bytes": budget,
            "requests": args.sliding_requests, "window_freeing": with_window,
            "all_full_attention": {**as_full, "requests": min(args.sliding_requests, 3 * args.full_fit)},
            "concurrency_ratio": round(with_window["peak_running"] / max(1, as_full["peak_running"]), 2),
            "context_over_window": round(context / window, 1)}


# ---- granite hybrid, multi-turn ------------------------------------------------------------
def _chat_rounds(llm, args, vocab: int) -> dict:
    from kvtier import SamplingParams

    rng = random.Random(1)
    system = [rng.randrange(3, vocab) for _ in range(args.system_tokens)]
    histories = [list(system) for _ in range(args.users)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompt_tokens = cached = 0
    ttfts = []
    for _ in range(args.turns):
        for h in histories:
            h.extend(rng.randrange(3, vocab) for _ in range(rng.randint(40, 80)))
        outs = llm.generate([{"prompt_token_ids": list(h)} for h in histories], params, use_tqdm=False)
        for h, out in zip(histories, outs):
            if out.error:
                raise RuntimeError(f"granite chat: {out.error}")
            h.extend(out.outputs[0].token_ids)
            prompt_tokens += len(out.prompt_token_ids)
            cached += out.num_cached_tokens
            ttfts.append(out.metrics.ttft)
    return {"prefix_hit_rate": round(cached / prompt_tokens, 4), "ttft_ms_mean": round(statistics.mean(ttfts) * 1e3, 1),
            "ttft_ms_p50": round(statistics.median(ttfts) * 1e3, 1), "prompt_tokens": prompt_tokens}


def granite_section(args, tmp: str) -> dict:
    from kvtier import LLM
    from kvtier.engine.make_model import make_model

    path = make_model(os.path.join(tmp, "granite"), arch="granite-hybrid", size=args.granite_size, seed=0)
    from kvtier.engine.model_config import load_model_config

    vocab = load_model_config(path).vocab_size  # the tiny model's is small
    # A device pool of `granite_blocks` attention blocks and `granite_slots` state slots:
    # too small for every conversation, so older ones leave the device between turns.
    with LLM(path, max_num_seqs=args.users, max_model_len=2048) as probe:
        sizes = {g.kind: p[0].numel() * p.element_size() for g, p in zip(probe.engine.groups, probe.engine.kv_pools)}
        kinds = [g.kind for g in probe.engine.groups]
    want = {"full": args.granite_blocks * sizes["full"], "ssm": args.granite_slots * sizes["ssm"]}
    pool = sum(want.values())
    sizing = dict(max_num_seqs=args.users, max_model_len=2048, kv_cache_memory_bytes=pool,
                  kv_group_memory_fractions=[want[k] / pool for k in kinds])
    rows = {}
    configs = {
        "no_tier": dict(),
        "cpu_tier": dict(kv_tiers=["cpu:2GiB"]),
        "no_tier_last_boundary": dict(ssm_checkpoint_policy="last-boundary"),
        "cpu_tier_last_boundary": dict(kv_tiers=["cpu:2GiB"], ssm_checkpoint_policy="last-boundary"),
    }
    for name, extra in configs.items():
        with LLM(path, **sizing, **extra) as llm:
            rows[name] = _chat_rounds(llm, args, vocab)
    base = rows["no_tier"]["ttft_ms_mean"]
    for row in rows.values():
        row["ttft_over_no_tier"] = round(row["ttft_ms_mean"] / base, 3)
    return {"model": f"granite-hybrid {args.granite_size}", "users": args.users, "turns": args.turns,
            "system_prompt_tokens": args.system_tokens, "device_pool": {"attention_blocks": args.granite_blocks,
                                                                        "state_slots": args.granite_slots}, **rows}


# ---- dense throughput before / after -------------------------------------------------------
def _dense_worker(root: str, model: str) -> None:
    """Run in a subprocess: import kvtier from `root`, time one offline batch, print tokens/s."""
    import importlib.util

    pkgs = {"kvtier": "kvtier", "kvtier.engine": "engine", "kvtier.kvstore": "kvstore",
            "kvtier.connectors": "connectors", "kvtier.proto": "proto"}
    modules = {}
    for name, folder in pkgs.items():
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, folder, "__init__.py"),
                                                      submodule_search_locations=[os.path.join(root, folder)])
        modules[name] = importlib.util.module_from_spec(spec)
        sys.modules[name] = modules[name]
    for name, module in modules.items():
        module.__spec__.loader.exec_module(module)
    from kvtier import LLM, SamplingParams

    rng = random.Random(2)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 32000) for _ in range(rng.randint(32, 512))]} for _ in range(32)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(16, 64), ignore_eos=True) for _ in prompts]
    with LLM(model) as llm:
        llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    tokens = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outs)
    print(json.dumps({"tokens_per_s": tokens / seconds, "module": LLM.__module__}))


def dense_section(args, tmp: str) -> dict:
    from kvtier.engine.make_model import make_model

    model = make_model(os.path.join(tmp, "llama"), arch="llama", size="small", seed=0)
    base = os.path.join(tmp, "baseline")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", base, args.baseline_ref], check=True,
                   capture_output=True)
    try:
        speeds = {"baseline": [], "this_tree": []}
        for _ in range(args.dense_rounds):
            for name, root in (("baseline", base), ("this_tree", ROOT)):
                out = subprocess.run([sys.executable, __file__, "--dense-worker", root, model], check=True,
                                     capture_output=True, text=True).stdout
                speeds[name].append(json.loads(out.strip().splitlines()[-1])["tokens_per_s"])
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", base], capture_output=True)
    med = {k: statistics.median(v) for k, v in speeds.items()}
    return {"model": "llama small", "baseline_ref": args.baseline_ref, "rounds": args.dense_rounds,
            "tokens_per_s": {k: [round(x) for x in v] for k, v in speeds.items()},
            "this_over_baseline": round(med["this_tree"] / med["baseline"], 4)}


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--dense-worker":
        _dense_worker(sys.argv[2], sys.argv[3])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="sliding,granite,dense")
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--full-fit", type=int, default=2, help="contexts of full-attention KV in the sliding budget")
    ap.add_argument("--sliding-requests", type=int, default=80)
    ap.add_argument("--decode-tokens", type=int, default=512, help="tokens each sliding-section request decodes")
    ap.add_argument("--granite-size", default="small", choices=["tiny", "small"])
    ap.add_argument("--granite-blocks", type=int, default=100, help="device attention blocks, granite section")
    ap.add_argument("--granite-slots", type=int, default=12, help="device SSM state slots, granite section")
    ap.add_argument("--users", type=int, default=6)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=256)
    ap.add_argument("--baseline-ref", default="540416d", help="git ref of the tree before KV groups")
    ap.add_argument("--dense-rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sections = {"sliding": sliding_section, "granite": granite_section, "dense": dense_section}
    result = {}
    with tempfile.TemporaryDirectory(prefix="kvtier-hybrid-") as tmp:
        for name in args.sections.split(","):
            if name not in sections:
                raise SystemExit(f"--sections: unknown {name!r}; choose from {', '.join(sections)}")
            result[name] = sections[name](args, tmp)
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
