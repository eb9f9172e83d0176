"""The grpc:// tier: blocks in one or more kv-servers (`kvtier kv-server`).

    grpc://host1:50051,host2:50051?token_file=/etc/kvtier/token&tls=1&ca=ca.pem&timeout=5

- Keys are spread over the servers by rendezvous hashing (service/rendezvous.py): adding a server
  moves about 1/n of the keys, and every engine with the same list agrees on the owner.
- A batch call sends one request per server, concurrently (a thread pool), each with a
  deadline. A server that fails or times out is a miss / a skipped write for its keys, the
  other servers still answer, and a circuit breaker per server stops paying timeouts to a
  dead one until a probe after the cool-down succeeds. Nothing raises into the engine.
- Block bytes travel over each server's bulk stream (service/bulk_protocol.py: plain frames on a
  TCP or TLS connection beside gRPC; puts run at about twice Python gRPC's speed, and gets
  land straight in the destination tensors) when it offers one; bulk=0 keeps them on
  gRPC's Put and Get. Lookups, deletes and stats are gRPC.
- Options: token_file (sent as `authorization: Bearer`), tls=1, ca=PEM (custom CA, e.g. a
  self-signed server), cert=PEM & key=PEM (a client certificate, for servers that require
  one: mutual TLS), server_name (TLS name to expect), namespace (`kvtier-namespace`),
  timeout (seconds per call), max_message (must not exceed the servers'
  --max-message-bytes), bulk, failures / cooldown (circuit breaker), codec, size.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch

from kvtier.kvstore.tiers.byte_store import ByteStoreTier, StoreUnavailable
from kvtier.kvstore.circuit_breaker import CircuitBreaker
from kvtier.kvstore.service.client import KVServerClient
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.serial_torch import serial_torch_thread
from kvtier.kvstore.service.bulk_client import BulkClient
from kvtier.kvstore.service.protocol import BULK_TRANSFER_OPTIONS
from kvtier.kvstore.service.rendezvous import Rendezvous
from kvtier.kvstore.service.tls import client_context

log = logging.getLogger(__name__)

# The servers hold what they hold; this number is only what the tier reports as capacity.
DEFAULT_CAPACITY = 1 << 40
DEFAULT_MAX_MESSAGE = 16 << 20  # the kv-server's default --max-message-bytes
_OPTIONS = ("token_file", "tls", "ca", "cert", "key", "server_name", "namespace", "timeout", "max_message",
            "bulk", "failures", "cooldown", "codec")
_FAILED = object()  # a server call that failed or was skipped by its breaker


class GrpcTier(ByteStoreTier):
    name = "grpc"

    def __init__(
        self,
        servers: Sequence[str],
        capacity_bytes: int = DEFAULT_CAPACITY,
        *,
        codec: str = "raw",
        token: str | None = None,
        tls: bool = False,
        ca_cert: bytes | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        server_name: str | None = None,
        namespace: str | None = None,
        timeout_s: float = 5.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
        bulk: bool = True,
        failure_threshold: int = 3,
        cooldown_s: float = 5.0,
    ):
        super().__init__(capacity_bytes, codec)
        servers = [s.strip() for s in servers if s.strip()]
        if not servers:
            raise ValueError("grpc tier: needs at least one server, e.g. grpc://host:50051")
        if timeout_s <= 0:
            raise ValueError(f"grpc tier: timeout must be positive, got {timeout_s}")
        if max_message_bytes < 4096:
            raise ValueError(f"grpc tier: max_message must be at least 4096 bytes, got {max_message_bytes}")
        if (ca_cert or server_name or client_cert) and not tls:
            raise ValueError("grpc tier: ca / cert / server_name need tls=1")
        if bool(client_cert) != bool(client_key):
            raise ValueError("grpc tier: cert and key go together")
        self.timeout_s = timeout_s
        self._ring = Rendezvous(servers)
        metadata = []
        if token:
            metadata.append(("authorization", f"Bearer {token}"))
        if namespace:
            metadata.append(("kvtier-namespace", namespace))
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            # What comes back is chunked by the server to its own limit and checksummed here.
            ("grpc.max_receive_message_length", -1),
            # Reconnect quickly once a restarted server is back (the default backoff grows
            # to two minutes); the circuit breaker already limits calls to a dead server.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
            # Its own connection per tier object: gRPC otherwise shares one TCP connection
            # among all channels to the same address in the process.
            ("grpc.use_local_subchannel_pool", 1),
            *BULK_TRANSFER_OPTIONS,
        ]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        credentials, bulk_tls = (_tls(ca_cert, client_cert, client_key) if tls else (None, None))

        def bulk_client(host: str, open_bulk) -> BulkClient:
            return BulkClient(host, open_bulk, timeout_s=timeout_s, ssl_context=bulk_tls, server_hostname=server_name)

        self._servers: list[KVServerClient] = []
        for address in servers:
            channel = (grpc.secure_channel(address, credentials, options=options) if tls
                       else grpc.insecure_channel(address, options=options))
            self._servers.append(KVServerClient(
                address, channel, metadata=tuple(metadata) or None, timeout_s=timeout_s,
                max_message_bytes=max_message_bytes, breaker=CircuitBreaker(failure_threshold, cooldown_s),
                bulk=bulk_client if bulk else None))
        # Calls in progress per server: the ones a caller gave up waiting on are among them.
        self._in_flight = [0] * len(self._servers)
        self._in_flight_lock = threading.Lock()
        # One thread per server: a batch touching every server waits for the slowest only.
        self._pool = ThreadPoolExecutor(len(servers), "kvtier-grpc", initializer=serial_torch_thread) \
            if len(servers) > 1 else None

    @classmethod
    def from_spec(cls, spec, layouts=None) -> "GrpcTier":
        spec.check_options(_OPTIONS)
        hosts = spec.target.split("://", 1)[-1].split(",")
        for host in hosts:
            if not host.rpartition(":")[2].isdigit():
                raise ValueError(f"tier spec {spec.text!r}: server {host!r} is not HOST:PORT")

        def read(option: str) -> bytes | None:
            path = spec.option(option)
            if path is None:
                return None
            try:
                return Path(path).expanduser().read_bytes()
            except OSError as e:
                raise ValueError(f"tier spec {spec.text!r}: cannot read {option} {path}: {e.strerror or e}")

        token = read("token_file")
        return cls(
            hosts,
            spec.size or DEFAULT_CAPACITY,
            codec=spec.option("codec", "raw"),
            token=token.decode().strip() if token else None,
            tls=spec.bool_option("tls", False),
            ca_cert=read("ca"),
            client_cert=spec.option("cert"),
            client_key=spec.option("key"),
            server_name=spec.option("server_name"),
            namespace=spec.option("namespace"),
            timeout_s=spec.seconds_option("timeout", 5.0),
            max_message_bytes=spec.size_option("max_message", DEFAULT_MAX_MESSAGE),
            bulk=spec.bool_option("bulk", True),
            failure_threshold=spec.int_option("failures", 3, minimum=1),
            cooldown_s=spec.seconds_option("cooldown", 5.0, allow_zero=True),
        )

    # --- fan-out over the servers -----------------------------------------------------
    def _each_server(self, keys: list[bytes], call: Callable[[KVServerClient, list[int]], object]):
        """Run call(server, positions of its keys) per owning server, concurrently.

        Returns [(positions, result or _FAILED)]; raises StoreUnavailable when no server
        answered (the caller then counts the whole batch as failed)."""
        groups = list(self._ring.assign(keys).items())
        if not groups:
            return []

        def one(node: int, positions: list[int]):
            server = self._servers[node]
            if not server.breaker.allow():
                return _FAILED
            with self._in_flight_lock:
                self._in_flight[node] += 1
            try:
                result = call(server, positions)
            except (grpc.RpcError, OSError) as e:  # OSError: the bulk stream (a BulkError or the socket's)
                server.breaker.record_failure()
                if not server.down:  # log the transition, not every failed call while it lasts
                    server.down = True
                    log.warning("grpc tier: %s failed (%s); its keys are misses until it answers",
                                server.address, _describe(e))
                return _FAILED
            finally:
                with self._in_flight_lock:
                    self._in_flight[node] -= 1
            server.breaker.record_success()
            if server.down:
                server.down = False
                log.info("grpc tier: %s is answering again", server.address)
            return result

        if self._pool is None or len(groups) == 1:
            results = [one(node, positions) for node, positions in groups]
        else:
            futures = [self._pool.submit(one, node, positions) for node, positions in groups]
            results = [f.result() for f in futures]
        if all(r is _FAILED for r in results):
            raise StoreUnavailable("no kv-server answered")
        failed = sum(r is _FAILED for r in results)
        if failed:
            self._stats.add(errors=failed)
        return [(positions, r) for (_, positions), r in zip(groups, results)]

    def missed_deadline(self) -> None:
        """A caller stopped waiting for this tier (a lookup past its budget): each server with
        a call still in progress counts a breaker failure now, not after `timeout`."""
        with self._in_flight_lock:
            busy = [s for s, n in zip(self._servers, self._in_flight) if n > 0]
        for server in busy:
            server.breaker.record_failure()

    def _scatter(self, keys: list[bytes], call, default) -> list:
        out = [default] * len(keys)
        for positions, result in self._each_server(keys, call):
            if result is not _FAILED:
                for pos, value in zip(positions, result):
                    out[pos] = value
        return out

    # --- raw byte-store operations ----------------------------------------------------
    def _exists(self, keys: list[bytes]) -> list[bool]:
        return self._scatter(keys, lambda server, pos: server.lookup([keys[i] for i in pos]), False)

    def _read(self, keys: list[bytes]) -> list[memoryview | bytearray | None]:
        return self._scatter(keys, lambda server, pos: server.get([keys[i] for i in pos]), None)

    def _read_into(self, raw_keys: list[bytes], keys: Sequence[BlockKey], into: Sequence[torch.Tensor]):
        def read(server: KVServerClient, positions: list[int]):
            return server.get_into([keys[i] for i in positions], [into[i] for i in positions])

        ok, corrupt, nbytes = [False] * len(keys), [], 0
        for positions, result in self._each_server(raw_keys, read):
            if result is _FAILED:
                continue
            for pos, hit in zip(positions, result[0]):
                ok[pos] = hit
            corrupt += [positions[i] for i in result[1]]
            nbytes += result[2]
        return ok, corrupt, nbytes

    def _write(self, keys: list[bytes], values: list[bytes]) -> None:
        results = self._each_server(
            keys, lambda server, pos: server.put_values([keys[i] for i in pos], [values[i] for i in pos]))
        skipped = sum(len(p) for p, r in results if r is _FAILED)
        if skipped:
            self._stats.add(skipped_writes=skipped)

    def _remove(self, keys: list[bytes]) -> None:
        self._each_server(keys, lambda server, pos: server.delete([keys[i] for i in pos]))

    # --- the Tier interface -----------------------------------------------------------
    def put(self, keys: Sequence[BlockKey], blocks: Sequence[torch.Tensor]) -> None:
        """As ByteStoreTier.put, but each server's blocks are encoded inside its request
        stream (service/client.put_blocks), overlapping encoding with sending."""
        if not keys:
            return
        start = time.perf_counter()

        def put(server: KVServerClient, positions: list[int]) -> int:
            return server.put_blocks([keys[i] for i in positions], [blocks[i] for i in positions], self.codec)

        try:
            results = self._each_server([k.to_bytes() for k in keys], put)
        except StoreUnavailable:
            self._stats.add(errors=1, skipped_writes=len(keys))
            return
        stored = sum(len(p) for p, r in results if r is not _FAILED)
        self._stats.add(
            puts=stored,
            skipped_writes=len(keys) - stored,
            bytes_written=sum(r for _, r in results if r is not _FAILED),
            write_seconds=time.perf_counter() - start,
        )
        if self._events is not None and self._events.active:  # sizes: the blocks' raw bytes
            done = [i for p, r in results if r is not _FAILED for i in p]
            self._events.stored([keys[i] for i in done], [blocks[i].numel() * blocks[i].element_size() for i in done])

    # --- maintenance ------------------------------------------------------------------
    def server_stats(self) -> dict[str, dict | None]:
        """Each server's Stats (None for one that does not answer); not for hot paths."""
        out: dict[str, dict | None] = {}
        for server in self._servers:
            try:
                out[server.address] = server.stats()
            except grpc.RpcError:
                out[server.address] = None
        return out

    def breaker_states(self) -> dict[str, str]:
        """Each server's circuit-breaker state, by address (for metrics)."""
        return {server.address: server.breaker.state for server in self._servers}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for server in self._servers:
            server.close()


def _tls(ca_cert: bytes | None, client_cert: str | None, client_key: str | None):
    """(gRPC channel credentials, ssl context for the bulk stream): the same CA and client
    certificate for both."""
    cert_pem = key_pem = None
    if client_cert:
        try:
            cert_pem, key_pem = Path(client_cert).read_bytes(), Path(client_key).read_bytes()
        except OSError as e:
            raise ValueError(f"grpc tier: cannot read the client certificate or key: {e.strerror or e}")
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_cert, private_key=key_pem,
                                               certificate_chain=cert_pem)
    return credentials, client_context(ca_cert, client_cert, client_key)


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"
