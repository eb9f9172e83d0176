"""gRPC rows for benchmarks/tiers.py: the grpc tier next to its raw client, and next to Redis.

- grpc: GrpcTier.put / .get on the model's blocks vs a raw client of the same server's bulk
  stream (values encoded beforehand; a GET whose payloads land in the destination tensors
  unchecked). The ratio prices what the tier adds: encoding, the checksum written and
  verified, header checks, sharding bookkeeping.
- grpc_vs_redis: the same blocks through GrpcTier and through RedisTier (put + flush) on
  this machine, for 256 KiB, 1 MiB and 4 MiB values, with one client and with 8 concurrent
  clients (threads, each with its own tier and connection). Each row gives both GB/s and
  ratio = grpc / redis (median of per-repeat ratios; the goal is >= 1.0). GrpcTier moves
  blocks over the kv-server's bulk stream; put_/get_grpc_stream_gbps are the same calls
  with bulk=0 (gRPC's Put and Get), for comparison. Both stores run as their own processes: a private
  `kvtier kv-server` and a private redis-server (or --redis-url), each on a free port,
  stopped afterwards.

torch runs single-threaded, as in tiers_lmdb_redis.py: OpenMP's spinning workers steal the
cores that the servers and the network stack need on a small machine.
"""
from __future__ import annotations

import contextlib
import re
import statistics
import subprocess
import sys
import threading
import time

import torch

from tiers import _row, make_keys
from tiers_lmdb_redis import _one_torch_thread, _private_redis

from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.service.bulk_protocol import VALUE_LENGTH, get_request
from kvtier.kvstore.socket_io import recv_exact_into
from kvtier.kvstore.tiers.spec import BlockLayout

VALUE_SIZES = {"256KiB": 2, "1MiB": 8, "4MiB": 32}  # layers of a [L, 2, 16, 8, 128] fp32 block
BATCH_BYTES = 32 << 20  # per client and call
CLIENTS = (1, 8)


@contextlib.contextmanager
def private_kv_server(capacity: str = "2GiB"):
    """A kv-server subprocess on a free port; yields its address."""
    cmd = [sys.executable, "-m", "kvtier.kvstore.service.server.main", "--listen", "127.0.0.1:0", "--capacity", capacity]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"listening on (\S+)", line)
        if not match:
            raise RuntimeError(f"kv-server did not start (exit {proc.poll()}): {line!r}")
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(30)


def bench_grpc(args, layout: BlockLayout, device) -> list[dict]:
    with contextlib.ExitStack() as stack:
        stack.enter_context(_one_torch_thread())
        address = stack.enter_context(private_kv_server())
        rows = _tier_vs_raw(args, layout, address)
        redis_url = getattr(args, "redis_url", None) or stack.enter_context(_private_redis())
        for name, layers in VALUE_SIZES.items():
            value_layout = BlockLayout((layers, 2, 16, 8, 128), torch.float32, torch.device("cpu"))
            for clients in CLIENTS:
                rows.append(_grpc_vs_redis(args, value_layout, name, clients, address, redis_url))
        return rows


def _tier_vs_raw(args, layout: BlockLayout, address: str) -> list[dict]:
    from kvtier.kvstore.format.codec import encode_block
    from kvtier.kvstore.tiers.grpc_tier import GrpcTier

    gen = torch.Generator().manual_seed(0)
    src = [torch.randn(layout.shape, generator=gen).to(layout.dtype) for _ in range(args.batch)]
    dst = [torch.empty_like(b) for b in src]
    tier = GrpcTier([address], timeout_s=60.0)
    server = tier._servers[0]  # the same channel: only the tier's own work differs
    keys = make_keys(args.batch, 0)
    raw_keys = [BlockKey(b"bench-raw", k.block_hash).to_bytes() for k in keys]
    raw_values = [encode_block(BlockKey.from_bytes(k), b) for k, b in zip(raw_keys, src)]
    header = memoryview(bytearray(len(raw_values[0]) - layout.nbytes))
    length = memoryview(bytearray(VALUE_LENGTH.size))

    def raw_get():  # each payload straight into its tensor: no header check, no checksum
        sock = server.bulk.connection()
        sock.sendall(get_request(raw_keys))
        for out in dst:
            recv_exact_into(sock, length)
            recv_exact_into(sock, header)
            recv_exact_into(sock, memoryview(out.numpy()).cast("B"))
        server.bulk.release(sock)

    steps = {
        ("tier", "put"): lambda: tier.put(keys, src),
        ("raw", "put"): lambda: server.put_values(raw_keys, raw_values),
        ("tier", "get"): lambda: tier.get(keys, dst),
        ("raw", "get"): raw_get,
    }
    try:
        times = _alternate(args.repeats, steps)
        if not all(tier.get(keys, dst)) or not all(torch.equal(a, b) for a, b in zip(src, dst)):
            raise RuntimeError("grpc tier returned wrong or missing blocks")
        if tier.stats().errors or tier.stats().skipped_writes:
            raise RuntimeError(f"grpc tier had faults during the benchmark: {tier.stats()}")
    finally:
        tier.close()
    return [_row("grpc", op, "cpu", args.batch, layout, times["tier", op], times["raw", op]) for op in ("put", "get")]


def _alternate(repeats: int, steps: dict, warmup: int = 2) -> dict:
    """Time each step per repeat; steps compared with each other come in consecutive pairs
    (a, b), and the two take turns to go first."""
    times = {k: [] for k in steps}
    order = list(steps)
    pairs = [order[i : i + 2] for i in range(0, len(order), 2)]
    for rep in range(warmup + repeats):
        for key in (k for pair in pairs for k in (pair if rep % 2 == 0 else pair[::-1])):
            start = time.perf_counter()
            steps[key]()
            if rep >= warmup:
                times[key].append(time.perf_counter() - start)
    return times


def _grpc_vs_redis(args, layout: BlockLayout, name: str, clients: int, address: str, redis_url: str) -> dict:
    from kvtier.kvstore.tiers.grpc_tier import GrpcTier
    from kvtier.kvstore.tiers.redis_tier import RedisTier

    batch = max(1, BATCH_BYTES // layout.nbytes)
    gen = torch.Generator().manual_seed(1)
    src = [torch.randn(layout.shape, generator=gen) for _ in range(batch)]
    dst = [[torch.empty_like(b) for b in src] for _ in range(clients)]
    # The same keys every repeat (the stores overwrite), distinct per client.
    keys = [make_keys(batch, (c + 1) << 20) for c in range(clients)]
    grpc_tiers = [GrpcTier([address], timeout_s=60.0) for _ in range(clients)]
    stream_tiers = [GrpcTier([address], timeout_s=60.0, bulk=False) for _ in range(clients)]
    redis_tiers = [RedisTier(redis_url, prefix="kvtier-bench-cmp:", timeout=60.0) for _ in range(clients)]

    def together(fn):
        def run():
            threads = [threading.Thread(target=fn, args=(c,)) for c in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return run

    def redis_put(c):
        redis_tiers[c].put(keys[c], src)
        redis_tiers[c].flush()

    steps = {
        ("grpc", "put"): together(lambda c: grpc_tiers[c].put(keys[c], src)),
        ("redis", "put"): together(redis_put),
        ("grpc", "get"): together(lambda c: grpc_tiers[c].get(keys[c], dst[c])),
        ("redis", "get"): together(lambda c: redis_tiers[c].get(keys[c], dst[c])),
        ("grpc_stream", "put"): together(lambda c: stream_tiers[c].put(keys[c], src)),
        ("grpc_stream", "get"): together(lambda c: stream_tiers[c].get(keys[c], dst[c])),
    }
    try:
        # Four warm-up rounds: both stores grow their memory during the first puts (page
        # faults), and a long-running store is past that.
        times = _alternate(getattr(args, "compare_repeats", 9), steps, warmup=4)
        for tiers in (grpc_tiers, stream_tiers, redis_tiers):
            for c, tier in enumerate(tiers):
                if not all(tier.get(keys[c], dst[c])) or tier.stats().errors or tier.stats().skipped_writes:
                    raise RuntimeError(f"{tier.name} tier had faults during the benchmark: {tier.stats()}")
        for c in range(clients):
            redis_tiers[c].delete(keys[c])
            grpc_tiers[c].delete(keys[c])
    finally:
        for tier in grpc_tiers + stream_tiers + redis_tiers:
            tier.close()
    nbytes = clients * batch * layout.nbytes
    row = {"tier": "grpc_vs_redis", "value": name, "value_bytes": layout.nbytes, "blocks": batch, "clients": clients}
    for op in ("put", "get"):
        g, r = times["grpc", op], times["redis", op]
        row[f"{op}_grpc_gbps"] = round(nbytes / statistics.median(g) / 1e9, 3)
        row[f"{op}_redis_gbps"] = round(nbytes / statistics.median(r) / 1e9, 3)
        row[f"{op}_ratio"] = round(statistics.median(rt / gt for gt, rt in zip(g, r)), 3)
    for op in ("put", "get"):
        row[f"{op}_grpc_stream_gbps"] = round(nbytes / statistics.median(times["grpc_stream", op]) / 1e9, 3)
    return row
