"""The SDPA fast path (bucketed batched decodes, chunked prefill over the pool) against the
per-sequence reference implementation, on random pools and block tables."""
import random

import torch

from kvtier.engine.attention.metadata import build_attention_metadata
from kvtier.engine.attention.paged_attention import reference_attention, sdpa_attention, write_kv

BS, HEADS, KV_HEADS, HD = 16, 8, 2, 32


def _random_step(rng, num_blocks=400):
    """Decodes over contexts of very different lengths (several buckets), plus prefill chunks."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    specs = []
    for ctx in [3, 20, 33, 150, 160, 700, 720, 1500]:  # decodes
        need = -(-ctx // BS)
        specs.append((ctx - 1, 1, [free.pop() for _ in range(need)]))
    for done, new in [(0, 50), (64, 30), (300, 17)]:  # fresh prompt, prefix-cached chunks
        need = -(-(done + new) // BS)
        specs.append((done, new, [free.pop() for _ in range(need)]))
    return specs


def test_sdpa_matches_reference_with_bucketed_decodes():
    rng = random.Random(0)
    torch.manual_seed(0)
    specs = _random_step(rng)
    pool = torch.randn(400, 3, 2, BS, KV_HEADS, HD)  # 3 layers: the fast path must find layer 1's rows
    kv_layer = pool[:, 1]
    meta = build_attention_metadata(specs, BS, torch.device("cpu"))
    assert len(meta.decodes) >= 3, "contexts from 3 to 1500 tokens must not share one padded batch"
    assert sum(len(d.rows) for d in meta.decodes) == 8
    t = sum(n for _, n, _ in specs)
    q, k, v = torch.randn(t, HEADS, HD), torch.randn(t, KV_HEADS, HD), torch.randn(t, KV_HEADS, HD)
    write_kv(kv_layer, k, v, meta)
    ref = reference_attention(q, kv_layer, meta, HD**-0.5)
    fast = sdpa_attention(q, k, v, pool, 1, meta, HD**-0.5)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-4)


def test_buckets_partition_decodes_and_bound_padding():
    from kvtier.engine.attention.metadata import SeqAttention, bucket_by_length

    rng = random.Random(1)
    seqs = [SeqAttention(i, 1, 0, torch.zeros(rng.randint(1, 200))) for i in range(64)]
    buckets = bucket_by_length(seqs)
    assert sorted(s.q_start for b in buckets for s in b) == list(range(64))
    for b in buckets:
        lengths = [len(s.block_table) for s in b]
        assert max(lengths) - min(lengths) <= max(8, max(lengths) // 4)
