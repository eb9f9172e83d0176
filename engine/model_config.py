"""The architecture of a Hugging Face checkpoint, parsed once from its `config.json`.

The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) differs in a few switches (q/k/v bias,
per-head q/k norm, RoPE scaling, tied embeddings, sliding window), which this module turns
into explicit fields so the model code never reads raw JSON. Mamba2 and Granite-4.0-H-style
hybrids (Mamba2 + attention layers) are parsed in model_config_hybrid.py into the same
dataclass, with a `mamba` sub-config and per-layer `layer_kinds`.

Both spellings of RoPE settings are accepted: the legacy top-level `rope_theta` + `rope_scaling`
(transformers 4 and most checkpoints on the Hub) and transformers 5's `rope_parameters` dict.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

# architecture -> model_type, used when `architectures` is absent or to check consistency.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Mamba2ForCausalLM": "mamba2",
    "GraniteMoeHybridForCausalLM": "granitemoehybrid",
}
HYBRID_ARCHITECTURES = ("Mamba2ForCausalLM", "GraniteMoeHybridForCausalLM")
_ARCH_BY_MODEL_TYPE = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_DEFAULT_ROPE_THETA = 10000.0
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class MambaConfig:
    """The Mamba2 mixer of every "mamba" layer (HF Mamba2Config / GraniteMoeHybrid mamba_* fields)."""

    n_heads: int
    head_dim: int
    d_state: int
    n_groups: int  # B and C are shared by n_heads // n_groups consecutive heads; also the gated-norm groups
    d_conv: int  # causal conv kernel; the conv state keeps d_conv - 1 inputs
    expand: int  # inner size = expand * hidden_size = n_heads * head_dim
    chunk_size: int  # SSD chunk length of the prefill scan
    conv_bias: bool = True
    proj_bias: bool = False  # in_proj / out_proj bias
    time_step_limit: tuple[float, float] = (0.0, float("inf"))  # dt is clamped to this range
    norm_eps: float = 1e-5  # the gated RMSNorm inside the mixer

    @property
    def inner_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.inner_size + 2 * self.n_groups * self.d_state


@dataclass
class ModelArchConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    # Attention shape; 0 for a model without attention layers (Mamba2).
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP (Granite: shared_intermediate_size); 0 when there is none
    rms_norm_eps: float = 1e-6
    rope_theta: float = _DEFAULT_ROPE_THETA
    rope_type: str = "default"
    # Parameters of the scaled RoPE variants: `factor` (linear, llama3), `low_freq_factor`,
    # `high_freq_factor`, `original_max_position_embeddings` (llama3). Empty for default.
    rope_scaling: dict[str, float] = field(default_factory=dict)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections have a bias
    o_proj_bias: bool = False  # output projection has a bias (Llama/Qwen3 attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE
    max_position_embeddings: int = 2048
    # Window of the sliding-window layers, None when every layer attends to the full context.
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    hidden_act: str = "silu"
    dtype: str | None = None  # the checkpoint's stored dtype, informational
    # Per layer: "attention" or "mamba" (the Llama family is all "attention"). For hybrids,
    # layer_types says "full_attention" or "linear_attention" (transformers 5's name for Mamba).
    layer_kinds: tuple[str, ...] = ()
    mamba: MambaConfig | None = None  # set when any layer is "mamba"
    # Granite multipliers: embeddings *= embedding_multiplier; each residual branch is scaled by
    # residual_multiplier; attention_multiplier replaces head_dim**-0.5 as the softmax scale
    # (None: the usual scale); logits are divided by logits_scaling.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    use_rope: bool = True  # Granite "nope": attention without positional embedding
    residual_in_fp32: bool = False  # Mamba2: the residual stream is kept in float32

    @property
    def attention_scale(self) -> float:
        return self.attention_multiplier if self.attention_multiplier is not None else self.head_dim**-0.5

    @property
    def max_model_len_limit(self) -> int:
        """Longest context the engine serves: sliding-window layers attend over their window
        at any length, and Mamba layers have no length limit of their own."""
        return self.max_position_embeddings


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _int(cfg: dict, key: str, src: str, default=None) -> int:
    value = cfg.get(key, default)
    if value is None:
        raise ValueError(f"{src}: required field {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{src}: field {key!r} must be a positive integer, got {value!r}")
    return value


def _token_ids(value, key: str, src: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{src}: field {key!r} must be an int or a list of ints, got {value!r}")
    return values


def _architecture(cfg: dict, src: str) -> tuple[str, str]:
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    supported = [a for a in archs if a in SUPPORTED_ARCHITECTURES]
    if supported:
        arch = supported[0]
    elif not archs and model_type in _ARCH_BY_MODEL_TYPE:
        arch = _ARCH_BY_MODEL_TYPE[model_type]
    else:
        raise ValueError(
            f"{src}: architectures {archs!r} (model_type {model_type!r}) not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch, SUPPORTED_ARCHITECTURES[arch]


def _rope(cfg: dict, src: str, max_pos: int) -> tuple[float, str, dict[str, float]]:
    """(theta, type, scaling params) from either the legacy or the transformers-5 keys."""
    params = cfg.get("rope_parameters")
    key = "rope_parameters"
    if isinstance(params, dict) and params and set(params) <= set(_LAYER_TYPES):
        # Nested per layer type: fine only when every layer type uses the same RoPE.
        distinct = {json.dumps(p, sort_keys=True) for p in params.values()}
        if len(distinct) != 1:
            raise ValueError(f"{src}: per-layer-type {key} with different values are not supported")
        params = next(iter(params.values()))
    if not params:
        params, key = cfg.get("rope_scaling") or {}, "rope_scaling"
    if not isinstance(params, dict):
        raise ValueError(f"{src}: field {key!r} must be an object, got {params!r}")
    theta = params.get("rope_theta", cfg.get("rope_theta", _DEFAULT_ROPE_THETA))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ValueError(f"{src}: rope_theta must be a positive number, got {theta!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{src}: {key}.rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"{src}: partial_rotary_factor {partial!r} is not supported (only 1.0)")
    needed = {"default": (), "linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
    scaling: dict[str, float] = {}
    for name in needed[rope_type]:
        if not isinstance(params.get(name), (int, float)) or isinstance(params.get(name), bool):
            raise ValueError(f"{src}: {key}.{name} is required for rope_type {rope_type!r}")
        scaling[name] = float(params[name])
    if rope_type == "llama3":
        orig = params.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings", max_pos))
        scaling["original_max_position_embeddings"] = float(orig)
        if scaling["high_freq_factor"] == scaling["low_freq_factor"]:
            raise ValueError(f"{src}: {key}.high_freq_factor must differ from low_freq_factor")
    return float(theta), rope_type, scaling


def _sliding(cfg: dict, model_type: str, num_layers: int, src: str) -> tuple[int | None, tuple[str, ...]]:
    """(window, per-layer types). Mirrors transformers: Qwen ignores `sliding_window` unless
    `use_sliding_window`, and then only layers >= `max_window_layers` slide."""
    window = cfg.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        window = None
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise ValueError(f"{src}: field 'sliding_window' must be a positive integer or null, got {window!r}")
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        if window is None:
            layer_types = ["full_attention"] * num_layers
        elif model_type in ("qwen2", "qwen3"):
            first = cfg.get("max_window_layers", 0)
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
        else:
            layer_types = ["sliding_attention"] * num_layers
    if len(layer_types) != num_layers or any(t not in _LAYER_TYPES for t in layer_types):
        raise ValueError(f"{src}: field 'layer_types' must list {num_layers} of {_LAYER_TYPES}, got {layer_types!r}")
    if window is None or "sliding_attention" not in layer_types:
        return None, tuple("full_attention" for _ in layer_types)
    return window, tuple(layer_types)


def load_model_config(path: str) -> ModelArchConfig:
    """Parse `<path>/config.json` (and `generation_config.json` for eos ids) of a HF checkpoint."""
    src = os.path.join(path, "config.json")
    if not os.path.isfile(src):
        raise ValueError(f"{src}: not found; a model directory needs a Hugging Face config.json")
    cfg = _read_json(src)
    arch, model_type = _architecture(cfg, src)
    if arch in HYBRID_ARCHITECTURES:
        from kvtier.engine.model_config_hybrid import parse_hybrid_config  # it imports this module

        return parse_hybrid_config(cfg, arch, model_type, path, src)

    hidden = _int(cfg, "hidden_size", src)
    heads = _int(cfg, "num_attention_heads", src)
    kv_heads = _int(cfg, "num_key_value_heads", src, default=heads)
    if heads % kv_heads:
        raise ValueError(f"{src}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ValueError(f"{src}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        head_dim = hidden // heads
    head_dim = _int({"head_dim": head_dim}, "head_dim", src)
    if head_dim % 2:
        raise ValueError(f"{src}: head_dim {head_dim} must be even for RoPE")
    num_layers = _int(cfg, "num_hidden_layers", src)
    max_pos = _int(cfg, "max_position_embeddings", src, default=2048)

    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{src}: hidden_act {act!r} is not supported (only silu)")
    theta, rope_type, scaling = _rope(cfg, src, max_pos)
    window, layer_types = _sliding(cfg, model_type, num_layers, src)

    attn_bias = bool(cfg.get("attention_bias", False))
    # Qwen2 always has q/k/v bias (no config key), and never an o_proj bias.
    qkv_bias = True if model_type == "qwen2" else attn_bias
    o_bias = attn_bias if model_type in ("llama", "qwen3") else False

    bos, eos = special_token_ids(cfg, path, src)
    return ModelArchConfig(
        architecture=arch,
        model_type=model_type,
        vocab_size=_int(cfg, "vocab_size", src),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=_int(cfg, "intermediate_size", src),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_type=rope_type,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        o_proj_bias=o_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3",
        max_position_embeddings=max_pos,
        sliding_window=window,
        layer_types=layer_types,
        bos_token_id=bos,
        eos_token_ids=eos,
        hidden_act="silu",
        dtype=cfg.get("dtype", cfg.get("torch_dtype")),
        layer_kinds=("attention",) * num_layers,
    )


def special_token_ids(cfg: dict, path: str, src: str) -> tuple[int | None, tuple[int, ...]]:
    """(bos id, eos ids) from config.json, overridden/extended by generation_config.json."""
    bos = _token_ids(cfg.get("bos_token_id"), "bos_token_id", src)
    eos = _token_ids(cfg.get("eos_token_id"), "eos_token_id", src)
    gen_src = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_src):
        gen = _read_json(gen_src)
        bos = _token_ids(gen.get("bos_token_id"), "bos_token_id", gen_src) or bos
        # Generation config lists the stop tokens the model was tuned with; keep both sets.
        eos = _token_ids(gen.get("eos_token_id"), "eos_token_id", gen_src) + eos
    return (bos[0] if bos else None), tuple(dict.fromkeys(eos))
