"""Configs and random weights of the Mamba2 and Granite-hybrid checkpoints make_model writes.

The Mamba parameters are drawn the way transformers initialises them (A_log = log(1..heads),
dt_bias = softplus^-1 of a log-uniform step in [1e-3, 1e-1], D near 1), so the scan decays
at realistic rates: outputs stay finite and greedy picks are well separated.
"""
from __future__ import annotations

import math

import torch

HYBRID_ARCHS = ("mamba2", "granite-hybrid")

_MAMBA2 = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, state_size=16, n_groups=1,
                 chunk_size=64, vocab_size=512, initializer_range=0.15),
    "small": dict(hidden_size=512, num_hidden_layers=16, num_heads=16, head_dim=64, state_size=64, n_groups=1,
                  chunk_size=128, vocab_size=32000, initializer_range=0.06),
}
_M, _A = "mamba", "attention"
_GRANITE = {
    "tiny": dict(hidden_size=64, num_hidden_layers=4, layer_types=[_M, _A, _M, _M], num_attention_heads=4,
                 num_key_value_heads=2, shared_intermediate_size=128, mamba_n_heads=8, mamba_d_head=16,
                 mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=64, vocab_size=512,
                 max_position_embeddings=4096, initializer_range=0.15),
    "small": dict(hidden_size=512, num_hidden_layers=10, layer_types=[_M, _M, _M, _A, _M, _M, _M, _A, _M, _M],
                  num_attention_heads=8, num_key_value_heads=2, shared_intermediate_size=1536, mamba_n_heads=16,
                  mamba_d_head=64, mamba_d_state=64, mamba_n_groups=1, mamba_chunk_size=128, vocab_size=32000,
                  max_position_embeddings=8192, initializer_range=0.06),
}


def hybrid_config(arch: str, size: str, special_ids: dict) -> dict:
    common = dict(hidden_act="silu", torch_dtype="float32", use_cache=True, tie_word_embeddings=False, **special_ids)
    if arch == "mamba2":
        return dict(architectures=["Mamba2ForCausalLM"], model_type="mamba2", **_MAMBA2[size], expand=2,
                    conv_kernel=4, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5,
                    residual_in_fp32=True, **common)
    # Granite 4.0-H's shape: no positional embedding (Mamba carries position), dense shared MLP,
    # and its multipliers, with the attention scale left at the usual 1/sqrt(head_dim).
    head_dim = _GRANITE[size]["hidden_size"] // _GRANITE[size]["num_attention_heads"]
    return dict(architectures=["GraniteMoeHybridForCausalLM"], model_type="granitemoehybrid", **_GRANITE[size],
                num_local_experts=0, position_embedding_type="nope", mamba_expand=2,
                mamba_d_conv=4, mamba_conv_bias=True, mamba_proj_bias=False, rms_norm_eps=1e-6,
                embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=head_dim**-0.5,
                logits_scaling=2.0, attention_bias=False, rope_theta=10000.0, **common)


def _mixer(p: str, hidden: int, heads: int, head_dim: int, d_state: int, n_groups: int, normal, g) -> dict:
    inner = heads * head_dim
    conv_dim = inner + 2 * n_groups * d_state
    dt = torch.exp(torch.rand(heads, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return {
        f"{p}in_proj.weight": normal(inner + conv_dim + heads, hidden),
        f"{p}conv1d.weight": torch.randn(conv_dim, 1, 4, generator=g) * 0.3,
        f"{p}conv1d.bias": 0.1 * torch.randn(conv_dim, generator=g),
        f"{p}dt_bias": dt + torch.log(-torch.expm1(-dt)),  # softplus(dt_bias) = dt
        f"{p}A_log": torch.log(torch.arange(1, heads + 1, dtype=torch.float32)),
        f"{p}D": 1.0 + 0.1 * torch.randn(heads, generator=g),
        f"{p}norm.weight": 1.0 + 0.1 * torch.randn(inner, generator=g),
        f"{p}out_proj.weight": normal(hidden, inner),
    }


def hybrid_state_dict(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    std, hidden, vocab = cfg["initializer_range"], cfg["hidden_size"], cfg["vocab_size"]

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    if cfg["model_type"] == "mamba2":
        sd = {"backbone.embeddings.weight": normal(vocab, hidden)}
        for i in range(cfg["num_hidden_layers"]):
            sd[f"backbone.layers.{i}.norm.weight"] = norm(hidden)
            sd.update(_mixer(f"backbone.layers.{i}.mixer.", hidden, cfg["num_heads"], cfg["head_dim"],
                             cfg["state_size"], cfg["n_groups"], normal, g))
        sd["backbone.norm_f.weight"] = norm(hidden)
    else:
        sd = {"model.embed_tokens.weight": normal(vocab, hidden)}
        heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        head_dim, inter = hidden // heads, cfg["shared_intermediate_size"]
        for i, kind in enumerate(cfg["layer_types"]):
            p = f"model.layers.{i}."
            if kind == _M:
                sd.update(_mixer(f"{p}mamba.", hidden, cfg["mamba_n_heads"], cfg["mamba_d_head"],
                                 cfg["mamba_d_state"], cfg["mamba_n_groups"], normal, g))
            else:
                for name, rows in (("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim),
                                   ("v_proj", kv_heads * head_dim)):
                    sd[f"{p}self_attn.{name}.weight"] = normal(rows, hidden)
                sd[f"{p}self_attn.o_proj.weight"] = normal(hidden, heads * head_dim)
            sd[f"{p}shared_mlp.input_linear.weight"] = normal(2 * inter, hidden)
            sd[f"{p}shared_mlp.output_linear.weight"] = normal(hidden, inter)
            sd[f"{p}input_layernorm.weight"] = norm(hidden)
            sd[f"{p}post_attention_layernorm.weight"] = norm(hidden)
        sd["model.norm.weight"] = norm(hidden)
    sd["lm_head.weight"] = normal(vocab, hidden)
    return sd
