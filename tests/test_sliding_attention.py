"""Sliding-window paged attention: the SDPA path and the paged reference against plain
attention over contiguous K/V with an explicit window mask; blocks that left the window
are marked freed (-1) in the tables, so reading one would fail."""
import random

import pytest
import torch

from kvtier.engine.attention.metadata import build_attention_metadata
from kvtier.engine.attention.paged_attention import reference_attention, sdpa_attention, write_kv

BS, HEADS, KV_HEADS, HD = 16, 4, 2, 16


def _dense_window_attention(q, k, v, positions, window):
    """q: [n, H, d] at absolute `positions`; k, v: [ctx, KVH, d] from position 0."""
    group = HEADS // KV_HEADS
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * HD**-0.5
    kpos = torch.arange(k.shape[0])[None, :]
    qpos = torch.tensor(positions)[:, None]
    scores = scores.masked_fill(~((kpos <= qpos) & (kpos > qpos - window)), float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v)


@pytest.mark.parametrize("window", [16, 40, 100])
def test_windowed_paged_attention_matches_dense(window):
    rng = random.Random(window)
    torch.manual_seed(window)
    # (tokens computed before, new tokens): decodes past the window, a fresh prompt longer
    # than the window, chunks that start inside and beyond it.
    shapes = [(150, 1), (37, 1), (300, 1), (0, 130), (64, 50), (200, 33), (5, 3)]
    num_blocks = 200
    free = list(range(num_blocks))
    rng.shuffle(free)
    specs, full_k, full_v = [], [], []
    for done, new in shapes:
        table = [free.pop() for _ in range(-(-(done + new) // BS))]
        first = max(0, done - window + 1) // BS
        table = [-1] * first + table[first:]  # freed blocks: never read
        specs.append((done, new, table))
        full_k.append(torch.randn(done + new, KV_HEADS, HD))
        full_v.append(torch.randn(done + new, KV_HEADS, HD))
    pool = torch.randn(num_blocks, 2, 2, BS, KV_HEADS, HD)
    kv_layer = pool[:, 1]
    for (done, _, table), k, v in zip(specs, full_k, full_v):  # the cached prefix, inside the window
        for pos in range(max(0, done - window + 1), done):
            kv_layer[table[pos // BS], 0, pos % BS] = k[pos]
            kv_layer[table[pos // BS], 1, pos % BS] = v[pos]
    meta = build_attention_metadata(specs, BS, torch.device("cpu"), window=window)
    new_k = torch.cat([k[d:] for (d, _, _), k in zip(specs, full_k)])
    new_v = torch.cat([v[d:] for (d, _, _), v in zip(specs, full_v)])
    q = torch.randn(new_k.shape[0], HEADS, HD)
    write_kv(kv_layer, new_k, new_v, meta)
    ref = reference_attention(q, kv_layer, meta, HD**-0.5)
    fast = sdpa_attention(q, new_k, new_v, pool, 1, meta, HD**-0.5)
    row = 0
    for (done, new, _), k, v in zip(specs, full_k, full_v):
        want = _dense_window_attention(q[row:row + new], k, v, list(range(done, done + new)), window)
        torch.testing.assert_close(ref[row:row + new], want, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(fast[row:row + new], want, atol=2e-5, rtol=1e-4)
        row += new


def test_freed_block_inside_the_window_is_refused():
    with pytest.raises(RuntimeError, match="freed block inside the window"):
        build_attention_metadata([(40, 1, [3, -1, 5])], BS, torch.device("cpu"), window=30)
