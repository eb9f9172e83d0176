"""Our Llama-family model, run through the paged KV pool, against transformers on random weights.

Each schedule is a list of engine steps; a step computes some new tokens of several sequences
as one flat batch (prefills, prefix-cached chunks and single-token decodes mixed), the way the
model runner will. The logits of every token must match HF's full-sequence forward.
"""
from __future__ import annotations

import pytest
import torch

from hf_checkpoints import VARIANTS, load_hf_model, make_variant
from kvtier.engine.attention.metadata import StepMetadata, build_attention_metadata
from kvtier.engine.kv_cache.binding import bind_kv_caches, model_groups
from kvtier.engine.model_loader import load_model


BLOCK = 16
LENGTHS = [1, 17, 40, 130, 20]
TOL = 1e-4

# step = [(sequence index, new tokens)]; each schedule ends with every sequence complete.
SCHEDULES = {
    "prefill": [[(0, 1), (1, 17), (2, 40), (3, 130), (4, 20)]],
    "two_chunks": [
        [(0, 1), (1, 10), (2, 23), (3, 64), (4, 5)],
        [(1, 7), (2, 17), (3, 66), (4, 15)],
    ],
    "decode": [  # decodes batch together; step 3 mixes them with a fresh prefill
        [(1, 14), (2, 37), (3, 127)],
        [(0, 1), (1, 1), (2, 1), (3, 1)],
        [(1, 1), (2, 1), (3, 1), (4, 20)],
        [(1, 1), (2, 1), (3, 1)],
    ],
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    """(our model, its config, token sequences, HF logits per sequence, HF model)."""
    path = make_variant(tmp_path_factory.mktemp(request.param), request.param)
    model, cfg = load_model(path, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, cfg.vocab_size, (n,), generator=gen) for n in LENGTHS]
    hf = load_hf_model(path)
    with torch.no_grad():
        hf_logits = [hf(input_ids=s[None]).logits[0].float() for s in seqs]
    return model, cfg, seqs, hf_logits, hf


def run_schedule(model, cfg, seqs, schedule, backend: str) -> tuple[list[torch.Tensor], bool]:
    """Run the steps through a zeroed page-first pool with shuffled, non-contiguous blocks."""
    per_seq = [-(-len(s) // BLOCK) for s in seqs]
    num_blocks = sum(per_seq) + 7
    order = (torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(2)) + 1).tolist()
    tables, start = [], 0
    for n in per_seq:
        tables.append(order[start : start + n])
        start += n
    pool = torch.zeros(num_blocks, cfg.num_layers, 2, BLOCK, cfg.num_kv_heads, cfg.head_dim)
    bind_kv_caches(model, model_groups(model), [pool], backend)
    done = [0] * len(seqs)
    used_decode_batch = False
    out: list[list[torch.Tensor]] = [[] for _ in seqs]
    for step in schedule:
        ids, pos, specs = [], [], []
        for i, n in step:
            ids.append(seqs[i][done[i] : done[i] + n])
            pos.append(torch.arange(done[i], done[i] + n))
            specs.append((done[i], n, tables[i]))
        meta = build_attention_metadata(specs, BLOCK, torch.device("cpu"))
        used_decode_batch |= bool(meta.decodes)
        meta = StepMetadata([meta])
        with torch.inference_mode():
            logits = model.compute_logits(model(torch.cat(ids), torch.cat(pos), meta))
        row = 0
        for i, n in step:
            out[i].append(logits[row : row + n])
            row += n
            done[i] += n
    if done != [len(s) for s in seqs]:
        raise RuntimeError(f"schedule leaves sequences incomplete: {done}")
    return [torch.cat(chunks) for chunks in out], used_decode_batch


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_logits_match_hf(variant, backend, schedule):
    model, cfg, seqs, hf_logits, _hf = variant
    ours, used_decode_batch = run_schedule(model, cfg, seqs, SCHEDULES[schedule], backend)
    # The decode schedule must reach the batched decode fast path, not only per-sequence.
    assert used_decode_batch == (schedule == "decode")
    for i, (a, b) in enumerate(zip(ours, hf_logits)):
        assert a.dtype == torch.float32 and a.shape == b.shape
        diff = (a - b).abs().max().item()
        assert diff <= TOL, f"sequence {i} (len {len(seqs[i])}): max |diff| {diff:.2e}"


def test_rotary_inv_freq_matches_hf(variant):
    model, _cfg, _seqs, _logits, hf = variant
    assert torch.equal(model.rotary.inv_freq.cpu(), hf.model.rotary_emb.inv_freq.cpu())
