"""config.json of Mamba2 and Granite-4.0-H-style hybrids (GraniteMoeHybrid) -> ModelArchConfig.

Both carry a Mamba2 mixer, spelled differently: Mamba2Config uses `num_heads`, `state_size`,
`conv_kernel`..., GraniteMoeHybridConfig uses `mamba_n_heads`, `mamba_d_state`,
`mamba_d_conv`... Both become one MambaConfig. Granite's per-layer `layer_types` (legacy
"mamba"/"attention" or transformers 5's "linear_attention"/"full_attention", also under the
older key `layers_block_type`) become `layer_kinds`.
"""
from __future__ import annotations

from kvtier.engine.model_config import (
    MambaConfig,
    ModelArchConfig,
    _int,
    _rope,
    special_token_ids,
)

# Mamba2 has no position limit; this is the context length the engine is told it may serve.
_SSM_MAX_POSITIONS = 131072
_KIND_NAMES = {"mamba": "mamba", "linear_attention": "mamba", "attention": "attention", "full_attention": "attention"}


def _number(cfg: dict, key: str, src: str, default: float) -> float:
    value = cfg.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{src}: field {key!r} must be a positive number, got {value!r}")
    return float(value)


def _json_float(v) -> float | None:
    """A JSON number, or transformers 5's spelling of a non-finite one ({"__float__": "Infinity"})."""
    if isinstance(v, dict) and set(v) == {"__float__"}:
        v = v["__float__"]
        return float(v) if v in ("Infinity", "-Infinity", "NaN") else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _time_step_limit(cfg: dict, src: str) -> tuple[float, float]:
    value = cfg.get("time_step_limit") or (0.0, float("inf"))
    bounds = [_json_float(v) for v in value] if isinstance(value, (list, tuple)) and len(value) == 2 else [None]
    if None in bounds or not bounds[0] <= bounds[1]:
        raise ValueError(f"{src}: field 'time_step_limit' must be [min, max], got {value!r}")
    return bounds[0], bounds[1]


def _mamba(cfg: dict, src: str, hidden: int, keys: dict[str, str], norm_eps: float) -> MambaConfig:
    """keys: our field name -> this config's key for it."""
    n_heads = _int(cfg, keys["n_heads"], src)
    expand = _int(cfg, keys["expand"], src, default=2)
    head_dim = cfg.get(keys["head_dim"], "auto")
    if head_dim == "auto":  # Granite's default: the inner size split evenly over the heads
        head_dim = expand * hidden // n_heads
    head_dim = _int({keys["head_dim"]: head_dim}, keys["head_dim"], src)
    if n_heads * head_dim != expand * hidden:
        raise ValueError(f"{src}: {keys['n_heads']} * {keys['head_dim']} ({n_heads * head_dim}) must equal "
                         f"{keys['expand']} * hidden_size ({expand * hidden})")
    n_groups = _int(cfg, keys["n_groups"], src, default=1)
    if n_heads % n_groups:
        raise ValueError(f"{src}: {keys['n_heads']} {n_heads} is not a multiple of {keys['n_groups']} {n_groups}")
    return MambaConfig(
        n_heads=n_heads, head_dim=head_dim, d_state=_int(cfg, keys["d_state"], src, default=128),
        n_groups=n_groups, d_conv=_int(cfg, keys["d_conv"], src, default=4), expand=expand,
        chunk_size=_int(cfg, keys["chunk_size"], src, default=256),
        conv_bias=bool(cfg.get(keys["conv_bias"], True)), proj_bias=bool(cfg.get(keys["proj_bias"], False)),
        time_step_limit=_time_step_limit(cfg, src), norm_eps=norm_eps,
    )


def _check_act(cfg: dict, src: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{src}: hidden_act {act!r} is not supported (only silu)")


def _parse_mamba2(cfg: dict, src: str) -> dict:
    hidden = _int(cfg, "hidden_size", src)
    num_layers = _int(cfg, "num_hidden_layers", src)
    eps = _number(cfg, "layer_norm_epsilon", src, 1e-5)
    keys = dict(n_heads="num_heads", head_dim="head_dim", d_state="state_size", n_groups="n_groups",
                d_conv="conv_kernel", expand="expand", chunk_size="chunk_size", conv_bias="use_conv_bias",
                proj_bias="use_bias")
    return dict(
        hidden_size=hidden, num_layers=num_layers, num_heads=0, num_kv_heads=0, head_dim=0, intermediate_size=0,
        rms_norm_eps=eps, mamba=_mamba(cfg, src, hidden, keys, eps), layer_kinds=("mamba",) * num_layers,
        max_position_embeddings=_int(cfg, "max_position_embeddings", src, default=_SSM_MAX_POSITIONS),
        layer_types=("linear_attention",) * num_layers,
        residual_in_fp32=bool(cfg.get("residual_in_fp32", True)), use_rope=False,
    )


def _granite_kinds(cfg: dict, num_layers: int, src: str) -> tuple[str, ...]:
    key = "layer_types" if cfg.get("layer_types") is not None else "layers_block_type"
    types = cfg.get(key)
    if types is None:
        return ("mamba",) * num_layers  # transformers' default
    if not isinstance(types, list) or len(types) != num_layers or any(t not in _KIND_NAMES for t in types):
        raise ValueError(f"{src}: field {key!r} must list {num_layers} of "
                         f"{sorted(_KIND_NAMES)}, got {types!r}")
    return tuple(_KIND_NAMES[t] for t in types)


def _parse_granite(cfg: dict, src: str) -> dict:
    experts = cfg.get("num_local_experts", 8)  # transformers' default is a MoE
    if experts:
        raise ValueError(f"{src}: field 'num_local_experts' is {experts!r}; only dense Granite hybrids "
                         "(num_local_experts: 0, shared MLP only) are supported")
    hidden = _int(cfg, "hidden_size", src)
    num_layers = _int(cfg, "num_hidden_layers", src)
    heads = _int(cfg, "num_attention_heads", src)
    kv_heads = _int(cfg, "num_key_value_heads", src, default=heads)
    if heads % kv_heads or hidden % heads:
        raise ValueError(f"{src}: num_attention_heads {heads} must divide hidden_size {hidden} and be a "
                         f"multiple of num_key_value_heads {kv_heads}")
    pos = cfg.get("position_embedding_type")
    if pos not in (None, "nope", "rope"):
        raise ValueError(f"{src}: field 'position_embedding_type' {pos!r} is not supported (rope, nope or null)")
    max_pos = _int(cfg, "max_position_embeddings", src, default=2048)
    theta, rope_type, scaling = _rope(cfg, src, max_pos)
    eps = _number(cfg, "rms_norm_eps", src, 1e-6)
    keys = {name: f"mamba_{name}" for name in ("n_heads", "d_state", "n_groups", "d_conv", "expand", "chunk_size",
                                                "conv_bias", "proj_bias")}
    keys["head_dim"] = "mamba_d_head"
    kinds = _granite_kinds(cfg, num_layers, src)
    bias = bool(cfg.get("attention_bias", False))
    return dict(
        hidden_size=hidden, num_layers=num_layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads,
        intermediate_size=_int(cfg, "shared_intermediate_size", src, default=1024), rms_norm_eps=eps,
        rope_theta=theta, rope_type=rope_type, rope_scaling=scaling, attention_bias=bias, o_proj_bias=bias,
        max_position_embeddings=max_pos, layer_kinds=kinds,
        layer_types=tuple("full_attention" if k == "attention" else "linear_attention" for k in kinds),
        mamba=_mamba(cfg, src, hidden, keys, eps) if "mamba" in kinds else None,
        embedding_multiplier=_number(cfg, "embedding_multiplier", src, 1.0),
        residual_multiplier=_number(cfg, "residual_multiplier", src, 1.0),
        attention_multiplier=_number(cfg, "attention_multiplier", src, 1.0),
        logits_scaling=_number(cfg, "logits_scaling", src, 1.0),
        use_rope=pos == "rope",
    )


def parse_hybrid_config(cfg: dict, arch: str, model_type: str, path: str, src: str) -> ModelArchConfig:
    _check_act(cfg, src)
    fields = _parse_mamba2(cfg, src) if arch == "Mamba2ForCausalLM" else _parse_granite(cfg, src)
    bos, eos = special_token_ids(cfg, path, src)
    return ModelArchConfig(
        architecture=arch, model_type=model_type, vocab_size=_int(cfg, "vocab_size", src),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), bos_token_id=bos, eos_token_ids=eos,
        dtype=cfg.get("dtype", cfg.get("torch_dtype")), **fields,
    )
