"""Random-weight Hugging Face checkpoints written by transformers itself (a test dependency),
the ground truth our model implementation is compared against."""
from __future__ import annotations

import os

import torch

from kvtier.engine.make_model import build_byte_level_tokenizer

_BASE = dict(
    vocab_size=500,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    initializer_range=0.15,  # large: greedy logits are well separated
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# name -> (arch, config overrides); every variant used by the model-vs-HF tests.
VARIANTS = {
    "llama": ("llama", {}),
    "llama3_rope": (
        "llama",
        dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_max_position_embeddings=64)),
    ),
    "llama_linear_rope": ("llama", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_bias": ("llama", dict(attention_bias=True, mlp_bias=True)),  # q/k/v/o and MLP biases
    "mistral": ("mistral", dict(sliding_window=None)),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", dict(head_dim=32)),  # head_dim != hidden / heads, as in real Qwen3
}


def _config(arch: str, overrides: dict):
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}")
    config_cls, model_cls = classes[arch]
    kwargs = {**_BASE, **({"head_dim": 16} if arch == "qwen3" else {}), **overrides}
    return config_cls(**kwargs), model_cls


def make_hf_checkpoint(tmp_dir, arch: str, seed: int = 0, **overrides) -> str:
    """Build a float32 transformers model with random weights, save it (safetensors) plus a
    byte-level tokenizer.json into `tmp_dir`, and return the directory path."""
    config, model_cls = _config(arch, overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        # HF inits norms to 1 and biases to 0: perturb them so a mis-mapped one shows.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    path = str(tmp_dir)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    build_byte_level_tokenizer(config.vocab_size).save(os.path.join(path, "tokenizer.json"))
    return path


def make_variant(tmp_dir, variant: str, seed: int = 0) -> str:
    arch, overrides = VARIANTS[variant]
    return make_hf_checkpoint(tmp_dir, arch, seed=seed, **overrides)


def load_hf_model(path: str):
    """The checkpoint loaded back by transformers (eager attention, float32, eval)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
