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
    from kvtier.engine.sampling_params import SamplingParams

    if args.turns < 1 or args.turns > len(_USER_TURNS):
        raise ValueError(f"--turns: must be between 1 and {len(_USER_TURNS)}")
    if args.max_tokens < 1:
        raise ValueError("--max-tokens: must be positive")
    model = args.model or str(ensure_demo_model(cache_dir()))
    print(f"model: {model}")
    llm = LLM(model, **engine_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    history = llm.tokenizer.encode(_SYSTEM)
    total_prompt = total_reused = 0
    for turn in range(args.turns):
        # The conversation grows by token ids, so each turn's prompt extends the last one exactly.
        history = history + llm.tokenizer.encode("\nUser: " + _USER_TURNS[turn] + "\nAssistant:")
        out = llm.generate({"prompt_token_ids": history}, params, use_tqdm=False)[0]
        if out.error:
            raise ValueError(out.error)
        n, reused = len(history), out.num_cached_tokens
        total_prompt += n
        total_reused += reused
        ttft_ms = out.metrics.ttft * 1000
        print(
            f"turn {turn + 1}: prompt {n:5d} tokens | reused {reused:5d} ({100 * reused / n:5.1f}%) "
            f"| computed {n - reused:5d} | sources {out.kv_sources} | TTFT {ttft_ms:8.1f} ms"
        )
        history = history + out.outputs[0].token_ids
    print(f"total: {total_reused} of {total_prompt} prompt tokens reused ({100 * total_reused / total_prompt:.1f}%)")
    return 0
