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
  and payload): under the tier hierarchy it runs on this tier's writer thread, so the
  engine never waits on a socket; `queue=` bounds that writer's queue in bytes. (The
  former `async=1`, a second queue inside the tier, is gone: one writer per tier.)
- redis-py 5.0 to 8.x (pyproject; tried with 5.0.0, 5.0.8 and 8.1). The zero-copy writer
  uses two of its internals: the pooled connection's socket (`Connection._sock`) and
  `get_connection`'s signature (a command name required before 5.3, deprecated after).
  Without the socket, or if the pool refuses the call, writes take redis-py's public
  pipeline instead (logged once).
"""
from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterable

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError
from redis.retry import Retry

from kvtier.kvstore.circuit_breaker import CircuitBreaker
from kvtier.kvstore.socket_io import BatchedSender
from kvtier.kvstore.tiers.byte_store import ByteStoreTier, StoreUnavailable

DEFAULT_CAPACITY = 64 << 30  # informational: Redis's own maxmemory policy evicts
# The zero-copy writer sends on redis-py's connection socket, a private attribute
# (`Connection._sock`) that redis-py 5-8 all have; a release without it gets the plain
# pipeline (`_write`) instead of an AttributeError.
RAW_SOCKET_WRITES = hasattr(redis.connection.Connection(), "_sock")


def _command_name_required() -> bool:
    """redis-py < 5.3 requires get_connection(command_name); 5.3+ makes it optional and
    warns when it is passed. Asked once, of the signature, so both get what they accept."""
    try:
        param = inspect.signature(redis.ConnectionPool.get_connection).parameters.get("command_name")
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


_GET_CONNECTION_ARGS = ("SET",) if _command_name_required() else ()
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_OPTIONS = ("codec", "ttl", "prefix", "timeout", "connect_timeout", "breaker_failures", "breaker_cooldown",
            "queue") + _TLS_OPTIONS


class _RawWriterUnsupported(Exception):
    """The installed redis-py does not offer what the raw writer needs (nothing was sent)."""


_MISSING = object()


def _send_sets(client: redis.Redis, keys: list[bytes], parts: Iterable[tuple[bytes, memoryview]], ttl) -> None:
    """SET key value [EX ttl] for each key, as one RESP pipeline on one pooled connection,
    each value sent as its two pieces (header, payload), with no joined copy, a batch of
    values per sendmsg. Any reply other than OK is an error."""
    expiry = b"" if ttl is None else b"$2\r\nEX\r\n$%d\r\n%d\r\n" % (len(str(ttl)), ttl)
    nargs = 3 if ttl is None else 5
    pool = client.connection_pool
    try:
        conn = pool.get_connection(*_GET_CONNECTION_ARGS)
    except TypeError as e:  # a signature this module does not know
        raise _RawWriterUnsupported("redis-py's get_connection() refused the call") from e
    pending = b""
    sent = 0
    try:
        if getattr(conn, "_sock", _MISSING) is _MISSING:
            raise _RawWriterUnsupported("redis-py's connection has no _sock")
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
        write_queue_bytes: int | None = None,
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
        self.write_queue_bytes = write_queue_bytes
        self._raw_writes = RAW_SOCKET_WRITES
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

    def missed_deadline(self) -> None:
        """A caller stopped waiting for a call to this store (a lookup past its budget): count
        the failure on the breaker now, not only when the socket timeout ends the call."""
        self.breaker.record_failure()

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
        if self.cluster or not keys or not (self._raw_writes and RAW_SOCKET_WRITES):
            return super()._write_parts(keys, parts)
        # `parts` is consumed lazily: each block is checksummed and sent while it is still
        # in the CPU cache, so its bytes come from memory once, as for a raw client.
        try:
            self._call(lambda client: _send_sets(client, [self._rkey(k) for k in keys], parts, self.ttl))
        except _RawWriterUnsupported as e:
            # This redis-py's internals differ from what the raw writer expects (nothing was
            # sent, `parts` is untouched): use the public pipeline from now on.
            self._raw_writes = False
            self._faults.record("redis.raw_writer", e.__cause__ or e)
            super()._write_parts(keys, parts)

    # --- the Tier interface -----------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._client is not None:
            try:
                self._client.close()
            except Exception as e:  # closing a client to a dead server must not raise
                self._fault("close", e)
