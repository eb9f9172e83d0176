"""Config parsing, weight loading errors, and the weights fingerprint."""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvtier.engine.make_model import make_model
from kvtier.engine.model_config import load_model_config
from kvtier.engine.model_loader import load_model, weights_fingerprint
from kvtier.engine.models import get_model_class
from kvtier.engine.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_model(str(tmp_path_factory.mktemp("tiny")), "llama", "tiny", seed=0)


@pytest.fixture
def copy(tiny, tmp_path) -> str:
    dst = str(tmp_path / "model")
    shutil.copytree(tiny, dst)
    return dst


def _edit_config(path: str, **changes) -> None:
    file = os.path.join(path, "config.json")
    with open(file) as f:
        cfg = json.load(f)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with open(file, "w") as f:
        json.dump(cfg, f)


def _edit_weights(path: str, edit) -> None:
    file = os.path.join(path, "model.safetensors")
    sd = load_file(file)
    edit(sd)
    save_file(sd, file)


def test_unknown_architecture(copy):
    _edit_config(copy, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError, match=r"config\.json.*GPT2LMHeadModel"):
        load_model(copy, torch.float32, "cpu")
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        get_model_class("GPT2LMHeadModel")


def test_missing_config(copy):
    os.remove(os.path.join(copy, "config.json"))
    with pytest.raises(ValueError, match=r"config\.json"):
        load_model(copy, torch.float32, "cpu")


def test_missing_weights(copy):
    os.remove(os.path.join(copy, "model.safetensors"))
    with pytest.raises(ValueError, match=rf"{re.escape(copy)}.*safetensors"):
        load_model(copy, torch.float32, "cpu")


def test_wrong_shape(copy):
    name = "model.layers.1.mlp.down_proj.weight"
    _edit_weights(copy, lambda sd: sd.__setitem__(name, torch.zeros(3, 3)))
    with pytest.raises(ValueError, match=rf"model\.safetensors.*{name}.*\(3, 3\)"):
        load_model(copy, torch.float32, "cpu")


def test_unexpected_tensor(copy):
    _edit_weights(copy, lambda sd: sd.__setitem__("model.layers.0.mystery.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"model\.safetensors.*model\.layers\.0\.mystery\.weight"):
        load_model(copy, torch.float32, "cpu")


def test_missing_tensor(copy):
    _edit_weights(copy, lambda sd: sd.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.0\.self_attn\.k_proj\.weight"):
        load_model(copy, torch.float32, "cpu")


def test_sharded_checkpoint_loads(copy, tiny):
    """Two shards + index.json; a stray consolidated file is ignored thanks to the index."""
    sd = load_file(os.path.join(copy, "model.safetensors"))
    os.remove(os.path.join(copy, "model.safetensors"))
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: sd[k] for k in keys}, os.path.join(copy, file))
        weight_map.update({k: file for k in keys})
    with open(os.path.join(copy, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    save_file({"tok_embeddings.weight": torch.zeros(2)}, os.path.join(copy, "consolidated.safetensors"))
    ours, _ = load_model(copy, torch.float32, "cpu")
    ref, _ = load_model(tiny, torch.float32, "cpu")
    for (n, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n


def test_load_in_bfloat16(tiny):
    model, _ = load_model(tiny, torch.bfloat16, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rotary.inv_freq.dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32  # the loader restored the default


def test_fingerprint(tmp_path, tiny):
    a = weights_fingerprint(tiny)
    assert a == weights_fingerprint(tiny) and len(a) == 64 and int(a, 16) >= 0
    other = make_model(str(tmp_path / "seed1"), "llama", "tiny", seed=1)
    assert weights_fingerprint(other) != a


def test_fingerprint_sees_a_changed_config(copy, tiny):
    _edit_config(copy, rms_norm_eps=1e-5)
    assert weights_fingerprint(copy) != weights_fingerprint(tiny)


# -- config parsing ------------------------------------------------------------------------------


def _write_config(tmp_path, **cfg) -> str:
    base = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=100, hidden_size=64,
                num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    (tmp_path / "config.json").write_text(json.dumps({**base, **cfg}))
    return str(tmp_path)


def test_config_defaults_and_eos_list(tmp_path):
    p = _write_config(tmp_path, eos_token_id=[5, 6], bos_token_id=4)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 5]}))
    cfg = load_model_config(p)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.rope_type) == (4, 16, 10000.0, "default")
    assert cfg.eos_token_ids == (7, 5, 6) and cfg.bos_token_id == 4 and not cfg.tie_word_embeddings


def test_config_legacy_and_v5_rope_agree(tmp_path):
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    legacy_rope = dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **scaling})
    v5_rope = dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **scaling})
    legacy = load_model_config(_write_config(tmp_path / "a", **legacy_rope))
    v5 = load_model_config(_write_config(tmp_path / "b", **v5_rope))
    assert legacy == v5 and legacy.rope_type == "llama3" and legacy.rope_theta == 500000.0


@pytest.mark.parametrize("bad, field", [
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope_type"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "rope_type"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(hidden_size=None), "hidden_size"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
])
def test_config_rejects(tmp_path, bad, field):
    p = _write_config(tmp_path)
    _edit_config(p, **bad)
    with pytest.raises(ValueError, match=rf"config\.json.*{field}"):
        load_model_config(p)


def test_config_model_specific_switches(tmp_path):
    for name, extra in {
        "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False,
                      sliding_window=32768, max_window_layers=28),
        "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=128, attention_bias=False,
                      use_sliding_window=True, sliding_window=4096, max_window_layers=1),
        "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096,
                        max_position_embeddings=32768),
    }.items():
        (tmp_path / name).mkdir()
        cfg = load_model_config(_write_config(tmp_path / name, **extra))
        if name == "qwen2":
            assert cfg.attention_bias and not cfg.o_proj_bias and cfg.sliding_window is None
        if name == "qwen3":
            assert cfg.qk_norm and cfg.head_dim == 128 and cfg.sliding_window == 4096
            assert cfg.layer_types == ("full_attention", "sliding_attention")
        if name == "mistral":
            # Real sliding-window attention: the window no longer caps the context.
            assert cfg.sliding_window == 4096 and cfg.max_model_len_limit == cfg.max_position_embeddings > 4096


def test_tokenizer_absent_and_corrupt(copy):
    os.remove(os.path.join(copy, "tokenizer.json"))
    assert load_tokenizer(copy) is None
    with open(os.path.join(copy, "tokenizer.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        load_tokenizer(copy)
