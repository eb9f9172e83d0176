"""The Mamba2 mixer's chunked (SSD) scan and its slot handling against the token-by-token recurrence."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvtier.engine.attention.ssm_metadata import NO_SLOT, SsmSeq, build_ssm_metadata
from kvtier.engine.layers.mamba2 import Mamba2Mixer, chunked_scan, recurrent_scan
from kvtier.engine.model_config import MambaConfig

TOL = 2e-5
HEADS, P, N, GROUPS = 4, 8, 6, 2


def _inputs(length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(length, HEADS, P, generator=g)
    dt = torch.rand(length, HEADS, generator=g) * 0.3 + 0.01
    A = -torch.rand(HEADS, generator=g) * 4 - 0.5
    B = torch.randn(length, GROUPS, N, generator=g)
    C = torch.randn(length, GROUPS, N, generator=g)
    state = torch.randn(HEADS, P, N, generator=g)
    return x, dt, A, B, C, state


@pytest.mark.parametrize("length", [1, 7, 8, 16, 21, 40])
@pytest.mark.parametrize("zero_state", [True, False])
def test_chunked_scan_matches_recurrence(length, zero_state):
    x, dt, A, B, C, state = _inputs(length, seed=length)
    if zero_state:
        state = torch.zeros_like(state)
    y, final = chunked_scan(x, dt, A, B, C, 8, state)
    y_ref, final_ref = recurrent_scan(x, dt, A, B, C, state)
    assert (y - y_ref).abs().max() <= TOL
    assert (final - final_ref).abs().max() <= TOL


def test_chunked_scan_split_anywhere_equals_whole():
    x, dt, A, B, C, state = _inputs(30, seed=5)
    whole, final = chunked_scan(x, dt, A, B, C, 8, state)
    first, mid = chunked_scan(x[:11], dt[:11], A, B[:11], C[:11], 8, state)
    second, end = chunked_scan(x[11:], dt[11:], A, B[11:], C[11:], 8, mid)
    assert (torch.cat([first, second]) - whole).abs().max() <= TOL
    assert (end - final).abs().max() <= TOL


# -- the layer: slots, checkpoints, decode ---------------------------------------------------------

HIDDEN = 16
MCFG = MambaConfig(n_heads=HEADS, head_dim=P, d_state=N, n_groups=GROUPS, d_conv=4, expand=2, chunk_size=8)


def _mixer() -> Mamba2Mixer:
    torch.manual_seed(0)
    m = Mamba2Mixer(HIDDEN, MCFG, layer_idx=0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        m.A_log.copy_(torch.log(torch.arange(1, HEADS + 1.0)))
        m.dt_bias.copy_(torch.full((HEADS,), -1.0))
        m.D.copy_(torch.rand(HEADS) + 0.5)
    return m


def _bind(m: Mamba2Mixer, slots: int = 8) -> torch.Tensor:
    pool = torch.zeros(slots, 1, m.kv_spec().numel)
    m.bind_cache(pool, group=0, index_in_group=0, backend="torch")
    return pool


def _run(m, hidden, seqs):
    meta = SimpleNamespace(groups=[build_ssm_metadata(seqs, torch.device("cpu"))])
    with torch.no_grad():
        return m(hidden, meta)


def _reference(m, hidden):
    """The layer on one whole sequence from the zero state, token by token (decodes only)."""
    _bind(m)
    outs = [_run(m, hidden[:1], [SsmSeq(0, 1, NO_SLOT, 1)])]
    for t in range(1, hidden.shape[0]):
        outs.append(_run(m, hidden[t : t + 1], [SsmSeq(0, 1, 1, 1)]))
    return torch.cat(outs)


def test_layer_prefill_chunks_checkpoints_and_decodes_match_token_by_token():
    m = _mixer()
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(29, HIDDEN, generator=g), torch.randn(12, HIDDEN, generator=g)
    ref_a, ref_b = _reference(m, a), _reference(m, b)
    pool = _bind(m)
    # Step 1: a's first 19 tokens (checkpoints mid-chunk after 5 and 16) and b's first 10, batched.
    out = _run(m, torch.cat([a[:19], b[:10]]), [SsmSeq(0, 19, NO_SLOT, 1, [(5, 3), (16, 4)]), SsmSeq(19, 10, NO_SLOT, 2)])
    assert (out[:19] - ref_a[:19]).abs().max() <= TOL and (out[19:] - ref_b[:10]).abs().max() <= TOL
    # Step 2: a continues in its live slot; b decodes (batched path), checkpointing into slot 5.
    out = _run(m, torch.cat([a[19:27], b[10:11]]), [SsmSeq(0, 8, 1, 1), SsmSeq(8, 1, 2, 2, [(1, 5)])])
    assert (out[:8] - ref_a[19:27]).abs().max() <= TOL and (out[8:] - ref_b[10:11]).abs().max() <= TOL
    # Step 3: two decodes batched.
    out = _run(m, torch.cat([a[27:28], b[11:12]]), [SsmSeq(0, 1, 1, 1), SsmSeq(1, 1, 2, 2)])
    assert (out[:1] - ref_a[27:28]).abs().max() <= TOL and (out[1:] - ref_b[11:12]).abs().max() <= TOL
    # Restart from the checkpoints (read-only) into fresh live slots.
    before = pool[[3, 4, 5]].clone()
    out = _run(m, torch.cat([a[5:16], a[16:17], b[11:12]]),
               [SsmSeq(0, 11, 3, 6), SsmSeq(11, 1, 4, 7), SsmSeq(12, 1, 5, 0)])
    assert (out[:11] - ref_a[5:16]).abs().max() <= TOL
    assert (out[11:12] - ref_a[16:17]).abs().max() <= TOL and (out[12:] - ref_b[11:12]).abs().max() <= TOL
    assert torch.equal(pool[[3, 4, 5]], before)
    # The state a reached after 16 tokens via slot 6 equals checkpoint 4.
    assert (pool[6] - pool[4]).abs().max() <= TOL


def test_unbound_layer_and_bad_pool_raise():
    m = _mixer()
    with pytest.raises(RuntimeError, match="bind_cache"):
        _run(m, torch.randn(2, HIDDEN), [SsmSeq(0, 2, NO_SLOT, 0)])
    with pytest.raises(ValueError, match="state pool"):
        m.bind_cache(torch.zeros(4, 1, 3), 0, 0, "torch")
