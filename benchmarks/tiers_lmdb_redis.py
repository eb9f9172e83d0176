"""LMDB and Redis rows for benchmarks/tiers.py: each tier next to its raw client, same run.

- lmdb: LmdbTier puts as the engine makes them, through the hierarchy's writer thread
  (store + flush: the write is committed, like the raw transaction), and LmdbTier.get
  vs raw py-lmdb on an environment with the same flags: one write transaction of
  txn.put(key, tensor bytes) per batch, and a buffers=True read transaction copying each
  value from the map into the destination tensor. Both keep `rounds` batches: the tier
  evicts by its LRU budget, the raw side deletes the batch written `rounds` ago in the same
  transaction.
- redis: RedisTier.put (+ flush) and .get vs redis-py on the same server: a pipeline of
  SET per batch, and one MGET whose values are copied into the destination tensors. Then
  the wire rows (`redis_wire`): 160 KiB and 1 MiB blocks, 1 and 8 concurrent engines
  (threads, each with its own tier and redis-py client), the tier with `conns=1` and with
  each of --redis-conns next to redis-py's pipelined SET / MGET of the same bytes.

The tier does more than the raw client on the same bytes (a header, an xxh3 checksum
written and verified, the LRU index; and put() snapshots the blocks, since it returns
before they are written), which is what the ratio prices. The raw redis put sends the
tensors' memory as is (zero-copy); the redis put row also reports `raw_tobytes_gbps`, a
raw client that first turns each tensor into bytes, as most callers do.

Blocks are CPU tensors: these are host-side stores. torch runs single-threaded here: a
block-sized copy gains nothing from intra-op threads, and on a busy machine OpenMP's
barriers made those copies 100x slower, for tier and raw alike. Unless --redis-url names a
server, a private redis-server (from $REDIS_SERVER_BIN or PATH) is started on a free port
and stopped afterwards; a shared Redis is never touched by default.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time

import torch

from tiers import _row, make_keys

from kvtier.kvstore.tiers.spec import BlockLayout

ROUNDS = 4  # batches each store keeps


@contextlib.contextmanager
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _blocks(args, layout):
    gen = torch.Generator().manual_seed(0)
    src = [torch.randn(layout.shape, generator=gen).to(layout.dtype) for _ in range(args.batch)]
    return src, [torch.empty_like(b) for b in src]


def _alternating(args, steps: dict, after_rep=None) -> dict:
    """Run steps[(who, op)] each repeat, tier and raw alternating who goes first; times."""
    times = {k: [] for k in steps}
    warmup = ROUNDS + 1  # the first batches fill the stores' pages and the page cache
    for rep in range(warmup + args.repeats):
        order = [("tier", "put"), ("raw", "put"), ("tier", "get"), ("raw", "get")]
        if rep % 2:
            order = [("raw", "put"), ("tier", "put"), ("raw", "get"), ("tier", "get")]
        order += [k for k in steps if k not in order]  # extra raw variants
        for who, op in order:
            start = time.perf_counter()
            steps[who, op](rep)
            elapsed = time.perf_counter() - start
            if rep >= warmup:
                times[who, op].append(elapsed)
        if after_rep:
            after_rep(rep)
    return times


def bench_lmdb(args, layout, device) -> list[dict]:
    with _one_torch_thread():
        return _bench_lmdb(args, layout)


def _bench_lmdb(args, layout) -> list[dict]:
    import lmdb

    from kvtier.kvstore.format.codec import HEADER_BYTES
    from kvtier.kvstore.hierarchy import TierHierarchy
    from kvtier.kvstore.tiers.lmdb_tier import LmdbTier

    src, dst = _blocks(args, layout)
    root = tempfile.mkdtemp(prefix="kvtier-bench-lmdb-", dir=getattr(args, "lmdb_dir", None))
    tier = LmdbTier(os.path.join(root, "tier"), ROUNDS * args.batch * (layout.nbytes + HEADER_BYTES))
    writes = TierHierarchy([tier])
    raw_env = lmdb.open(os.path.join(root, "raw"), map_size=tier.map_size, readahead=False, meminit=False,
                        metasync=False, sync=True)
    keys = lambda rep: make_keys(args.batch, rep * args.batch)  # noqa: E731  fresh keys per batch
    raw_bytes = [memoryview(b.contiguous().view(torch.uint8).numpy()).cast("B") for b in src]

    def tier_put(rep):  # as the engine writes: through the hierarchy's writer thread
        writes.store(keys(rep), src)
        writes.flush()

    def raw_put(rep):
        with raw_env.begin(write=True) as txn:
            if rep >= ROUNDS:
                for k in keys(rep - ROUNDS):
                    txn.delete(k.to_bytes())
            for k, v in zip(keys(rep), raw_bytes):
                txn.put(k.to_bytes(), v)

    def tier_get(rep):
        if not all(tier.get(keys(rep), dst)):
            raise RuntimeError("lmdb tier lost blocks of the current batch")

    def raw_get(rep):
        with raw_env.begin(buffers=True) as txn:
            for k, out in zip(keys(rep), dst):
                out.copy_(torch.frombuffer(txn.get(k.to_bytes()), dtype=layout.dtype).view(layout.shape))

    steps = {("tier", "put"): tier_put, ("raw", "put"): raw_put, ("tier", "get"): tier_get, ("raw", "get"): raw_get}
    try:
        times = _alternating(args, steps)
        tier.get(keys(args.repeats + ROUNDS), dst)
        if not all(torch.equal(a, b) for a, b in zip(src, dst)):
            raise RuntimeError("lmdb tier returned wrong bytes")
        if tier.stats().skipped_writes:
            raise RuntimeError("lmdb tier skipped writes during the benchmark")
    finally:
        writes.close()
        raw_env.close()
        shutil.rmtree(root, ignore_errors=True)
    return [_row("lmdb", op, "cpu", args.batch, layout, times["tier", op], times["raw", op]) for op in ("put", "get")]


@contextlib.contextmanager
def _private_redis():
    binary = os.environ.get("REDIS_SERVER_BIN") or shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("no redis-server on PATH (or $REDIS_SERVER_BIN); pass --redis-url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="kvtier-bench-redis-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(port=port)
        for _ in range(500):
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    break
            time.sleep(0.01)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def bench_redis(args, layout, device) -> list[dict]:
    with contextlib.ExitStack() as stack:
        stack.enter_context(_one_torch_thread())
        url = getattr(args, "redis_url", None) or stack.enter_context(_private_redis())
        rows = _bench_redis(args, layout, url)
        conns = [int(c) for c in str(getattr(args, "redis_conns", "4")).split(",")]
        for (name, wire_layout), clients in itertools.product(WIRE_LAYOUTS, (1, 8)):
            rows.append(_wire_row(args, url, name, wire_layout, clients, conns))
        return rows


def _bench_redis(args, layout, url) -> list[dict]:
    import redis

    from kvtier.kvstore.tiers.redis_tier import RedisTier

    src, dst = _blocks(args, layout)
    # A generous timeout: a benchmark hiccup must not open the breaker and skew a row.
    tier = RedisTier(url, prefix="kvtier-bench-tier:", timeout=5.0)
    client = redis.Redis.from_url(url, socket_timeout=5.0)
    keys = make_keys(args.batch, 0)  # the same keys each batch: SET overwrites, memory stays flat
    raw_keys = [b"kvtier-bench-raw:" + k.hex().encode() for k in keys]
    raw_bytes = [memoryview(b.contiguous().view(torch.uint8).numpy()).cast("B") for b in src]

    def tier_put(rep):
        tier.put(keys, src)
        tier.flush()

    def raw_put(rep):
        pipe = client.pipeline(transaction=False)
        for k, v in zip(raw_keys, raw_bytes):
            pipe.set(k, v)
        pipe.execute()

    def raw_tobytes_put(rep):
        pipe = client.pipeline(transaction=False)
        for k, b in zip(raw_keys, src):
            pipe.set(k, b.numpy().tobytes())
        pipe.execute()

    def tier_get(rep):
        if not all(tier.get(keys, dst)):
            raise RuntimeError("redis tier lost blocks")

    def raw_get(rep):
        for v, out in zip(client.mget(raw_keys), dst):
            out.copy_(torch.frombuffer(v, dtype=layout.dtype).view(layout.shape))

    steps = {("tier", "put"): tier_put, ("raw", "put"): raw_put, ("tier", "get"): tier_get, ("raw", "get"): raw_get,
             ("raw", "tobytes"): raw_tobytes_put}
    try:
        times = _alternating(args, steps)
        if not all(torch.equal(a, b) for a, b in zip(src, dst)):
            raise RuntimeError("redis tier returned wrong bytes")
        if tier.stats().skipped_writes or tier.stats().errors:
            raise RuntimeError(f"redis tier had faults during the benchmark: {tier.stats()}")
        client.delete(*raw_keys)
        tier.delete(keys)
    finally:
        tier.close()
        client.close()
    rows = [_row("redis", op, "cpu", args.batch, layout, times["tier", op], times["raw", op]) for op in ("put", "get")]
    tobytes = times["raw", "tobytes"]
    rows[0]["raw_tobytes_gbps"] = round(args.batch * layout.nbytes / statistics.median(tobytes) / 1e9, 3)
    rows[0]["ratio_vs_tobytes"] = round(statistics.median(r / t for t, r in zip(times["tier", "put"], tobytes)), 3)
    return rows


# Block sizes of the wire rows: a 160 KiB block (e.g. a 7-8B model's fp16 block of 16
# tokens per layer group) and a 1 MiB one; fp16, as engines store them.
WIRE_LAYOUTS = [("160KiB", BlockLayout((4, 2, 16, 8, 80), torch.float16, torch.device("cpu"))),
                ("1MiB", BlockLayout((16, 2, 16, 8, 128), torch.float16, torch.device("cpu")))]
WIRE_BATCH_BYTES = 16 << 20  # per engine per call


def _wire_row(args, url: str, name: str, layout: BlockLayout, clients: int, conns: list[int]) -> dict:
    """One block size and engine count: GB/s of each variant (all engines together) and the
    median per-repeat ratio of each tier variant to redis-py."""
    import redis

    from kvtier.kvstore.tiers.redis_batches import run_set_batch
    from kvtier.kvstore.tiers.redis_conns import ConnectionPool, Endpoint
    from kvtier.kvstore.tiers.redis_tier import RedisTier

    batch = max(1, WIRE_BATCH_BYTES // layout.nbytes)
    gen = torch.Generator().manual_seed(2)
    src = [torch.randn(layout.shape, generator=gen).to(layout.dtype) for _ in range(batch)]
    raw_src = [memoryview(b.view(torch.uint8).numpy()).cast("B") for b in src]
    dst = [[torch.empty_like(b) for b in src] for _ in range(clients)]
    keys = [make_keys(batch, (c + 1) << 20) for c in range(clients)]
    raw_keys = [[b"kvtier-bench-wire-raw:" + k.hex().encode() for k in ks] for ks in keys]
    variants = sorted({1, *conns})
    tiers = {n: [RedisTier(url, prefix=f"kvtier-bench-wire{n}:", timeout=30.0, conns=n) for _ in range(clients)]
             for n in variants}
    raw = [redis.Redis.from_url(url, socket_timeout=30.0) for _ in range(clients)]

    def raw_put(c):
        pipe = raw[c].pipeline(transaction=False)
        for k, v in zip(raw_keys[c], raw_src):
            pipe.set(k, v)
        pipe.execute()

    def raw_get(c):
        for v, out in zip(raw[c].mget(raw_keys[c]), dst[c]):
            out.copy_(torch.frombuffer(v, dtype=layout.dtype).view(layout.shape))

    # The ceiling for puts: the tier's own sender with bare values (no header, no checksum).
    bare_pools = [ConnectionPool(Endpoint.from_url(url, None, 30.0, 5.0), max_idle=1) for _ in range(clients)]
    bare_keys = [[b"kvtier-bench-wire-bare:" + k.hex().encode() for k in ks] for ks in keys]

    def bare_put(c):
        run_set_batch(bare_pools[c], bare_keys[c], [(b"", v) for v in raw_src], None, 30.0)

    steps = {("redis-py", "put"): raw_put, ("redis-py", "get"): raw_get, ("bare", "put"): bare_put}
    for n in variants:
        steps[f"tier{n}", "put"] = lambda c, n=n: tiers[n][c].put(keys[c], src)
        steps[f"tier{n}", "get"] = lambda c, n=n: tiers[n][c].get(keys[c], dst[c])
    try:
        times = _together_alternating(steps, clients, getattr(args, "compare_repeats", 9))
        for n in variants:
            for c, tier in enumerate(tiers[n]):
                if not all(tier.get(keys[c], dst[c])) or not all(torch.equal(a, b) for a, b in zip(src, dst[c])):
                    raise RuntimeError(f"redis tier conns={n} returned wrong or missing blocks")
                if tier.stats().errors or tier.stats().skipped_writes:
                    raise RuntimeError(f"redis tier conns={n} had faults during the benchmark: {tier.stats()}")
                tier.delete(keys[c])
        for c in range(clients):
            raw[c].delete(*raw_keys[c], *bare_keys[c])
    finally:
        for pool in bare_pools:
            pool.close()
        for tier in itertools.chain(*tiers.values()):
            tier.close()
        for client in raw:
            client.close()
    nbytes = clients * batch * layout.nbytes
    row = {"tier": "redis_wire", "block": name, "block_bytes": layout.nbytes, "blocks": batch, "clients": clients}
    row["put_bare_gbps"] = round(nbytes / statistics.median(times["bare", "put"]) / 1e9, 3)
    for op in ("put", "get"):
        ref = times["redis-py", op]
        row[f"{op}_redis_py_gbps"] = round(nbytes / statistics.median(ref) / 1e9, 3)
        for n in variants:
            t = times[f"tier{n}", op]
            row[f"{op}_conns{n}_gbps"] = round(nbytes / statistics.median(t) / 1e9, 3)
            row[f"{op}_conns{n}_vs_redis_py"] = round(statistics.median(r / x for x, r in zip(t, ref)), 3)
    return row


def _together_alternating(steps: dict, clients: int, repeats: int, warmup: int = 3) -> dict:
    """Each step run by all engines at once (one thread each), in a rotating order; the
    wall time of each step per repeat, warm-up repeats dropped."""
    times = {k: [] for k in steps}
    names = list(steps)
    for rep in range(warmup + repeats):
        shift = rep % len(names)
        for step in names[shift:] + names[:shift]:
            threads = [threading.Thread(target=steps[step], args=(c,)) for c in range(clients)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if rep >= warmup:
                times[step].append(time.perf_counter() - start)
    return times
