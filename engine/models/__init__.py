"""Model registry: HF `architectures` name -> implementation class."""
from __future__ import annotations

from torch import nn

from kvtier.engine.models.granite_hybrid import GraniteMoeHybridForCausalLM
from kvtier.engine.models.llama import LlamaForCausalLM
from kvtier.engine.models.mamba2 import Mamba2ForCausalLM

# Mistral, Qwen2 and Qwen3 are Llama with switches read from ModelArchConfig.
MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Mamba2ForCausalLM": Mamba2ForCausalLM,
    "GraniteMoeHybridForCausalLM": GraniteMoeHybridForCausalLM,  # dense (no experts) only
}


def get_model_class(arch: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[arch]
    except KeyError:
        raise ValueError(
            f"architecture {arch!r} is not supported; supported: {', '.join(sorted(MODEL_REGISTRY))}"
        ) from None
