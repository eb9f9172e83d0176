"""The kv-server's section of the config tree (`kv_server`): one validated dataclass whose
fields are the server's flags (--listen, --capacity, ...), its KVTIER_KV_SERVER_* variables
and its `kv_server:` keys in a --config file."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from kvtier.config_tree import (LoggingConfig, Resolved, build, defaults_layer, env_layer, file_layer, flags_layer,
                                keys_from_dataclass, load_config_file, merge)
from kvtier.kvstore.service.server.limits import BulkLimits

SECTION = "kv_server"
_LIMITS = BulkLimits()


def _f(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class KVServerConfig:
    listen: str = _f("127.0.0.1:50051", "HOST:PORT to bind (port 0: any free port, printed)")
    capacity: int = _f(8 << 30, "memory budget, LRU over bytes (e.g. 8GiB)", size=True)
    persist: str | None = _f(None, "LMDB directory behind the memory store", metavar="PATH")
    persist_capacity: int | None = _f(None, "LMDB budget (default: capacity)", size=True)
    max_message_bytes: int = _f(16 << 20, "largest gRPC message either way; bigger blocks travel as chunks",
                                size=True)
    workers: int = _f(16, "handler threads (concurrent calls)")
    auth_token_file: str | None = _f(None, "tokens clients must send as 'authorization: Bearer <token>', "
                                           "one per line", metavar="F")
    namespace_per_token: bool = _f(False, "each token sees only its own keys")
    tls_cert: str | None = _f(None, "PEM certificate chain (enables TLS with tls_key)")
    tls_key: str | None = _f(None, "PEM private key")
    tls_client_ca: str | None = _f(None, "mutual TLS: clients must present a certificate signed by this CA",
                                   metavar="F")
    bulk_listen: str = _f("auto", "the bulk stream's TCP port for Put bytes ('auto': listen's host, any free "
                                  "port; 'off': none, puts go through gRPC)", metavar="HOST:PORT")
    bulk_advertise_host: str = _f("", "host clients should dial for the bulk stream (default: the host they "
                                      "reached gRPC on)")
    drain_seconds: float = _f(10.0, "how long SIGTERM waits for in-flight calls")
    metrics_port: int | None = _f(None, "serve Prometheus /metrics on this port (0: any free port)")
    # Limits against hostile or broken clients (limits.py, admission.py); a tenant is a token.
    bulk_handshake_timeout: float = _f(_LIMITS.handshake_timeout_s, "seconds from accept to a redeemed ticket "
                                       "on the bulk port, the whole handshake", metavar="S")
    bulk_max_connections: int = _f(_LIMITS.max_connections, "bulk connections in all, ticketed or not")
    bulk_max_unauthenticated: int = _f(_LIMITS.max_unauthenticated, "bulk connections still without a ticket "
                                       "(the oldest is dropped for a new one)")
    bulk_max_unauthenticated_per_address: int = _f(_LIMITS.max_unauthenticated_per_address,
                                                   "the same, per client address")
    bulk_max_connections_per_tenant: int = _f(_LIMITS.max_connections_per_tenant,
                                              "ticketed bulk connections per tenant (token)")
    bulk_max_tickets: int = _f(_LIMITS.max_tickets, "unused bulk tickets in all")
    bulk_max_tickets_per_tenant: int = _f(_LIMITS.max_tickets_per_tenant, "unused bulk tickets per tenant; "
                                          "more OpenBulk calls are RESOURCE_EXHAUSTED")
    bulk_max_inflight: int = _f(_LIMITS.max_inflight_bytes, "received block bytes not yet stored, in all",
                                size=True)
    bulk_max_inflight_per_tenant: int = _f(_LIMITS.max_inflight_bytes_per_tenant, "the same, per tenant",
                                           size=True)
    max_health_watches: int = _f(64, "open grpc.health.v1 Watch streams (they hold no worker thread)")

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers: must be >= 1, got {self.workers}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert: --tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca: --tls-client-ca needs --tls-cert and --tls-key")
        if self.max_message_bytes < 4096:
            raise ValueError(f"max_message_bytes: --max-message-bytes must be at least 4096, "
                             f"got {self.max_message_bytes}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port: must be a port number, got {self.metrics_port}")

    def bulk_limits(self) -> BulkLimits:
        """ValueError naming the bad limit (BulkLimits validates)."""
        return BulkLimits(
            handshake_timeout_s=self.bulk_handshake_timeout, max_connections=self.bulk_max_connections,
            max_unauthenticated=self.bulk_max_unauthenticated,
            max_unauthenticated_per_address=self.bulk_max_unauthenticated_per_address,
            max_connections_per_tenant=self.bulk_max_connections_per_tenant, max_tickets=self.bulk_max_tickets,
            max_tickets_per_tenant=self.bulk_max_tickets_per_tenant, max_inflight_bytes=self.bulk_max_inflight,
            max_inflight_bytes_per_tenant=self.bulk_max_inflight_per_tenant)


def kv_server_keys() -> list:
    return keys_from_dataclass(KVServerConfig, lambda f: SECTION) + keys_from_dataclass(
        LoggingConfig, lambda f: "logging")


def resolve_kv_server(args: argparse.Namespace, environ) -> Resolved:
    """The kv-server tree from flags (`args`, incl. --config) > environment > file > defaults."""
    keys = kv_server_keys()
    layers = [defaults_layer(keys)]
    if getattr(args, "config", None):
        # Top-level keys (LMCache's tier keys) configure the engine's tiers, not this server.
        layers.append(file_layer(keys, load_config_file(args.config), top_level=lambda _file: {}))
    layers += [env_layer(keys, environ), flags_layer(keys, args)]
    return merge(keys, layers)


def build_kv_server_config(resolved: Resolved) -> KVServerConfig:
    return build(KVServerConfig, resolved, [k for k in resolved.keys if k.section == SECTION])
