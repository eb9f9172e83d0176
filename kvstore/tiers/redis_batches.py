"""Pipelined MGET and SET batches over one of the tier's own connections.

A batch is one connection's share of a tier call: for gets, a list of key groups (one
group on a single node; one per hash slot on a cluster node, since a cluster's MGET must
stay within a slot), each asked for in MGETs of about MGET_BYTES of values, at most
MGETS_IN_FLIGHT of them sent ahead of the reply being read; for puts, one SET per block.
The outcome is written into the caller's shared `ok` / `corrupt` lists by position, so a
batch that breaks half way keeps the values it has verified.

Why a window of small MGETs rather than one MGET per group: Redis builds a command's whole
reply in memory before sending any of it. One MGET for the 510 blocks (84 MB) of an
8k-token prompt made redis-server allocate 84 MB of fresh reply buffers, ~16,000 page
faults per get, and the get took ~68 ms; MGETs of ~2 MB (12 such blocks) with 4 in flight
let it reuse the buffers it has just sent (no page faults): ~31 ms (README, Redis tier).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from kvtier.kvstore.socket_io import BatchedSender, send_buffers
from kvtier.kvstore.tiers.redis_conns import ConnectionPool
from kvtier.kvstore.tiers.redis_resp import RespBroken, RespError, RespReader, command, read_mget_into

# Values asked for per MGET, and MGETs sent ahead of the reply being read: together they
# bound the reply memory Redis holds for one connection (about 8 MiB).
MGET_BYTES = 2 << 20
MGETS_IN_FLIGHT = 4


@dataclass
class BatchResult:
    nbytes: int = 0
    broken: BaseException | None = None  # the connection failed (a store fault: breaker)
    refused: list[str] = field(default_factory=list)  # error replies (the server is reachable)


@dataclass
class GetBatch:
    pool: ConnectionPool
    groups: list[list[int]]  # positions in the tier call, one MGET per group


def run_get_batch(batch: GetBatch, rkeys: Sequence[bytes], digests: Sequence[bytes], into: Sequence[torch.Tensor],
                  ok: list[bool], corrupt: list[int], timeout: float) -> BatchResult:
    """MGET each group, values straight into their tensors. A broken stream closes the
    connection: the groups not yet read stay misses."""
    result = BatchResult()
    deadline = time.monotonic() + timeout
    try:
        sock = batch.pool.acquire()
    except OSError as e:
        result.broken = e
        return result
    groups = [chunk for group in batch.groups for chunk in _chunks(group, into)]
    try:
        sent = min(MGETS_IN_FLIGHT, len(groups))
        send_buffers(sock, [_mget(rkeys, group) for group in groups[:sent]])
        reader = RespReader(sock, deadline)
        for group in groups:
            got: list[int] = []
            try:
                result.nbytes += _read_group(reader, group, digests, into, ok, got)
            except RespError as e:  # e.g. MOVED during resharding: that group misses
                result.refused.append(str(e))
            finally:
                corrupt.extend(group[i] for i in got)
            if sent < len(groups):  # one reply read: ask for the next share
                send_buffers(sock, [_mget(rkeys, groups[sent])])
                sent += 1
    except (OSError, RespBroken) as e:
        sock.close()
        result.broken = e
        return result
    batch.pool.release(sock)
    return result


def _mget(rkeys: Sequence[bytes], group: list[int]) -> bytes:
    return command(b"MGET", *(rkeys[p] for p in group))


def _chunks(group: list[int], into: Sequence[torch.Tensor]) -> list[list[int]]:
    """The group in runs of about MGET_BYTES of values (at least one value each)."""
    out: list[list[int]] = []
    run: list[int] = []
    size = 0
    for p in group:
        if run and size + into[p].nbytes > MGET_BYTES:
            out.append(run)
            run, size = [], 0
        run.append(p)
        size += into[p].nbytes
    if run:
        out.append(run)
    return out


def _read_group(reader: RespReader, group: list[int], digests, into, ok: list[bool], got: list[int]) -> int:
    """One MGET reply for `group` (positions in the call); corrupt entries go to `got` as
    indexes into the group. ok flags are set through a local list so a reply that breaks
    mid-way still leaves the verified ones marked."""
    local = [False] * len(group)
    try:
        return read_mget_into(reader, [digests[p] for p in group], [into[p] for p in group], local, got)
    finally:
        for i, hit in enumerate(local):
            if hit:
                ok[group[i]] = True


def run_set_batch(pool: ConnectionPool, rkeys: Sequence[bytes], parts: Iterable[tuple[bytes, memoryview]],
                  ttl: int | None, timeout: float) -> None:
    """SET key value [EX ttl] for each key, each value sent as its two pieces (header,
    payload) with no joined copy, a batch of values per sendmsg. `parts` is consumed lazily,
    so each block is checksummed and sent while it is still in the CPU cache. OSError when
    the connection fails, RespError when the server refuses a SET."""
    expiry = b"" if ttl is None else b"$2\r\nEX\r\n$%d\r\n%d\r\n" % (len(str(ttl)), ttl)
    nargs = 3 if ttl is None else 5
    sock = pool.acquire()
    try:
        out = BatchedSender(sock)
        pending = b""
        sent = 0
        for key, (head, payload) in zip(rkeys, parts):
            size = len(head) + len(payload)
            out.add(pending + b"*%d\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (nargs, len(key), key, size) + head, payload)
            pending = b"\r\n" + expiry
            sent += 1
        if sent:
            out.add(pending)
        out.flush()
        _, refused = _simple_replies(RespReader(sock, time.monotonic() + timeout), sent)
    except BaseException:
        sock.close()  # a half-sent or half-read pipeline leaves the connection unusable
        raise
    pool.release(sock)
    if refused:
        raise RespError(f"{len(refused)} SET(s) refused: {refused[0]}")


def run_exists_batch(pool: ConnectionPool, rkeys: Sequence[bytes], timeout: float) -> list[bool]:
    """EXISTS key for each key, pipelined on one of the tier's connections: one round trip
    and one buffer of commands (redis-py's pipeline spent ~2 ms of Python on the 510 keys of
    an 8k-token prompt, on the path from lookup to load). OSError when the connection fails,
    RespError when the server refuses a probe (the replies are read to the end first)."""
    sock = pool.acquire()
    try:
        send_buffers(sock, [b"".join(command(b"EXISTS", k) for k in rkeys)])
        replies, refused = _simple_replies(RespReader(sock, time.monotonic() + timeout), len(rkeys))
        bad = [r for r in replies if r not in (None, b"0", b"1")]
        if bad:
            raise RespBroken(f"unexpected EXISTS reply {bad[0][:32]!r}")
    except BaseException:
        sock.close()  # a half-read pipeline leaves the connection unusable
        raise
    pool.release(sock)
    if refused:
        raise RespError(refused[0])
    return [r == b"1" for r in replies]


def _simple_replies(reader: RespReader, n: int) -> tuple[list[bytes | None], list[str]]:
    """n status or integer replies. An error reply is None in the first list and its text
    in the second; reading goes on past it, so the connection stays in step."""
    replies, refused = [], []
    for _ in range(n):
        try:
            replies.append(reader.simple_reply())
        except RespError as e:
            replies.append(None)
            refused.append(str(e))
    return replies, refused


def split(n: int, nbytes: int, conns: int, min_share_bytes: int) -> list[range]:
    """Contiguous shares of n items for up to `conns` connections, each of at least
    min_share_bytes (a small batch is not worth a second connection)."""
    k = max(1, min(conns, n, nbytes // min_share_bytes))
    return [range(i * n // k, (i + 1) * n // k) for i in range(k)]


def run_all(executor: Executor | None, tasks: list[Callable]) -> list:
    """Run the tasks, the first on this thread and the rest on the executor, and wait for
    every one (payload views lent by the caller must not outlive the call); the first
    error is raised once all are done."""
    if len(tasks) == 1:
        return [tasks[0]()]
    futures = [executor.submit(t) for t in tasks[1:]]
    results, error = [], None
    try:
        results.append(tasks[0]())
    except BaseException as e:
        error = e
    for f in futures:
        try:
            results.append(f.result())
        except BaseException as e:
            error = error or e
    if error is not None:
        raise error
    return results
