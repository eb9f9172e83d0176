"""The Redis tier: one self-describing value per block, pipelined, behind a circuit breaker.

    redis://[user:pass@]host:port/db?ttl=3600&prefix=kvtier:&timeout=0.25
    rediss://...               (TLS; ssl_ca_certs / ssl_certfile / ssl_keyfile / ssl_cert_reqs)
    redis+cluster://host:port  (redis-py's RedisCluster; keys spread over the slots)

- Keys are `prefix + hex(block key)`: the prefix lets several models or tenants share one
  Redis (and lets an operator SCAN or drop one namespace).
- One round trip per batch: the prefix probe is a pipeline of EXISTS for every key of the
  request, get() a window of pipelined MGETs of ~2 MiB each (per slot in a cluster; Redis
  builds each reply whole, so small ones keep its reply buffers warm: redis_batches.py),
  and a write batch is one pipeline of SET ... EX ttl.
- Faults: every socket call has a timeout and redis-py's own retries are off (they would
  multiply the stall). A failed call is a miss or a skipped write, counted in stats, and
  feeds the circuit breaker; while it is open calls return at once. When Redis comes back
  the half-open probe succeeds and the tier simply works again.
- Block transfers (get's MGETs, put's SETs) go over the tier's own sockets
  (redis_conns.py), opened with the URL's host, port, database and credentials and the TLS
  options: a value's payload is received straight into its block and verified in place
  (redis_resp.py), and a put sends each block's header and payload with no joined copy, a
  batch per sendmsg. A batch of at least SPLIT_BYTES per connection is split over up to
  `conns=` connections in parallel (default DEFAULT_CONNS, measured: README, Redis tier).
  A single node's EXISTS probes go over them too (on the path from lookup to load); redis-py
  keeps the rest: a cluster's EXISTS probes, DEL, and a cluster's slot map (refreshed when a
  node redirects one of the tier's own batches: redis_cluster.py).
- A torn, malformed or late reply closes that connection; its values not yet verified are
  misses (never wrong KV). `timeout` bounds each socket call; a get's whole batch is
  bounded by `timeout` plus its bytes at SLOWEST_RATE (checked between reads, so a
  trickling server overruns that by at most one `timeout`).
- put() writes synchronously: under the tier hierarchy it runs on this tier's writer
  thread, so the engine never waits on a socket; `queue=` bounds that writer's queue in
  bytes. (The former `async=1`, a second queue inside the tier, is gone: one writer per tier.)
- redis-py 5.0 to 8.x (pyproject; tried with 5.0.0 and 8.1): only its public API is used
  (from_url, pipeline, exists, delete, RedisCluster's keyslot / get_node_from_key /
  nodes_manager.initialize).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import redis
import torch
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.retry import Retry

from kvtier.kvstore.circuit_breaker import CircuitBreaker
from kvtier.kvstore.format.codec import key_digest
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.serial_torch import serial_torch_thread
from kvtier.kvstore.tiers.byte_store import ByteStoreTier, StoreUnavailable
from kvtier.kvstore.tiers.redis_batches import (GetBatch, run_all, run_exists_batch, run_get_batch,
                                                   run_set_batch, split)
from kvtier.kvstore.tiers.redis_cluster import node_groups, node_shares, refresh_slots, slots_moved
from kvtier.kvstore.tiers.redis_conns import ConnectionPool, Endpoint, tls_context
from kvtier.kvstore.tiers.redis_resp import RespError

DEFAULT_CAPACITY = 64 << 30  # informational: Redis's own maxmemory policy evicts
DEFAULT_CONNS = 1  # parallel connections per batch; 2-4 gained nothing on a 2-core host (README)
SPLIT_BYTES = 1 << 20  # a batch is split only so that each connection moves at least this
# A get batch may take `timeout` plus its bytes at this rate: an 80 MB prefix gets 1 s more,
# and a store slower than this loses to recompute anyway.
SLOWEST_RATE = 100e6  # bytes/s
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_OPTIONS = ("codec", "ttl", "prefix", "timeout", "connect_timeout", "breaker_failures", "breaker_cooldown",
            "queue", "conns") + _TLS_OPTIONS


class RedisTier(ByteStoreTier):
    name = "redis"

    def __init__(
        self,
        url: str,
        capacity_bytes: int = DEFAULT_CAPACITY,
        *,
        codec: str = "raw",
        ttl: int | None = None,
        prefix: str = "kvtier:",
        timeout: float = 0.25,
        connect_timeout: float | None = None,
        breaker_failures: int = 3,
        breaker_cooldown: float = 5.0,
        write_queue_bytes: int | None = None,
        conns: int = DEFAULT_CONNS,
        client_options: dict | None = None,
    ):
        super().__init__(capacity_bytes, codec)
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme not in ("redis", "rediss", "redis+cluster"):
            raise ValueError(f"redis tier: expected a redis://, rediss:// or redis+cluster:// URL, got {url!r}")
        if timeout <= 0 or (connect_timeout is not None and connect_timeout <= 0):
            raise ValueError("redis tier: timeouts must be positive")
        if ttl is not None and ttl < 0:
            raise ValueError(f"redis tier: ttl must be >= 0 seconds, got {ttl}")
        if write_queue_bytes is not None and write_queue_bytes <= 0:
            raise ValueError(f"redis tier: queue must be positive, got {write_queue_bytes}")
        if conns < 1:
            raise ValueError(f"redis tier: conns must be >= 1, got {conns}")
        self.cluster = scheme == "redis+cluster"
        self.url = "redis://" + url.split("://", 1)[1] if self.cluster else url
        self.ttl = ttl or None  # 0 means no expiry
        self.prefix = prefix.encode()
        self.timeout = timeout
        self.connect_timeout = connect_timeout or timeout
        self.conns = conns
        self._client_options = dict(client_options or {})
        tls = tls_context(self._client_options) if scheme == "rediss" else None
        self._endpoint = Endpoint.from_url(self.url, tls, self.timeout, self.connect_timeout)
        self._pools: dict[tuple[str, int], ConnectionPool] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._client = None
        self._client_lock = threading.Lock()
        self.breaker = CircuitBreaker(breaker_failures, breaker_cooldown)
        self.write_queue_bytes = write_queue_bytes
        self._closed = False

    @classmethod
    def from_spec(cls, spec, layouts=None) -> "RedisTier":
        if "async" in spec.options:
            raise ValueError(f"tier spec {spec.text!r}: option async was removed: the tier hierarchy "
                             "writes every redis tier on its own writer thread (bound it with queue=SIZE)")
        spec.check_options(_OPTIONS)
        return cls(
            spec.target,
            spec.size or DEFAULT_CAPACITY,
            codec=spec.option("codec", "raw"),
            ttl=spec.int_option("ttl", None, minimum=0),
            prefix=spec.option("prefix", "kvtier:"),
            timeout=spec.seconds_option("timeout", 0.25),
            connect_timeout=spec.seconds_option("connect_timeout", None),
            breaker_failures=spec.int_option("breaker_failures", 3, minimum=1),
            breaker_cooldown=spec.seconds_option("breaker_cooldown", 5.0, allow_zero=True),
            write_queue_bytes=spec.size_option("queue"),
            conns=spec.int_option("conns", DEFAULT_CONNS, minimum=1),
            client_options={k: spec.options[k] for k in _TLS_OPTIONS if k in spec.options},
        )

    # --- connection, guarded by the breaker -------------------------------------------
    def _connect(self):
        opts = dict(self._client_options, socket_timeout=self.timeout, socket_connect_timeout=self.connect_timeout)
        if self.cluster:
            # Connects at once to learn the slot map, hence built lazily under the breaker.
            return redis.RedisCluster.from_url(self.url, retry=Retry(NoBackoff(), 0), **opts)
        return redis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 0), **opts)

    def _redis(self):
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = self._connect()
        return self._client

    def _call(self, fn: Callable, client: bool = True):
        """Run fn(client) if the breaker allows; StoreUnavailable on any store fault.
        client=False: fn(None), for calls that use only the tier's own connections."""
        if self._closed or not self.breaker.allow():
            raise StoreUnavailable("redis: circuit open")
        try:
            result = fn(self._redis() if client else None)
        except (ResponseError, RespError) as e:
            # The server answered (e.g. OOM under maxmemory): reachable, so not a breaker
            # failure, but this call did not do its job.
            self.breaker.record_success()
            raise StoreUnavailable(str(e)) from e
        except (RedisError, RedisClusterException, OSError) as e:
            self.breaker.record_failure()
            raise StoreUnavailable(str(e)) from e
        self.breaker.record_success()
        return result

    def missed_deadline(self) -> None:
        """A caller stopped waiting for a call to this store (a lookup past its budget): count
        the failure on the breaker now, not only when the socket timeout ends the call."""
        self.breaker.record_failure()

    def _rkey(self, key: bytes) -> bytes:
        return self.prefix + key.hex().encode()

    def _pool(self, host: str | None = None, port: int | None = None) -> ConnectionPool:
        endpoint = self._endpoint if host is None else self._endpoint.node(host, port)
        where = (endpoint.host, endpoint.port)
        with self._client_lock:
            pool = self._pools.get(where)
            if pool is None:
                pool = self._pools[where] = ConnectionPool(endpoint, max_idle=2 * self.conns)
            return pool

    def _in_parallel(self, tasks: list[Callable]) -> list:
        if len(tasks) > 1 and self._executor is None:
            with self._client_lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max(self.conns, 8) - 1, thread_name_prefix="kvtier-redis",
                                                        initializer=serial_torch_thread)
        return run_all(self._executor, tasks)

    # --- raw byte-store operations ----------------------------------------------------
    def _exists(self, keys: list[bytes]) -> list[bool]:
        """One pipeline of EXISTS: over the tier's own connection (a single node), or
        redis-py's cluster pipeline, which routes each key to its node."""
        if not keys:
            return []
        rkeys = [self._rkey(k) for k in keys]
        if not self.cluster:
            return self._call(lambda _: run_exists_batch(self._pool(), rkeys, self.timeout), client=False)

        def probe(client):
            pipe = client.pipeline(transaction=False)
            for k in rkeys:
                pipe.exists(k)
            return pipe.execute()

        return [bool(n) for n in self._call(probe)]

    def _read(self, keys: list[bytes]) -> list[bytes | None]:
        """redis-py's MGET: the reference the block path is tested against."""
        if not keys:
            return []
        rkeys = [self._rkey(k) for k in keys]
        if self.cluster:
            return self._call(lambda c: c.mget_nonatomic(rkeys))
        return self._call(lambda c: c.mget(rkeys))

    def _read_into(self, raw_keys: list[bytes], keys: Sequence[BlockKey], into: Sequence[torch.Tensor]):
        """MGETs over the tier's own connections, payloads received into the tensors."""
        if not keys:
            return [], [], 0
        rkeys = [self._rkey(k) for k in raw_keys]
        digests = [key_digest(k) for k in keys]
        ok, corrupt = [False] * len(keys), []
        nbytes, refused = self._get(rkeys, digests, into, ok, corrupt, range(len(keys)))
        if self.cluster and slots_moved(refused):  # resharded: learn the new map, ask once more
            self._call(refresh_slots)
            bad = set(corrupt)
            more, refused = self._get(rkeys, digests, into, ok, corrupt,
                                      [p for p in range(len(keys)) if not ok[p] and p not in bad])
            nbytes += more
        for message in refused:
            self._fault("get", RespError(message))
        return ok, sorted(corrupt), nbytes

    def _get(self, rkeys, digests, into, ok, corrupt, positions: Sequence[int]) -> tuple[int, list[str]]:
        """One round of get batches for `positions`: (bytes read, error replies)."""
        if self.cluster:
            groups = self._call(lambda c: node_groups(c, rkeys, positions))
            batches = [GetBatch(self._pool(*where), list(slots.values())) for where, slots in groups.items()]
        else:
            if self._closed or not self.breaker.allow():
                raise StoreUnavailable("redis: circuit open")
            nbytes = sum(into[p].nbytes for p in positions)
            batches = [GetBatch(self._pool(), [[positions[i] for i in r]])
                       for r in split(len(positions), nbytes, self.conns, SPLIT_BYTES)]

        def budget(batch: GetBatch) -> float:
            return self.timeout + sum(into[p].nbytes for g in batch.groups for p in g) / SLOWEST_RATE

        results = self._in_parallel(
            [lambda b=b: run_get_batch(b, rkeys, digests, into, ok, corrupt, budget(b)) for b in batches])
        broken = [r.broken for r in results if r.broken is not None]
        if broken:
            self.breaker.record_failure()
            self._fault("get", broken[0])
        else:
            self.breaker.record_success()
        return sum(r.nbytes for r in results), [m for r in results for m in r.refused]

    def _write(self, keys: list[bytes], values: list[bytes]) -> None:
        """redis-py's pipelined SETs of joined values: the reference for the block path."""
        def store(client):
            pipe = client.pipeline(transaction=False)
            for k, v in zip(keys, values):
                pipe.set(self._rkey(k), v, ex=self.ttl)
            pipe.execute()

        if keys:
            self._call(store)

    def _remove(self, keys: list[bytes]) -> None:
        if keys:
            self._call(lambda c: c.delete(*[self._rkey(k) for k in keys]))

    def _write_parts(self, keys: list[bytes], parts: Iterable[tuple[bytes, memoryview]]) -> None:
        """Pipelined SETs sent straight from the blocks' memory over the tier's own
        connections: one lazily consumed stream, or shares over `conns` of them."""
        if not keys:
            return
        rkeys = [self._rkey(k) for k in keys]

        def run(shares, items):
            self._in_parallel([lambda pool=pool, idx=idx: run_set_batch(
                pool, [rkeys[i] for i in idx], [items[i] for i in idx], self.ttl, self.timeout)
                for pool, idx in shares])

        def send_by_node(client, items):
            run([(self._pool(*w), idx) for w, idx in node_shares(client, rkeys).items()], items)

        def send(client):
            if self.cluster:
                items = list(parts)
                try:
                    return send_by_node(client, items)
                except RespError as e:
                    if not slots_moved([str(e)]):
                        raise
                refresh_slots(client)  # resharded: learn the new map, send again (SET is idempotent)
                return send_by_node(client, items)
            if self.conns == 1:
                return run_set_batch(self._pool(), rkeys, parts, self.ttl, self.timeout)
            items = list(parts)  # encoded lazily; payloads are still views of the blocks
            nbytes = sum(len(h) + len(p) for h, p in items)
            run([(self._pool(), r) for r in split(len(items), nbytes, self.conns, SPLIT_BYTES)], items)

        self._call(send)

    # --- the Tier interface -----------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        with self._client_lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()
        if self._client is not None:
            try:
                self._client.close()
            except Exception as e:  # closing a client to a dead server must not raise
                self._fault("close", e)
