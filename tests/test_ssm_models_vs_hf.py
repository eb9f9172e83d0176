"""Our Mamba2 and Granite-hybrid models against transformers on random weights.

Each schedule is a list of engine steps run as flat varlen batches, the way the model runner
runs them: Mamba layers read and write state slots (SsmMetadata), attention layers the paged
KV pool (AttentionMetadata). The logits of every token must match HF's full-sequence forward.
"""
from __future__ import annotations

import pytest
import torch

from hf_checkpoints import SSM_VARIANTS, load_hf_model, make_variant
from kvtier.engine.attention.metadata import StepMetadata, build_attention_metadata
from kvtier.engine.attention.ssm_metadata import NO_SLOT, SsmSeq, build_ssm_metadata
from kvtier.engine.kv_cache.specs import MambaSpec, group_layers
from kvtier.engine.model_loader import load_model

BLOCK = 16
NUM_BLOCKS = 24
NUM_SLOTS = 12
CKPT_SLOT, RESTART_SLOT, RESTART_CKPT_SLOT = 8, 9, 10
LENGTHS = [1, 23, 40, 9]
TOL = 1e-4

# step = [(sequence index, new tokens)]; each schedule ends with every sequence complete.
SCHEDULES = {
    "prefill": [[(0, 1), (1, 23), (2, 40), (3, 9)]],
    "two_chunks": [[(0, 1), (1, 10), (2, 21), (3, 4)], [(1, 13), (2, 19), (3, 5)]],
    "decode": [  # single-token steps of continuing sequences run as one batched recurrent update
        [(1, 20), (2, 37), (3, 8)],
        [(0, 1), (1, 1), (2, 1), (3, 1)],
        [(1, 1), (2, 1)],
        [(1, 1), (2, 1)],
    ],
}


class Cache:
    """The pools of every KV group, bound to the model, and per-sequence block tables."""

    def __init__(self, model):
        self.groups = group_layers(model.kv_specs())
        self.pools = [
            torch.zeros(NUM_SLOTS, len(g.layers), g.spec.numel) if isinstance(g.spec, MambaSpec)
            else torch.zeros(NUM_BLOCKS, *g.block_shape(BLOCK))
            for g in self.groups
        ]
        where = {layer: (g.index, i) for g in self.groups for i, layer in enumerate(g.layers)}
        for m in model.modules():
            if callable(getattr(m, "bind_cache", None)):
                g, i = where[m.layer_idx]
                m.bind_cache(self.pools[g], g, i, "sdpa")
        order = torch.randperm(NUM_BLOCKS - 1, generator=torch.Generator().manual_seed(2)) + 1
        self.free = order.tolist()  # shuffled, non-contiguous block tables

    def blocks(self, n: int) -> list[int]:
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def metadata(self, rows: list[dict]) -> StepMetadata:
        """rows: per sequence {computed, new, table, init, live, checkpoints}, in batch order."""
        groups, q_start = [], 0
        ssm_seqs = []
        for r in rows:
            ssm_seqs.append(SsmSeq(q_start, r["new"], r["init"], r["live"], r.get("checkpoints", [])))
            q_start += r["new"]
        for g in self.groups:
            if isinstance(g.spec, MambaSpec):
                groups.append(build_ssm_metadata(ssm_seqs, torch.device("cpu")))
            else:
                specs = [(r["computed"], r["new"], r["table"]) for r in rows]
                groups.append(build_attention_metadata(specs, BLOCK, torch.device("cpu")))
        return StepMetadata(groups=groups)


@pytest.fixture(scope="module", params=sorted(SSM_VARIANTS))
def variant(request, tmp_path_factory):
    """(our model, its config, token sequences, HF logits per sequence)."""
    path = make_variant(tmp_path_factory.mktemp(request.param), request.param)
    model, cfg = load_model(path, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, cfg.vocab_size, (n,), generator=gen) for n in LENGTHS]
    hf = load_hf_model(path)
    with torch.no_grad():
        hf_logits = [hf(input_ids=s[None], use_cache=False).logits[0].float() for s in seqs]
    return model, cfg, seqs, hf_logits


def _forward(model, seqs, cache: Cache, rows: list[dict]) -> torch.Tensor:
    ids = torch.cat([seqs[r["seq"]][r["computed"] : r["computed"] + r["new"]] for r in rows])
    pos = torch.cat([torch.arange(r["computed"], r["computed"] + r["new"]) for r in rows])
    meta = cache.metadata(rows)
    with torch.inference_mode():
        return model.compute_logits(model(ids, pos, meta))


def run_schedule(model, seqs, schedule, checkpoint=None):
    """Run the steps; `checkpoint` = (seq, n): also save that sequence's state after n tokens."""
    cache = Cache(model)
    tables = [cache.blocks(-(-len(s) // BLOCK)) for s in seqs]
    done = [0] * len(seqs)
    out: list[list[torch.Tensor]] = [[] for _ in seqs]
    decode_batches = 0
    for step in schedule:
        rows = []
        for i, n in step:
            ckpts = []
            if checkpoint and checkpoint[0] == i and done[i] < checkpoint[1] <= done[i] + n:
                ckpts = [(checkpoint[1] - done[i], CKPT_SLOT)]
            rows.append(dict(seq=i, computed=done[i], new=n, table=tables[i], live=i + 1,
                             init=i + 1 if done[i] else NO_SLOT, checkpoints=ckpts))
        decode_batches += sum(r["new"] == 1 and r["init"] != NO_SLOT for r in rows) > 1
        logits = _forward(model, seqs, cache, rows)
        row = 0
        for i, n in step:
            out[i].append(logits[row : row + n])
            row += n
            done[i] += n
    if done != [len(s) for s in seqs]:
        raise RuntimeError(f"schedule leaves sequences incomplete: {done}")
    return [torch.cat(chunks) for chunks in out], decode_batches, cache, tables


def _assert_close(ours, theirs, what):
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape, what
    diff = (ours - theirs).abs().max().item()
    assert diff <= TOL, f"{what}: max |diff| {diff:.2e}"


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_logits_match_hf(variant, schedule):
    model, _cfg, seqs, hf_logits = variant
    ours, decode_batches, _, _ = run_schedule(model, seqs, SCHEDULES[schedule])
    assert (decode_batches > 0) == (schedule == "decode")
    for i, (a, b) in enumerate(zip(ours, hf_logits)):
        _assert_close(a, b, f"sequence {i} (len {len(seqs[i])})")


def test_restart_from_checkpoint(variant):
    """A sequence's state saved mid-prefill (not at a chunk boundary of the step) seeds a new
    sequence with the same prefix: its attention layers reuse the prefix's first KV block."""
    model, _cfg, seqs, hf_logits = variant
    _, _, cache, tables = run_schedule(model, seqs, SCHEDULES["prefill"], checkpoint=(2, BLOCK))
    saved = cache.pools[0].clone()
    table = tables[2][:1] + cache.blocks(2)
    # The restart continues from 16 tokens in one chunk and checkpoints again part-way; a
    # decode of sequence 1 restarting from the new checkpoint joins in the next step.
    rows = [dict(seq=2, computed=BLOCK, new=20, table=table, init=CKPT_SLOT, live=RESTART_SLOT,
                 checkpoints=[(7, RESTART_CKPT_SLOT)])]
    logits = _forward(model, seqs, cache, rows)
    _assert_close(logits, hf_logits[2][BLOCK:36], "restart from checkpoint")
    if isinstance(cache.groups[0].spec, MambaSpec):  # the checkpoint slot was only read
        assert torch.equal(cache.pools[0][CKPT_SLOT], saved[CKPT_SLOT])
    rows = [dict(seq=2, computed=36, new=1, table=table, init=RESTART_SLOT, live=RESTART_SLOT),
            dict(seq=2, computed=23, new=1, table=table, init=RESTART_CKPT_SLOT, live=CKPT_SLOT)]
    logits = _forward(model, seqs, cache, rows)
    _assert_close(logits[:1], hf_logits[2][36:37], "decode after restart")
    _assert_close(logits[1:], hf_logits[2][23:24], "decode from a mid-chunk checkpoint")


@pytest.mark.parametrize("bad, field", [
    (dict(num_local_experts=4), "num_local_experts"),
    (dict(layer_types=["mamba", "cross_attention"]), "layer_types"),
    (dict(position_embedding_type="alibi"), "position_embedding_type"),
    (dict(time_step_limit=[0.5, 0.1]), "time_step_limit"),
    (dict(mamba_d_head=12), "mamba_n_heads"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_granite_config_rejects(tmp_path, bad, field):
    import json

    from kvtier.engine.model_config import load_model_config

    cfg = dict(architectures=["GraniteMoeHybridForCausalLM"], model_type="granitemoehybrid", vocab_size=100,
               hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_local_experts=0,
               layer_types=["mamba", "attention"], mamba_n_heads=8, mamba_d_state=16)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **bad}))
    with pytest.raises(ValueError, match=rf"config\.json.*{field}"):
        load_model_config(str(tmp_path))
    if field == "num_local_experts":  # the valid config parses
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        parsed = load_model_config(str(tmp_path))
        assert parsed.layer_kinds == ("mamba", "attention") and parsed.mamba.head_dim == 16


@pytest.mark.parametrize("arch", ["mamba2", "granite-hybrid"])
def test_make_model_tiny_matches_transformers(tmp_path, arch):
    """make_model's checkpoints load identically here and in transformers, with finite logits
    and greedy picks far from ties."""
    from kvtier.engine.make_model import make_model

    path = make_model(str(tmp_path), arch, "tiny", seed=3)
    model, cfg = load_model(path, torch.float32, "cpu")
    ids = torch.randint(3, cfg.vocab_size, (50,), generator=torch.Generator().manual_seed(4))
    cache = Cache(model)
    table = cache.blocks(-(-len(ids) // BLOCK))
    ours = _forward(model, [ids], cache, [dict(seq=0, computed=0, new=len(ids), table=table, init=NO_SLOT, live=1)])
    hf = load_hf_model(path)
    assert type(hf).__name__ == cfg.architecture
    with torch.no_grad():
        ref = hf(input_ids=ids[None], use_cache=False).logits[0]
    _assert_close(ours, ref, arch)
    assert torch.isfinite(ours).all()
    top2 = ours.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).median().item() > 1e-3
