"""`kvtier kv-server`: flags, startup, and a clean SIGTERM drain.

    kvtier kv-server --listen 0.0.0.0:50051 --capacity 8GiB --persist /var/lib/kvtier \
        --auth-token-file tokens.txt --tls-cert cert.pem --tls-key key.pem

Also runnable as `python -m kvtier.kvstore.service.server.main ...` (the tests do that). Once
bound it prints one line, `kvtier kv-server listening on HOST:PORT`, with the real port when
--listen asked for port 0.
"""
from __future__ import annotations

import argparse
import os
import signal
import ssl
import sys
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc

from kvtier.config_tree import add_key_flags, configure_logging
from kvtier.kvstore.service.server.config import (KVServerConfig, build_kv_server_config, kv_server_keys,
                                                  resolve_kv_server)
from kvtier.kvstore.service.server.bulk import BulkListener
from kvtier.kvstore.service.server.limits import BulkLimits
from kvtier.kvstore.service.server.metrics import KVServerMetrics
from kvtier.kvstore.service.protocol import BULK_TRANSFER_OPTIONS
from kvtier.kvstore.service.tls import server_context
from kvtier.kvstore.service.server.servicer import KVStoreServicer, kvstore_handler
from kvtier.kvstore.service.server.health import HealthService
from kvtier.kvstore.service.server.memory import keep_block_memory_for_reuse
from kvtier.kvstore.service.server.auth import NamespaceResolver, TokenAuthInterceptor, load_token_file
from kvtier.kvstore.service.server.store import BlockStore

LISTENING = "kvtier kv-server listening on"
METRICS_ON = "kvtier kv-server metrics on"


def add_kv_server_arguments(p: argparse.ArgumentParser) -> None:
    """--config and one flag per KVServerConfig field (and --log-level), all from the tree.
    A new option is a field of KVServerConfig (config.py), not a flag here; --metrics-port is
    KVServerConfig.metrics_port."""
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML or JSON config file with a kv_server: section (flags and KVTIER_KV_SERVER_* "
                        "variables override it)")
    add_key_flags(p, kv_server_keys())


def server_config(args: argparse.Namespace | KVServerConfig) -> KVServerConfig:
    """The validated config: as given, or resolved from flags > environment > --config > defaults."""
    if isinstance(args, KVServerConfig):
        return args
    return build_kv_server_config(resolve_kv_server(args, os.environ))


def add_kv_server_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `kv-server` on an argparse subparsers object (engine/cli.py calls this)."""
    p = subparsers.add_parser("kv-server", help="run the gRPC KV block store (the grpc:// tier)")
    add_kv_server_arguments(p)
    return p


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    store: BlockStore
    health: HealthService
    bulk: BulkListener | None
    metrics: KVServerMetrics | None = None
    metrics_port: int | None = None  # the bound HTTP port of /metrics, when served

    def stop(self, grace: float) -> None:
        """Refuse new calls, let in-flight ones finish for up to `grace` seconds, close."""
        self.health.set_serving(False)
        stopped = self.server.stop(grace)
        if self.bulk is not None:
            self.bulk.stop(grace)
        stopped.wait()
        if self.metrics is not None:
            self.metrics.close()
        self.store.close()


def _open_persist(path: str, capacity: int):
    # Imported here: only servers that persist need lmdb. The same store class the lmdb:
    # tier uses, so a directory written by either is read by both.
    from kvtier.kvstore.tiers.lmdb_store import LmdbStore

    return LmdbStore(path, capacity)


def start_server(args: argparse.Namespace | KVServerConfig) -> RunningServer:
    """Build and start the server from parsed flags or a KVServerConfig; ValueError for a bad
    configuration."""
    args = server_config(args)
    limits = args.bulk_limits()  # ValueError naming the bad limit, before anything opens
    health = HealthService(args.max_health_watches)
    grants = load_token_file(args.auth_token_file) if args.auth_token_file else None
    namespaces = NamespaceResolver(grants, args.namespace_per_token)
    persist = _open_persist(args.persist, args.persist_capacity or args.capacity) if args.persist else None
    store = BlockStore(args.capacity, persist)
    options = [
        ("grpc.max_send_message_length", args.max_message_bytes),
        ("grpc.max_receive_message_length", args.max_message_bytes),
        # gRPC shares a port between processes by default: a second server on a busy port
        # would silently split the traffic instead of failing to start.
        ("grpc.so_reuseport", 0),
        *BULK_TRANSFER_OPTIONS,
    ]
    metrics = KVServerMetrics(store)
    # Metrics first (outermost): it also sees the calls the auth interceptor refuses.
    interceptors = [metrics.interceptor(), *([TokenAuthInterceptor(grants)] if grants else [])]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers), options=options,
                         interceptors=interceptors)
    bulk = None
    try:
        if args.bulk_listen != "off":
            bulk = _open_bulk(args, store, limits, metrics)
        servicer = KVStoreServicer(store, namespaces, args.max_message_bytes, bulk)
        server.add_generic_rpc_handlers((kvstore_handler(servicer), health.generic_handler()))
        if args.tls_cert:
            port = server.add_secure_port(args.listen, _grpc_credentials(args))
        else:
            port = server.add_insecure_port(args.listen)
        if port == 0:
            raise ValueError(f"cannot listen on {args.listen}")
    except (OSError, RuntimeError, ssl.SSLError, ValueError) as e:
        if bulk is not None:
            bulk.stop(0)
        store.close()
        raise e if isinstance(e, ValueError) else ValueError(f"cannot listen on {args.listen}: {e}")
    metrics_port = _serve_metrics(args, metrics, server, bulk, store)
    server.start()
    if bulk is not None:
        bulk.start()
    return RunningServer(server, port, store, health, bulk, metrics, metrics_port)


def _serve_metrics(args, metrics: KVServerMetrics, server, bulk, store) -> int | None:
    """Start /metrics on --metrics-port (None: off); on failure undo what start_server opened."""
    port = args.metrics_port  # validated by KVServerConfig
    if port is None:
        return None
    try:
        return metrics.serve(port, args.listen.rpartition(":")[0].strip("[]"))
    except OSError as e:
        server.stop(0)
        if bulk is not None:
            bulk.stop(0)
        store.close()
        raise ValueError(f"cannot serve metrics on port {port}: {e.strerror or e}")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}")


def _grpc_credentials(args) -> grpc.ServerCredentials:
    pair = [(_read(args.tls_key), _read(args.tls_cert))]
    if args.tls_client_ca:
        return grpc.ssl_server_credentials(pair, root_certificates=_read(args.tls_client_ca),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(pair)


def _open_bulk(args, store: BlockStore, limits: BulkLimits, metrics: KVServerMetrics) -> BulkListener:
    """The bulk-stream listener; TLS (and client certificates) exactly as for gRPC."""
    spec = args.listen if args.bulk_listen == "auto" else args.bulk_listen
    host, _, port = spec.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--bulk-listen must be HOST:PORT, 'auto' or 'off', got {args.bulk_listen!r}")
    if args.bulk_listen == "auto":
        port = "0"
    context = None
    if args.tls_cert:
        context = server_context(args.tls_cert, args.tls_key, args.tls_client_ca)
    try:
        return BulkListener(host.strip("[]"), int(port), store, advertised_host=args.bulk_advertise_host,
                            ssl_context=context, limits=limits, metrics=metrics)
    except OSError as e:
        raise ValueError(f"cannot listen on {spec} for the bulk stream: {e.strerror or e}")


def run_kv_server(args: argparse.Namespace) -> int:
    """Serve until SIGTERM / SIGINT, then drain; the process exit code."""
    keep_block_memory_for_reuse()
    try:
        resolved = resolve_kv_server(args, os.environ)
        configure_logging(resolved.get("logging.level", "warning"))
        args = build_kv_server_config(resolved)
        running = start_server(args)
    except ValueError as e:
        print(f"kvtier kv-server: error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    host = args.listen.rsplit(":", 1)[0]
    bulk = f" (bulk stream on port {running.bulk.port})" if running.bulk else ""
    print(f"{LISTENING} {host}:{running.port}{bulk}", flush=True)
    if running.metrics_port is not None:
        print(f"{METRICS_ON} {host}:{running.metrics_port}", flush=True)
    while not stop.wait(timeout=1.0):  # a timed wait keeps the main thread able to take signals
        pass
    running.stop(args.drain_seconds)
    print("kvtier kv-server stopped", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kvtier kv-server", description="the gRPC KV block store")
    add_kv_server_arguments(parser)
    return run_kv_server(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
