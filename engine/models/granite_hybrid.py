"""Granite-4.0-H-style hybrid (HF GraniteMoeHybridForCausalLM without experts).

Each layer is a Mamba2 mixer or attention (config `layer_types`), followed by a dense shared
SwiGLU MLP. Granite scales things: embeddings by `embedding_multiplier`, both residual
branches by `residual_multiplier`, attention scores by `attention_multiplier` (instead of
1/sqrt(head_dim)), and divides the logits by `logits_scaling`. Attention uses RoPE only when
`position_embedding_type` is "rope" (Granite 4.0-H is "nope": position comes from Mamba).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kvtier.engine.attention.paged_attention import PagedAttention
from kvtier.engine.kv_cache.specs import FullAttentionSpec, LayerKVSpec
from kvtier.engine.layers.activation import SiluAndMul
from kvtier.engine.layers.embedding import LMHead, VocabEmbedding
from kvtier.engine.layers.linear import Linear
from kvtier.engine.layers.mamba2 import Mamba2Mixer
from kvtier.engine.layers.norm import RMSNorm
from kvtier.engine.layers.rotary import RotaryEmbedding, apply_rotary
from kvtier.engine.model_config import ModelArchConfig
from kvtier.engine.models.mamba2 import mixer_weight_targets
from kvtier.engine.models.weights import load_named, skip_pattern, tied_head


class GraniteAttention(nn.Module):
    def __init__(self, cfg: ModelArchConfig, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, layer_idx, cfg.attention_scale)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, meta) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return self.o_proj(self.attn(q, k, v, meta).reshape(t, self.q_size))


class GraniteSharedMLP(nn.Module):
    """HF `shared_mlp`: input_linear holds [gate; up] rows, as our fused gate_up."""

    def __init__(self, cfg: ModelArchConfig):
        super().__init__()
        self.input_linear = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.act = SiluAndMul()
        self.output_linear = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_linear(self.act(self.input_linear(x)))


class GraniteHybridLayer(nn.Module):
    def __init__(self, cfg: ModelArchConfig, layer_idx: int):
        super().__init__()
        self.kind = cfg.layer_kinds[layer_idx]
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mamba = Mamba2Mixer(cfg.hidden_size, cfg.mamba, layer_idx) if self.kind == "mamba" else None
        self.self_attn = GraniteAttention(cfg, layer_idx) if self.kind == "attention" else None
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.shared_mlp = GraniteSharedMLP(cfg)
        self.residual_multiplier = cfg.residual_multiplier

    def forward(self, h: torch.Tensor, rope, meta) -> torch.Tensor:
        x = self.input_layernorm(h)
        x = self.mamba(x, meta) if self.mamba is not None else self.self_attn(x, rope, meta)
        h = h + x * self.residual_multiplier
        return h + self.shared_mlp(self.post_attention_layernorm(h)) * self.residual_multiplier

    def kv_spec(self, cfg: ModelArchConfig) -> LayerKVSpec:
        if self.mamba is not None:
            return self.mamba.kv_spec()
        return FullAttentionSpec(cfg.num_kv_heads, cfg.head_dim)


class GraniteMoeHybridForCausalLM(nn.Module):
    def __init__(self, cfg: ModelArchConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_type, cfg.rope_scaling) \
            if cfg.use_rope else None
        self.layers = nn.ModuleList(GraniteHybridLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, self.embed_tokens if cfg.tie_word_embeddings else None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden_size] (after the norm)."""
        h = self.embed_tokens(input_ids) * self.cfg.embedding_multiplier
        rope = self.rotary(positions, h.dtype) if self.rotary is not None else None
        for layer in self.layers:
            h = layer(h, rope, meta)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden) / self.cfg.logits_scaling

    def kv_specs(self) -> list[LayerKVSpec]:
        return [layer.kv_spec(self.cfg) for layer in self.layers]

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        targets: dict[str, torch.Tensor] = {"model.embed_tokens.weight": self.embed_tokens.weight,
                                            "model.norm.weight": self.norm.weight}
        if not self.cfg.tie_word_embeddings:
            targets["lm_head.weight"] = self.lm_head.weight
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            targets[f"{p}input_layernorm.weight"] = layer.input_layernorm.weight
            targets[f"{p}post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
            targets[f"{p}shared_mlp.input_linear.weight"] = layer.shared_mlp.input_linear.weight
            targets[f"{p}shared_mlp.output_linear.weight"] = layer.shared_mlp.output_linear.weight
            if layer.mamba is not None:
                targets.update(mixer_weight_targets(f"{p}mamba.", layer.mamba))
                continue
            a = layer.self_attn
            rows = {"q_proj": (0, a.q_size), "k_proj": (a.q_size, a.kv_size), "v_proj": (a.q_size + a.kv_size, a.kv_size)}
            for shard, (start, n) in rows.items():  # views into the fused projection
                targets[f"{p}self_attn.{shard}.weight"] = a.qkv_proj.weight.narrow(0, start, n)
                if a.qkv_proj.bias is not None:
                    targets[f"{p}self_attn.{shard}.bias"] = a.qkv_proj.bias.narrow(0, start, n)
            targets[f"{p}self_attn.o_proj.weight"] = a.o_proj.weight
            if a.o_proj.bias is not None:
                targets[f"{p}self_attn.o_proj.bias"] = a.o_proj.bias
        skip = skip_pattern(*tied_head(self.cfg.tie_word_embeddings))
        load_named(self.cfg.architecture, targets, named_tensors, skip)
