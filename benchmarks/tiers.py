"""Tier throughput: each tier's batched put/get against its raw reference on the same bytes
(cpu: a torch copy; lmdb: raw py-lmdb; redis: raw redis-py pipelines).

Blocks have the page-first shape of the `small` Llama model (block_size 16, float32). Each
tier kind has one function returning rows; every row measures the tier and its raw
reference side by side in the same run, alternating, and reports medians over repeats and
the median of the per-repeat ratios tier/raw (these machines are noisy). Prints JSON.

    python benchmarks/tiers.py [--tiers cpu,lmdb,redis] [--batch 64] [--repeats 15] [--device auto] [--out f.json]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench_io import emit
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.tiers.spec import BlockLayout


def model_layout(size: str = "small", block_size: int = 16, dtype=torch.float32, device="cpu") -> BlockLayout:
    from kvtier.engine.make_model import model_config

    cfg = model_config("llama", size)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    shape = (cfg["num_hidden_layers"], 2, block_size, cfg["num_key_value_heads"], head_dim)
    return BlockLayout(shape=shape, dtype=dtype, device=torch.device(device))


def make_keys(n: int, start: int) -> list[BlockKey]:
    return [BlockKey(b"bench", (start + i).to_bytes(32, "little")) for i in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _row(tier: str, op: str, device, batch: int, layout: BlockLayout, tier_s: list, raw_s: list) -> dict:
    nbytes = batch * layout.nbytes
    return {
        "tier": tier,
        "op": op,
        "device": str(device),
        "blocks": batch,
        "block_bytes": layout.nbytes,
        "gbps": round(nbytes / statistics.median(tier_s) / 1e9, 3),
        "raw_gbps": round(nbytes / statistics.median(raw_s) / 1e9, 3),
        "ratio": round(statistics.median(r / t for t, r in zip(tier_s, raw_s)), 3),
        "repeats": len(tier_s),
    }


def bench_cpu(args, layout: BlockLayout, device: torch.device) -> list[dict]:
    """CpuTier.put (pool -> slab) and .get (slab -> pool) vs `slab[slot].copy_(pool[i])`."""
    from kvtier.kvstore.tiers.cpu_tier import CpuTier

    batch, rounds = args.batch, args.slab_batches
    pinned = device.type == "cuda"
    pool = torch.randn((batch, *layout.shape), dtype=layout.dtype, device=device)  # the device pool
    blocks = list(pool.unbind(0))
    tier = CpuTier(rounds * batch * layout.nbytes, layout, pin_memory=pinned)
    slab = torch.zeros((rounds * batch, *layout.shape), dtype=layout.dtype, pin_memory=pinned)
    put_t, put_r, get_t, get_r = [], [], [], []
    warmup = rounds + 1  # first touches every slab page, so page faults are not measured
    for rep in range(warmup + args.repeats):
        keys = make_keys(batch, rep * batch)  # fresh keys: a put always copies (and evicts)
        slots = [(rep % rounds) * batch + j for j in range(batch)]

        def raw_put():
            for j, s in enumerate(slots):
                slab[s].copy_(blocks[j], non_blocking=pinned)

        def raw_get():
            for j, s in enumerate(slots):
                blocks[j].copy_(slab[s], non_blocking=pinned)

        order = [("tier", "put"), ("raw", "put"), ("tier", "get"), ("raw", "get")]
        if rep % 2:  # alternate who goes first
            order = [("raw", "put"), ("tier", "put"), ("raw", "get"), ("tier", "get")]
        times = {}
        for who, op in order:
            if who == "tier":
                fn = (lambda: tier.put(keys, blocks)) if op == "put" else (lambda: tier.get(keys, blocks))
            else:
                fn = raw_put if op == "put" else raw_get
            times[who, op] = _timed(fn, device)
        if rep >= warmup:
            put_t.append(times["tier", "put"])
            put_r.append(times["raw", "put"])
            get_t.append(times["tier", "get"])
            get_r.append(times["raw", "get"])
    ok = tier.get(keys, blocks)
    if not all(ok):
        raise RuntimeError("cpu tier lost blocks of the last batch")
    tier.close()
    return [_row("cpu", "put", device, batch, layout, put_t, put_r), _row("cpu", "get", device, batch, layout, get_t, get_r)]


def bench_lmdb(args, layout: BlockLayout, device: torch.device) -> list[dict]:
    """LmdbTier vs raw py-lmdb (benchmarks/tiers_lmdb_redis.py; imported lazily: a sibling
    module, found because this script's folder is first on sys.path)."""
    from tiers_lmdb_redis import bench_lmdb as run

    return run(args, layout, device)


def bench_redis(args, layout: BlockLayout, device: torch.device) -> list[dict]:
    """RedisTier vs raw redis-py pipelines (benchmarks/tiers_lmdb_redis.py)."""
    from tiers_lmdb_redis import bench_redis as run

    return run(args, layout, device)


def bench_grpc(args, layout: BlockLayout, device: torch.device) -> list[dict]:
    """GrpcTier vs a raw gRPC client, then GrpcTier vs RedisTier on 256 KiB-4 MiB values with
    1 and 8 clients (benchmarks/tiers_grpc.py)."""
    from tiers_grpc import bench_grpc as run

    return run(args, layout, device)


TIER_BENCHES = {"cpu": bench_cpu, "lmdb": bench_lmdb, "redis": bench_redis, "grpc": bench_grpc}


def bench_ttft(args, layout: BlockLayout, device: torch.device) -> list[dict]:
    """Placeholder: TTFT of an 8k-token prompt, recompute vs load from each tier. Needs the
    engine/connector integration, so it is filled in there."""
    return [{"kind": "ttft", "status": "not implemented yet (needs the engine integration)"}]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiers", default="cpu", help=f"comma-separated, from: {', '.join(TIER_BENCHES)}")
    ap.add_argument("--batch", type=int, default=64, help="blocks per put/get call")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--slab-batches", type=int, default=4, help="cpu tier capacity, in batches")
    ap.add_argument("--model-size", default="small")
    ap.add_argument("--device", default="auto", help="where the block pool lives: auto, cpu, cuda")
    ap.add_argument("--ttft", action="store_true", help="add TTFT rows (recompute vs load)")
    ap.add_argument("--lmdb-dir", default=None, help="lmdb: parent folder for the scratch environments")
    ap.add_argument("--redis-url", default=None, help="redis: use this server (default: start a private one)")
    ap.add_argument("--compare-repeats", type=int, default=9, help="grpc: repeats of each grpc-vs-redis row")
    ap.add_argument("--redis-conns", default="4", help="redis: the tier's conns= values of the wire rows, "
                    "comma-separated (conns=1 always runs too)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.tiers.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in TIER_BENCHES]
    if unknown:
        ap.error(f"--tiers: unknown {', '.join(unknown)}; known: {', '.join(TIER_BENCHES)}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    layout = model_layout(args.model_size, device=device)
    rows = []
    for kind in kinds:
        rows += TIER_BENCHES[kind](args, layout, device)
    if args.ttft:
        rows += bench_ttft(args, layout, device)
    result = {
        "benchmark": "tiers",
        "model": f"llama-{args.model_size}",
        "block_shape": list(layout.shape),
        "dtype": str(layout.dtype),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
