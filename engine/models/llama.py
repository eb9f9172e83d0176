"""The Llama family in one module: Llama 2/3, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm).

The model runs a flat batch: the new tokens of many sequences concatenated into `[T]`, with
their absolute positions; attention finds each sequence's slice and KV blocks in the
`StepMetadata`. q/k/v and gate/up are fused projections (one matmul each); the loader
maps Hugging Face's separate tensors onto their row ranges.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kvtier.engine.attention.metadata import StepMetadata
from kvtier.engine.layers.activation import SiluAndMul
from kvtier.engine.layers.embedding import LMHead, VocabEmbedding
from kvtier.engine.layers.linear import Linear
from kvtier.engine.layers.norm import RMSNorm
from kvtier.engine.attention.paged_attention import PagedAttention
from kvtier.engine.kv_cache.specs import FullAttentionSpec, LayerKVSpec, SlidingWindowSpec
from kvtier.engine.layers.rotary import RotaryEmbedding, apply_rotary
from kvtier.engine.model_config import ModelArchConfig
from kvtier.engine.models.weights import load_named, skip_pattern, tied_head

# Tensors some checkpoints carry that the model recomputes instead of loading.
_IGNORED = r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelArchConfig, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        sliding = cfg.layer_types[layer_idx] == "sliding_attention"
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, layer_idx, cfg.head_dim**-0.5,
                                   window=cfg.sliding_window if sliding else None)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3 normalises each head before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = self.attn(q, k, v, meta)
        return self.o_proj(o.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelArchConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.act = SiluAndMul()
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelArchConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelArchConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_type, cfg.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, self.embed_tokens if cfg.tie_word_embeddings else None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: StepMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden_size] (after the norm)."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, meta)
        return self.norm(h)

    def kv_specs(self) -> list[LayerKVSpec]:
        """One KV spec per layer: full attention, or a sliding window where the config says so."""
        c = self.cfg
        full = FullAttentionSpec(c.num_kv_heads, c.head_dim)
        sliding = SlidingWindowSpec(c.num_kv_heads, c.head_dim, c.sliding_window) if c.sliding_window else None
        return [sliding if t == "sliding_attention" else full for t in c.layer_types]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden_size] (e.g. each sequence's last row) -> float32 logits [S, vocab]."""
        return self.lm_head(hidden)

    # -- weights -------------------------------------------------------------------------------

    def _weight_targets(self) -> dict[str, tuple[nn.Parameter, int | None, int | None]]:
        """HF tensor name -> (parameter, first row, number of rows); rows None = whole tensor."""
        c = self.cfg
        targets: dict[str, tuple[nn.Parameter, int | None, int | None]] = {
            "model.embed_tokens.weight": (self.embed_tokens.weight, None, None),
            "model.norm.weight": (self.norm.weight, None, None),
        }
        if not c.tie_word_embeddings:
            targets["lm_head.weight"] = (self.lm_head.weight, None, None)
        for i, layer in enumerate(self.layers):
            p, a, m = f"model.layers.{i}.", layer.self_attn, layer.mlp
            kv_start = a.q_size + a.kv_size
            qkv = {"q_proj": (0, a.q_size), "k_proj": (a.q_size, a.kv_size), "v_proj": (kv_start, a.kv_size)}
            for shard, (start, rows) in qkv.items():
                targets[f"{p}self_attn.{shard}.weight"] = (a.qkv_proj.weight, start, rows)
                if a.qkv_proj.bias is not None:
                    targets[f"{p}self_attn.{shard}.bias"] = (a.qkv_proj.bias, start, rows)
            inter = c.intermediate_size
            for shard, start in (("gate_proj", 0), ("up_proj", inter)):
                targets[f"{p}mlp.{shard}.weight"] = (m.gate_up_proj.weight, start, inter)
                if m.gate_up_proj.bias is not None:
                    targets[f"{p}mlp.{shard}.bias"] = (m.gate_up_proj.bias, start, inter)
            whole = {
                "self_attn.o_proj": a.o_proj,
                "mlp.down_proj": m.down_proj,
                "input_layernorm": layer.input_layernorm,
                "post_attention_layernorm": layer.post_attention_layernorm,
                "self_attn.q_norm": a.q_norm,
                "self_attn.k_norm": a.k_norm,
            }
            for name, module in whole.items():
                if module is None:
                    continue
                targets[f"{p}{name}.weight"] = (module.weight, None, None)
                if getattr(module, "bias", None) is not None:
                    targets[f"{p}{name}.bias"] = (module.bias, None, None)
        return targets

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the model (converting dtype/device). Raises ValueError on
        an unknown name, a shape mismatch, or, once all are consumed, any missing tensor."""
        targets = {name: param if start is None else param.narrow(0, start, rows)
                   for name, (param, start, rows) in self._weight_targets().items()}
        skip = skip_pattern(_IGNORED, *tied_head(self.cfg.tie_word_embeddings))
        load_named(self.cfg.architecture, targets, named_tensors, skip)
