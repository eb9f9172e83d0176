"""`kvtier demo`: a multi-turn conversation on a built-in model, showing how much KV is reused."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

_SYSTEM = (
    "You are a careful assistant for a team that runs large language models in production. "
    "You explain trade-offs between recomputing attention keys and values and loading them "
    "from memory, disk or a remote store, and you answer with short, concrete steps. "
) * 4
_USER_TURNS = [
    "How much memory does the KV cache of one long conversation take?",
    "And if I move the older blocks of it to host memory, what does a reload cost?",
    "What happens when the disk copy of a block is corrupted?",
    "How do two tenants avoid reading each other's cached prefixes?",
    "Summarise the plan in three bullet points.",
    "Which of those should we build first, and why?",
    "What would you measure to know it worked?",
]


_DEMO_DEVICE_POOL = 10 << 20  # with the demo model: about one conversation, not all of them


def cache_dir() -> Path:
    """$KVTIER_CACHE_DIR, else $XDG_CACHE_HOME/kvtier, else ~/.cache/kvtier."""
    explicit = os.environ.get("KVTIER_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvtier"


def ensure_demo_model(root: Path) -> Path:
    """Make the demo's random 'small' model once; later runs reuse it."""
    from kvtier.engine.make_model import make_model

    target = root / "models" / "llama-small-seed0"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so an interrupted run never leaves half a model.
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        make_model(str(tmp), arch="llama", size="small", seed=0)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def run_demo(args, engine_kwargs: dict) -> int:
    from kvtier.engine.llm import LLM

    if not 1 <= args.turns <= len(_USER_TURNS):
        raise ValueError(f"--turns: must be between 1 and {len(_USER_TURNS)}")
    if args.users < 1:
        raise ValueError("--users: must be positive")
    if args.max_tokens < 1:
        raise ValueError("--max-tokens: must be positive")
    model = args.model or str(ensure_demo_model(cache_dir()))
    # A device pool smaller than all conversations together, so older ones leave the device
    # between turns and come back from the tiers below.
    kwargs = dict(engine_kwargs)
    if kwargs.get("kv_cache_memory_bytes") is None and args.model is None:
        kwargs["kv_cache_memory_bytes"] = _DEMO_DEVICE_POOL
    with LLM(model, **kwargs) as llm:
        pool_bytes = sum(p.numel() * p.element_size() for p in llm.engine.kv_pools)
        print(f"model: {model}")
        print(f"device KV pool: {pool_bytes / 2**20:.1f} MiB; "
              f"tiers: {', '.join(kwargs.get('kv_tiers') or ['none'])}")
        records = _converse(llm, args)
    print(_write_plot(records, args))
    return 0


def _write_plot(records, args) -> str:
    """Draw the TTFT-per-turn PNG (default: in the kvtier cache dir); one line saying where."""
    from kvtier.engine.demo_plot import plot_turns, pyplot

    path = Path(getattr(args, "png", None) or cache_dir() / "demo" / "ttft-per-turn.png")
    try:
        pyplot()
    except ImportError as e:
        return f"plot: not drawn, {e}"
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_turns(records, str(path), f"kvtier demo: {args.users} users x {args.turns} turns")
    return f"plot: TTFT per turn by KV source written to {path}"


def _converse(llm, args) -> list:
    from kvtier.engine.demo_plot import TurnRecord
    from kvtier.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    system = llm.tokenizer.encode(_SYSTEM)
    histories = [list(system) for _ in range(args.users)]
    total_prompt = total_reused = 0
    records = []
    for turn in range(args.turns):
        for user, history in enumerate(histories):
            # Conversations grow by token ids, so each prompt extends that user's last one exactly.
            question = _USER_TURNS[(turn + user) % len(_USER_TURNS)]
            history += llm.tokenizer.encode(f"\nUser {user + 1}: {question}\nAssistant:")
            out = llm.generate({"prompt_token_ids": history}, params, use_tqdm=False)[0]
            if out.error:
                raise ValueError(out.error)
            n, reused = len(history), out.num_cached_tokens
            total_prompt += n
            total_reused += reused
            sources = ", ".join(f"{k} {v}" for k, v in out.kv_sources.items() if v)
            print(f"turn {turn + 1} user {user + 1}: prompt {n:5d} tokens, reused {100 * reused / n:5.1f}% "
                  f"({sources}) | TTFT {out.metrics.ttft * 1000:7.1f} ms")
            history += out.outputs[0].token_ids
            records.append(TurnRecord(turn + 1, user + 1, out.metrics.ttft * 1000, dict(out.kv_sources)))
    print(f"total: {total_reused} of {total_prompt} prompt tokens reused ({100 * total_reused / total_prompt:.1f}%)")
    for tier, stats in llm.kv_stats().items():
        if tier != "device" and "hits" in stats:  # tiers only, not the connector or parking stats
            print(f"tier {tier}: {stats['hits']} block hits, {stats['puts']} blocks stored, "
                  f"{stats['used_bytes'] / 2**20:.1f} MiB used, {stats['errors']} errors")
    return records
