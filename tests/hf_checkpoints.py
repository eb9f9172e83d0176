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

# Sliding-window attention: small windows so the test sequences run past them.
SLIDING_VARIANTS = {
    "mistral_sliding": ("mistral", dict(sliding_window=24)),
    # Layers below max_window_layers are full attention, the rest slide.
    "qwen2_sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=24, max_window_layers=1)),
    # Explicit per-layer types (transformers applies them only with use_sliding_window).
    "qwen3_sliding": ("qwen3", dict(use_sliding_window=True, sliding_window=24,
                                    layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
}

# Mamba2 and Granite-4.0-H-shaped hybrids; small chunk_size so test sequences span chunks.
_MAMBA2 = dict(num_heads=8, head_dim=16, state_size=16, n_groups=2, expand=2, conv_kernel=4, chunk_size=16,
               num_hidden_layers=2, layer_norm_epsilon=1e-5)
_GRANITE = dict(shared_intermediate_size=96, num_local_experts=0, mamba_n_heads=8, mamba_d_state=16,
                mamba_n_groups=2, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16, num_hidden_layers=4,
                embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.1, logits_scaling=2.0)
SSM_VARIANTS = {
    "mamba2": ("mamba2", _MAMBA2),
    "mamba2_bias_tied_dtlimit": (
        "mamba2", {**_MAMBA2, "use_bias": True, "tie_word_embeddings": True, "time_step_limit": (0.0, 0.1)}),
    "granite_mamba_only": ("granite_hybrid", {**_GRANITE, "num_hidden_layers": 2, "layer_types": ["mamba"] * 2}),
    "granite_hybrid": ("granite_hybrid", {**_GRANITE, "layer_types": ["mamba", "attention", "mamba", "mamba"],
                                          "position_embedding_type": "nope"}),
    "granite_hybrid_rope": ("granite_hybrid", {**_GRANITE, "layer_types": ["attention", "mamba", "mamba", "attention"],
                                               "position_embedding_type": "rope", "attention_bias": True,
                                               "tie_word_embeddings": True}),
}
ALL_VARIANTS = {**VARIANTS, **SLIDING_VARIANTS, **SSM_VARIANTS}


def _config(arch: str, overrides: dict):
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mamba2": (transformers.Mamba2Config, transformers.Mamba2ForCausalLM),
        "granite_hybrid": (transformers.GraniteMoeHybridConfig, transformers.GraniteMoeHybridForCausalLM),
    }
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}")
    config_cls, model_cls = classes[arch]
    base = {k: v for k, v in _BASE.items() if arch != "mamba2" or k not in _NOT_MAMBA2}
    kwargs = {**base, **({"head_dim": 16} if arch == "qwen3" else {}), **overrides}
    return config_cls(**kwargs), model_cls


_NOT_MAMBA2 = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
               "rms_norm_eps")


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
            elif name.endswith((".D", ".dt_bias")):  # Mamba: HF inits these to constants
                p.add_(0.1 * torch.randn_like(p))
    path = str(tmp_dir)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    build_byte_level_tokenizer(config.vocab_size).save(os.path.join(path, "tokenizer.json"))
    return path


def make_variant(tmp_dir, variant: str, seed: int = 0) -> str:
    arch, overrides = ALL_VARIANTS[variant]
    return make_hf_checkpoint(tmp_dir, arch, seed=seed, **overrides)


def load_hf_model(path: str):
    """The checkpoint loaded back by transformers (eager attention, float32, eval)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
