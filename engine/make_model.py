"""Write a random-weight checkpoint in Hugging Face format, for tests and benchmarks: the Llama
family (optionally with sliding-window attention), Mamba2, or a Granite-4.0-H-shaped hybrid.

The directory looks like a Hub download: config.json, generation_config.json,
model.safetensors, tokenizer.json, tokenizer_config.json. Weights are drawn with torch from
`seed` (transformers is not needed); the byte-level BPE tokenizer is trained by the
`tokenizers` library on a fixed synthetic corpus, so it is identical for every seed.

    python -m kvtier.engine.make_model OUT_DIR --arch qwen3 --size small [--sliding-window 512]
    python -m kvtier.engine.make_model OUT_DIR --arch granite-hybrid --size tiny
"""
from __future__ import annotations

import argparse
import json
import os
import random

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kvtier.engine.make_model_hybrid import HYBRID_ARCHS, hybrid_config, hybrid_state_dict
from kvtier.engine.serving.chat_template import DEFAULT_TEMPLATE

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

_ARCHS = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "mamba2": ("Mamba2ForCausalLM", "mamba2"),
    "granite-hybrid": ("GraniteMoeHybridForCausalLM", "granitemoehybrid"),
}
SLIDING_ARCHS = ("mistral", "qwen2", "qwen3")
# Init std: large enough that greedy picks are far from ties, small enough to stay finite.
_SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128, vocab_size=512, max_position_embeddings=4096, std=0.15),
    "small": dict(hidden_size=512, num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=2,
                  head_dim=64, intermediate_size=1536, vocab_size=32000, max_position_embeddings=8192, std=0.06),
}


def _synthetic_corpus(num_words: int) -> list[str]:
    """Deterministic pseudo-language: Zipf-distributed words built from syllables, some
    non-ASCII, with punctuation and digits, so BPE learns multi-byte and multi-char merges."""
    rng = random.Random(1234)
    cons, vow = "bcdfghjklmnprstvwz", "aeiou"
    syllables = [c + v for c in cons for v in vow] + [c + v + "n" for c in cons[:8] for v in vow]
    syllables += ["é", "ü", "ñ", "ß", "ö", "ç", "中", "文", "日", "本"]
    lexicon = ["".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))) for _ in range(30000)]
    words = rng.choices(lexicon, weights=[1.0 / (i + 1) for i in range(len(lexicon))], k=num_words)
    seps = [" "] * 20 + [", ", ". ", "\n", " 1", " 42", "!", "?", " (", ") "]
    return ["".join(w + rng.choice(seps) for w in words[i : i + 100]) for i in range(0, len(words), 100)]


def build_byte_level_tokenizer(vocab_size: int) -> Tokenizer:
    """A GPT-2-style byte-level BPE with exactly `vocab_size` tokens (specials at ids 0-2)."""
    base = len(SPECIAL_TOKENS) + 256
    if vocab_size < base:
        raise ValueError(f"vocab_size: must be at least {base} (3 specials + 256 bytes), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Corpus size scales with the merges wanted (300k words give > 32k merges in < 1 s).
    tok.train_from_iterator(_synthetic_corpus(min(300_000, max(20_000, vocab_size * 10))), trainer)
    missing = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if missing > 0:  # corpus ran out of merges: pad with reserved specials to the exact size
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size(True)} tokens, wanted {vocab_size}")
    return tok


def model_config(arch: str, size: str, sliding_window: int | None = None) -> dict:
    """The config.json dict (legacy `rope_theta` spelling, read by transformers 4 and 5).
    sliding_window: mistral slides on every layer; qwen2 on the upper half (max_window_layers);
    qwen3 on every other layer (explicit layer_types)."""
    if arch not in _ARCHS:
        raise ValueError(f"arch: unknown {arch!r}; choose one of {', '.join(_ARCHS)}")
    if size not in _SIZES:
        raise ValueError(f"size: unknown {size!r}; choose one of {', '.join(_SIZES)}")
    if sliding_window is not None and (arch not in SLIDING_ARCHS or sliding_window <= 0):
        raise ValueError(f"sliding_window: needs a positive window and one of {', '.join(SLIDING_ARCHS)} "
                         f"(got {sliding_window!r} for {arch!r})")
    if arch in HYBRID_ARCHS:
        return hybrid_config(arch, size, dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID))
    spec = {k: v for k, v in _SIZES[size].items() if k != "std"}
    architecture, model_type = _ARCHS[arch]
    cfg = dict(
        architectures=[architecture], model_type=model_type, **spec, hidden_act="silu",
        rms_norm_eps=1e-6, rope_theta=10000.0 if size == "tiny" else 500000.0,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, initializer_range=_SIZES[size]["std"],
        tie_word_embeddings=arch == "qwen3" and size == "tiny", torch_dtype="float32", use_cache=True,
    )
    if arch == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    elif arch == "mistral":
        cfg.update(sliding_window=None)
    elif arch in ("qwen2", "qwen3"):
        # As on the Hub: a window is stated but disabled, so every layer is full attention.
        cfg.update(use_sliding_window=False, sliding_window=cfg["max_position_embeddings"],
                   max_window_layers=cfg["num_hidden_layers"])
        if arch == "qwen3":
            cfg.update(attention_bias=False)
    if sliding_window is not None:
        layers = cfg["num_hidden_layers"]
        if arch == "mistral":
            cfg.update(sliding_window=sliding_window)
        elif arch == "qwen2":
            cfg.update(use_sliding_window=True, sliding_window=sliding_window, max_window_layers=layers // 2)
        else:
            cfg.update(use_sliding_window=True, sliding_window=sliding_window, max_window_layers=0,
                       layer_types=["sliding_attention" if i % 2 else "full_attention" for i in range(layers)])
    return cfg


def random_state_dict(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """HF-named float32 tensors; norms near 1 and nonzero biases, so their loading is tested."""
    if cfg["architectures"][0] in (_ARCHS[a][0] for a in HYBRID_ARCHS):
        return hybrid_state_dict(cfg, seed)
    g = torch.Generator().manual_seed(seed)
    std = cfg["initializer_range"]
    hidden, inter, head_dim = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    sd = {"model.embed_tokens.weight": normal(cfg["vocab_size"], hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            sd[f"{p}self_attn.{name}.weight"] = normal(rows, hidden)
            if cfg["model_type"] == "qwen2":
                sd[f"{p}self_attn.{name}.bias"] = normal(rows)
        sd[f"{p}self_attn.o_proj.weight"] = normal(hidden, q)
        if cfg["model_type"] == "qwen3":
            sd[f"{p}self_attn.q_norm.weight"] = norm(head_dim)
            sd[f"{p}self_attn.k_norm.weight"] = norm(head_dim)
        sd[f"{p}mlp.gate_proj.weight"] = normal(inter, hidden)
        sd[f"{p}mlp.up_proj.weight"] = normal(inter, hidden)
        sd[f"{p}mlp.down_proj.weight"] = normal(hidden, inter)
        sd[f"{p}input_layernorm.weight"] = norm(hidden)
        sd[f"{p}post_attention_layernorm.weight"] = norm(hidden)
    sd["model.norm.weight"] = norm(hidden)
    if not cfg["tie_word_embeddings"]:
        sd["lm_head.weight"] = normal(cfg["vocab_size"], hidden)
    return sd


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def make_model(out_dir: str, arch: str = "llama", size: str = "tiny", seed: int = 0,
               sliding_window: int | None = None) -> str:
    """Write the checkpoint into `out_dir` (created if needed) and return its path."""
    cfg = model_config(arch, size, sliding_window)
    os.makedirs(out_dir, exist_ok=True)
    _write_json(os.path.join(out_dir, "config.json"), cfg)
    _write_json(
        os.path.join(out_dir, "generation_config.json"),
        {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID, "do_sample": False},
    )
    save_file(random_state_dict(cfg, seed), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    build_byte_level_tokenizer(cfg["vocab_size"]).save(os.path.join(out_dir, "tokenizer.json"))
    _write_json(
        os.path.join(out_dir, "tokenizer_config.json"),
        {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS[BOS_ID],
            "eos_token": SPECIAL_TOKENS[EOS_ID], "pad_token": SPECIAL_TOKENS[PAD_ID],
            "add_bos_token": False, "model_max_length": cfg.get("max_position_embeddings", 131072),
            # ChatML with Hermes-style <tool_call> blocks: `kvtier serve` renders chats and tools with it.
            "chat_template": DEFAULT_TEMPLATE,
        },
    )
    return out_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a random-weight HF-format checkpoint.")
    ap.add_argument("out_dir")
    ap.add_argument("--arch", choices=sorted(_ARCHS), default="llama")
    ap.add_argument("--size", choices=sorted(_SIZES), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sliding-window", type=int, default=None, help="sliding window (mistral, qwen2, qwen3)")
    args = ap.parse_args(argv)
    print(make_model(args.out_dir, args.arch, args.size, args.seed, args.sliding_window))


if __name__ == "__main__":
    main()
