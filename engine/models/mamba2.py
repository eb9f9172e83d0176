"""Mamba2 (attention-free): embeddings, then per layer x + mixer(norm(x)), a final norm, the LM head.

Every layer keeps a fixed-size state per sequence (MambaSpec), read and written through the
state slots named in the step's SsmMetadata (`meta.groups[layer.mixer.group]`).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kvtier.engine.kv_cache.specs import LayerKVSpec
from kvtier.engine.layers.embedding import LMHead, VocabEmbedding
from kvtier.engine.layers.mamba2 import Mamba2Mixer
from kvtier.engine.layers.norm import RMSNorm
from kvtier.engine.model_config import ModelArchConfig
from kvtier.engine.models.weights import load_named, skip_pattern, tied_head


def mixer_weight_targets(prefix: str, mixer: Mamba2Mixer) -> dict[str, nn.Parameter]:
    """HF names of one Mamba2 mixer's tensors (same in Mamba2 and GraniteMoeHybrid) -> parameters."""
    targets = {
        f"{prefix}in_proj.weight": mixer.in_proj.weight,
        f"{prefix}conv1d.weight": mixer.conv_weight,
        f"{prefix}dt_bias": mixer.dt_bias,
        f"{prefix}A_log": mixer.A_log,
        f"{prefix}D": mixer.D,
        f"{prefix}norm.weight": mixer.norm.weight,
        f"{prefix}out_proj.weight": mixer.out_proj.weight,
    }
    optional = {"in_proj.bias": mixer.in_proj.bias, "out_proj.bias": mixer.out_proj.bias,
                "conv1d.bias": mixer.conv_bias}
    targets.update({f"{prefix}{name}": p for name, p in optional.items() if p is not None})
    return targets


class Mamba2Block(nn.Module):
    def __init__(self, cfg: ModelArchConfig, layer_idx: int):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mixer = Mamba2Mixer(cfg.hidden_size, cfg.mamba, layer_idx)
        self.residual_in_fp32 = cfg.residual_in_fp32

    def forward(self, h: torch.Tensor, meta) -> torch.Tensor:
        out = self.mixer(self.norm(h.to(self.norm.weight.dtype)), meta)
        # HF keeps the residual stream in float32 (residual_in_fp32): h stays float32 from here on.
        return (h.float() if self.residual_in_fp32 else h) + out


class Mamba2ForCausalLM(nn.Module):
    def __init__(self, cfg: ModelArchConfig):
        super().__init__()
        if cfg.mamba is None:
            raise ValueError(f"{cfg.architecture}: the config has no Mamba settings")
        self.cfg = cfg
        self.embeddings = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Mamba2Block(cfg, i) for i in range(cfg.num_layers))
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, self.embeddings if cfg.tie_word_embeddings else None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden_size]; positions are unused."""
        h = self.embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, meta)
        return self.norm_f(h).to(self.embeddings.weight.dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def kv_specs(self) -> list[LayerKVSpec]:
        return [layer.mixer.kv_spec() for layer in self.layers]

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        targets = {"backbone.embeddings.weight": self.embeddings.weight, "backbone.norm_f.weight": self.norm_f.weight}
        if not self.cfg.tie_word_embeddings:
            targets["lm_head.weight"] = self.lm_head.weight
        for i, layer in enumerate(self.layers):
            targets[f"backbone.layers.{i}.norm.weight"] = layer.norm.weight
            targets.update(mixer_weight_targets(f"backbone.layers.{i}.mixer.", layer.mixer))
        skip = skip_pattern(*tied_head(self.cfg.tie_word_embeddings))
        load_named(self.cfg.architecture, targets, named_tensors, skip)
