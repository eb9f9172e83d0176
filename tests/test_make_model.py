"""make_model writes checkpoints that both our loader and transformers read identically."""
from __future__ import annotations

import pytest
import torch

from kvtier.engine.attention.metadata import StepMetadata, build_attention_metadata
from kvtier.engine.kv_cache.binding import bind_kv_caches, model_groups
from kvtier.engine.make_model import EOS_ID, build_byte_level_tokenizer, make_model, model_config
from kvtier.engine.model_config import load_model_config
from kvtier.engine.model_loader import load_model
from kvtier.engine.tokenizer import load_tokenizer

TEXT = "Hello, wörld! Ünïcödé 中文 日本語 🙂 naïve café 42"


def _our_logits(model, cfg, ids: list[int]) -> torch.Tensor:
    block = 16
    blocks = list(range(1, 1 + -(-len(ids) // block)))[::-1]
    pool = torch.zeros(len(blocks) + 1, cfg.num_layers, 2, block, cfg.num_kv_heads, cfg.head_dim)
    bind_kv_caches(model, model_groups(model), [pool], "sdpa")
    meta = StepMetadata([build_attention_metadata([(0, len(ids), blocks)], block, torch.device("cpu"))])
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), meta))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_tiny_matches_transformers(tmp_path, arch):
    import transformers
    path = make_model(str(tmp_path), arch, "tiny", seed=3)
    model, cfg = load_model(path, torch.float32, "cpu")
    tok = load_tokenizer(path)
    ids = tok.encode(TEXT * 3)
    ours = _our_logits(model, cfg, ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    assert type(hf).__name__ == cfg.architecture
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-4
    # Greedy picks are well separated (the top two logits are not near-ties).
    top2 = ours.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).median().item() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tokenizer_round_trip(tmp_path, arch):
    path = make_model(str(tmp_path), arch, "tiny")
    tok = load_tokenizer(path)
    cfg = load_model_config(path)
    assert tok.vocab_size == cfg.vocab_size
    assert tok.eos_token_ids == (EOS_ID,) and cfg.eos_token_ids == (EOS_ID,)
    ids = tok.encode(TEXT)
    assert ids and ids[0] != tok.bos_token_id and max(ids) < cfg.vocab_size
    assert tok.decode(ids) == TEXT
    assert tok.token_to_id("<|eos|>") == EOS_ID


def test_incremental_detokenizer_splits_utf8(tmp_path):
    path = make_model(str(tmp_path), "llama", "tiny")
    tok = load_tokenizer(path)
    prompt = tok.encode("Say: ")
    ids = tok.encode(TEXT)
    detok = tok.detokenizer(prompt)
    pieces = [detok.add([i]) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == TEXT == detok.text
    assert not any("\ufffd" in p for p in pieces)
    # Some characters span several byte tokens: at least one step had to hold text back.
    assert "" in pieces[:-1]


def test_tokenizer_is_deterministic_and_exact_size():
    a = build_byte_level_tokenizer(700)
    b = build_byte_level_tokenizer(700)
    assert a.to_str() == b.to_str() and a.get_vocab_size() == 700
    assert [a.token_to_id(t) for t in ("<|pad|>", "<|bos|>", "<|eos|>")] == [0, 1, 2]
    with pytest.raises(ValueError, match="vocab_size"):
        build_byte_level_tokenizer(100)


def test_same_seed_same_weights(tmp_path):
    a = make_model(str(tmp_path / "a"), "qwen2", "tiny", seed=5)
    b = make_model(str(tmp_path / "b"), "qwen2", "tiny", seed=5)
    ma, _ = load_model(a, torch.float32, "cpu")
    mb, _ = load_model(b, torch.float32, "cpu")
    assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))


def _param_count(cfg: dict) -> int:
    h, i, v, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    per_layer += 2 * d if cfg["model_type"] == "qwen3" else 0
    per_layer += q + 2 * kv if cfg["model_type"] == "qwen2" else 0
    return v * h * (1 if cfg["tie_word_embeddings"] else 2) + cfg["num_hidden_layers"] * per_layer + h


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_small_size(arch):
    cfg = model_config(arch, "small")
    assert 50e6 <= _param_count(cfg) <= 100e6
    assert cfg["max_position_embeddings"] >= 8192 and cfg["num_key_value_heads"] < cfg["num_attention_heads"]


def test_small_loads(tmp_path):
    path = make_model(str(tmp_path), "qwen3", "small")
    model, cfg = load_model(path, torch.float32, "cpu")
    n = sum(p.numel() for p in model.parameters())
    assert n == _param_count(model_config("qwen3", "small"))
    logits = _our_logits(model, cfg, load_tokenizer(path).encode(TEXT))
    assert torch.isfinite(logits).all() and logits.shape[-1] == 32000
