"""The Redis tier: one self-describing value per block, pipelined, behind a circuit breaker.

    redis://[user:pass@]host:port/db?ttl=3600&prefix=kvtier:&timeout=0.25
    rediss://...               (TLS; ssl_ca_certs / ssl_certfile / ssl_keyfile / ssl_cert_reqs)
    redis+cluster://host:port  (redis-py's RedisCluster; keys spread over the slots)

- Keys are `prefix + hex(block key)`: the prefix lets several models or tenants share one
  Redis (and lets an operator SCAN or drop one namespace).
- One round trip per batch: the prefix probe is a pipeline of EXISTS for every key of the
  request, get() is one MGET (in a cluster, one MGET per slot, pipelined per node), and a
  write batch is one pipeline of SET ... EX ttl.
- Faults: every socket call has a timeout and redis-py's own retries are off (they would
  multiply the stall). A failed call is a miss or a skipped write, counted in stats, and
  feeds the circuit breaker; while it is open calls return at once. When Redis comes back
  the half-open probe succeeds and the tier simply works again.
- put() writes synchronously, straight from the blocks' memory (no joined copy of header
  and payload): under the tier hierarchy it already runs on that tier's writer thread, so
  the engine never waits on a socket. async=1 adds the tier's own background writer for
  callers that put() from a latency-sensitive thread (it snapshots the blocks first).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence

import redis
import torch
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.retry import Retry

from kvtier.kvstore.tiers.background_writer import BackgroundWriter
from kvtier.kvstore.tiers.byte_store import ByteStoreTier, StoreUnavailable
from kvtier.kvstore.circuit_breaker import CircuitBreaker
from kvtier.kvstore.format.codec import encode_block
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.socket_io import BatchedSender

DEFAULT_CAPACITY = 64 << 30  # informational: Redis's own maxmemory policy evicts
DEFAULT_QUEUE_BYTES = 256 << 20
_BATCH_BYTES = 64 << 20  # one write pipeline
# The zero-copy writer sends on redis-py's connection socket, a private attribute
# (`Connection._sock`) that redis-py 5-8 all have; a release without it gets the plain
# pipeline (`_write`) instead of an AttributeError.
RAW_SOCKET_WRITES = hasattr(redis.connection.Connection(), "_sock")
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_OPTIONS = ("codec", "ttl", "prefix", "timeout", "connect_timeout", "breaker_failures", "breaker_cooldown",
            "async", "queue") + _TLS_OPTIONS


def _send_sets(client: redis.Redis, keys: list[bytes], parts: Iterable[tuple[bytes, memoryview]], ttl) -> None:
    """SET key value [EX ttl] for each key, as one RESP pipeline on one pooled connection,
    each value sent as its two pieces (header, payload), with no joined copy, a batch of
    values per sendmsg. Any reply other than OK is an error."""
    expiry = b"" if ttl is None else b"$2\r\nEX\r\n$%d\r\n%d\r\n" % (len(str(ttl)), ttl)
    nargs = 3 if ttl is None else 5
    pool = client.connection_pool
    conn = pool.get_connection()
    pending = b""
    sent = 0
    try:
        if conn._sock is None:  # redis-py connects lazily; its socket carries the pipeline
            conn.connect()
        sock = conn._sock
        out = BatchedSender(sock)
        for key, (head, payload) in zip(keys, parts):
            size = len(head) + len(payload)
            command = b"*%d\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (nargs, len(key), key, size)
            out.add(pending + command + head, payload)
            pending = b"\r\n" + expiry
            sent += 1
        if sent:
            out.add(pending)
        out.flush()
        replies = [conn.read_response() for _ in range(sent)]
    except BaseException:
        conn.disconnect()  # a half-sent or half-read pipeline leaves the connection unusable
        raise
    finally:
        pool.release(conn)
    bad = [r for r in replies if r not in (b"OK", "OK", True)]
    if bad:
        raise ResponseError(f"unexpected SET reply {bad[0]!r}")


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
        async_writes: bool = False,
        max_queued_bytes: int = DEFAULT_QUEUE_BYTES,
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
        self.cluster = scheme == "redis+cluster"
        self.url = "redis://" + url.split("://", 1)[1] if self.cluster else url
        self.ttl = ttl or None  # 0 means no expiry
        self.prefix = prefix.encode()
        self.timeout = timeout
        self.connect_timeout = connect_timeout or timeout
        self._client_options = dict(client_options or {})
        self._client = None
        self._client_lock = threading.Lock()
        self.breaker = CircuitBreaker(breaker_failures, breaker_cooldown)
        self._closed = False
        self._writer = (
            BackgroundWriter(self._apply_batch, max_queued_bytes, _BATCH_BYTES, name="kvtier-redis-writer")
            if async_writes
            else None
        )

    @classmethod
    def from_spec(cls, spec, layout=None) -> "RedisTier":
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
            async_writes=spec.bool_option("async", False),
            max_queued_bytes=spec.size_option("queue", DEFAULT_QUEUE_BYTES),
            client_options={k: spec.options[k] for k in _TLS_OPTIONS if k in spec.options},
        )

    # --- connection, guarded by the breaker -------------------------------------------
    def _connect(self):
        opts = dict(self._client_options, socket_timeout=self.timeout, socket_connect_timeout=self.connect_timeout)
        if self.cluster:
            # Connects at once to learn the slot map, hence built lazily under the breaker.
            return redis.RedisCluster.from_url(self.url, retry=Retry(NoBackoff(), 0), **opts)
        return redis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 0), **opts)

    def _call(self, fn: Callable):
        """Run fn(client) if the breaker allows; StoreUnavailable on any store fault."""
        if self._closed or not self.breaker.allow():
            raise StoreUnavailable("redis: circuit open")
        try:
            if self._client is None:
                with self._client_lock:
                    if self._client is None:
                        self._client = self._connect()
            result = fn(self._client)
        except ResponseError as e:
            # The server answered (e.g. OOM under maxmemory): reachable, so not a breaker
            # failure, but this call did not do its job.
            self.breaker.record_success()
            raise StoreUnavailable(str(e)) from e
        except (RedisError, RedisClusterException, OSError) as e:
            self.breaker.record_failure()
            raise StoreUnavailable(str(e)) from e
        self.breaker.record_success()
        return result

    def _rkey(self, key: bytes) -> bytes:
        return self.prefix + key.hex().encode()

    # --- raw byte-store operations ----------------------------------------------------
    def _exists(self, keys: list[bytes]) -> list[bool]:
        if not keys:
            return []

        def probe(client):
            pipe = client.pipeline(transaction=False)
            for k in keys:
                pipe.exists(self._rkey(k))
            return pipe.execute()

        return [bool(n) for n in self._call(probe)]

    def _read(self, keys: list[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        rkeys = [self._rkey(k) for k in keys]
        if self.cluster:
            return self._call(lambda c: c.mget_nonatomic(rkeys))
        return self._call(lambda c: c.mget(rkeys))

    def _write(self, keys: list[bytes], values: list[bytes]) -> None:
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
        """Pipelined SETs written straight from the blocks' memory (single node): redis-py
        takes one buffer per value, so its own path (`_write`, the reference) must join
        header and payload first, a copy as costly as the send itself."""
        if self.cluster or not keys or not RAW_SOCKET_WRITES:
            return super()._write_parts(keys, parts)
        # `parts` is consumed lazily: each block is checksummed and sent while it is still
        # in the CPU cache, so its bytes come from memory once, as for a raw client.
        self._call(lambda client: _send_sets(client, [self._rkey(k) for k in keys], parts, self.ttl))

    # --- the Tier interface -----------------------------------------------------------
    def put(self, keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor]) -> None:
        if self._writer is None:
            return super().put(keys, blocks)
        if not keys:
            return
        if self.breaker.state == "open":  # don't spend encoding and queue space on a dead store
            self._stats.add(skipped_writes=len(keys))
            return
        values = [encode_block(k, b, self.codec) for k, b in zip(keys, blocks)]
        item = ([k.to_bytes() for k in keys], values)
        if self._closed or not self._writer.submit(item, sum(len(v) for v in values)):
            self._stats.add(skipped_writes=len(keys))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every put() so far is written (or dropped); False on timeout."""
        return True if self._writer is None else self._writer.flush(timeout)

    def close(self) -> None:
        if self._closed:
            return
        if self._writer is not None:
            self._writer.close()
        self._closed = True
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # closing a client to a dead server must not raise
                pass

    def _apply_batch(self, items: list[tuple[list[bytes], list[bytes]]]) -> None:
        start = time.perf_counter()
        keys = [k for ks, _ in items for k in ks]
        values = [v for _, vs in items for v in vs]
        try:
            self._write(keys, values)
        except StoreUnavailable:
            self._stats.add(errors=1, skipped_writes=len(keys))
            return
        self._stats.add(
            puts=len(keys), bytes_written=sum(len(v) for v in values), write_seconds=time.perf_counter() - start
        )
