"""`kvtier kv-server`: flags, startup, and a clean SIGTERM drain.

    kvtier kv-server --listen 0.0.0.0:50051 --capacity 8GiB --persist /var/lib/kvtier \
        --auth-token-file tokens.txt --tls-cert cert.pem --tls-key key.pem

Also runnable as `python -m kvtier.kvstore.service.server.main ...` (the tests do that). Once
bound it prints one line, `kvtier kv-server listening on HOST:PORT`, with the real port when
--listen asked for port 0.
"""
from __future__ import annotations

import argparse
import signal
import ssl
import sys
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc

from kvtier.sizes import parse_size, size_arg
from kvtier.kvstore.service.server.bulk import BulkListener
from kvtier.kvstore.service.server.limits import BulkLimits
from kvtier.kvstore.service.protocol import BULK_TRANSFER_OPTIONS
from kvtier.kvstore.service.tls import server_context
from kvtier.kvstore.service.server.servicer import KVStoreServicer, kvstore_handler
from kvtier.kvstore.service.server.health import HealthService
from kvtier.kvstore.service.server.memory import keep_block_memory_for_reuse
from kvtier.kvstore.service.server.auth import NamespaceResolver, TokenAuthInterceptor, load_token_file
from kvtier.kvstore.service.server.store import BlockStore

DEFAULT_MAX_MESSAGE = "16MiB"
LISTENING = "kvtier kv-server listening on"


def add_kv_server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:50051", help="HOST:PORT to bind (port 0: any free port, printed)")
    p.add_argument("--capacity", type=size_arg, default=parse_size("8GiB"), help="memory budget, LRU over bytes (e.g. 8GiB)")
    p.add_argument("--persist", default=None, metavar="PATH", help="LMDB directory behind the memory store")
    p.add_argument("--persist-capacity", type=size_arg, default=None, help="LMDB budget (default: --capacity)")
    p.add_argument("--max-message-bytes", type=size_arg, default=parse_size(DEFAULT_MAX_MESSAGE),
                   help="largest gRPC message either way; bigger blocks travel as chunks")
    p.add_argument("--workers", type=int, default=16, help="handler threads (concurrent calls)")
    p.add_argument("--auth-token-file", default=None, metavar="F",
                   help="tokens clients must send as 'authorization: Bearer <token>', one per line")
    p.add_argument("--namespace-per-token", action="store_true", help="each token sees only its own keys")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (enables TLS with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key")
    p.add_argument("--tls-client-ca", default=None, metavar="F",
                   help="mutual TLS: clients must present a certificate signed by this CA (PEM)")
    p.add_argument("--bulk-listen", default="auto", metavar="HOST:PORT",
                   help="the bulk stream's TCP port for Put bytes ('auto': --listen's host, any free port; "
                        "'off': none, puts go through gRPC)")
    p.add_argument("--bulk-advertise-host", default="",
                   help="host clients should dial for the bulk stream (default: the host they reached gRPC on)")
    p.add_argument("--drain-seconds", type=float, default=10.0, help="how long SIGTERM waits for in-flight calls")
    _add_limit_arguments(p)


def _add_limit_arguments(p: argparse.ArgumentParser) -> None:
    """Limits against hostile or broken clients (limits.py, admission.py); a tenant is a token."""
    d = BulkLimits()
    p.add_argument("--bulk-handshake-timeout", type=float, default=d.handshake_timeout_s, metavar="S",
                   help="seconds from accept to a redeemed ticket on the bulk port, the whole handshake")
    p.add_argument("--bulk-max-connections", type=int, default=d.max_connections, metavar="N",
                   help="bulk connections in all, ticketed or not")
    p.add_argument("--bulk-max-unauthenticated", type=int, default=d.max_unauthenticated, metavar="N",
                   help="bulk connections still without a ticket (the oldest is dropped for a new one)")
    p.add_argument("--bulk-max-unauthenticated-per-address", type=int, default=d.max_unauthenticated_per_address,
                   metavar="N", help="the same, per client address")
    p.add_argument("--bulk-max-connections-per-tenant", type=int, default=d.max_connections_per_tenant,
                   metavar="N", help="ticketed bulk connections per tenant (token)")
    p.add_argument("--bulk-max-tickets", type=int, default=d.max_tickets, metavar="N", help="unused bulk tickets in all")
    p.add_argument("--bulk-max-tickets-per-tenant", type=int, default=d.max_tickets_per_tenant, metavar="N",
                   help="unused bulk tickets per tenant; more OpenBulk calls are RESOURCE_EXHAUSTED")
    p.add_argument("--bulk-max-inflight", type=size_arg, default=d.max_inflight_bytes, metavar="SIZE",
                   help="received block bytes not yet stored, in all")
    p.add_argument("--bulk-max-inflight-per-tenant", type=size_arg, default=d.max_inflight_bytes_per_tenant,
                   metavar="SIZE", help="the same, per tenant")
    p.add_argument("--max-health-watches", type=int, default=64, metavar="N",
                   help="open grpc.health.v1 Watch streams (they hold no worker thread)")


def _bulk_limits(args: argparse.Namespace) -> BulkLimits:
    return BulkLimits(
        handshake_timeout_s=args.bulk_handshake_timeout, max_connections=args.bulk_max_connections,
        max_unauthenticated=args.bulk_max_unauthenticated,
        max_unauthenticated_per_address=args.bulk_max_unauthenticated_per_address,
        max_connections_per_tenant=args.bulk_max_connections_per_tenant, max_tickets=args.bulk_max_tickets,
        max_tickets_per_tenant=args.bulk_max_tickets_per_tenant, max_inflight_bytes=args.bulk_max_inflight,
        max_inflight_bytes_per_tenant=args.bulk_max_inflight_per_tenant)


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

    def stop(self, grace: float) -> None:
        """Refuse new calls, let in-flight ones finish for up to `grace` seconds, close."""
        self.health.set_serving(False)
        stopped = self.server.stop(grace)
        if self.bulk is not None:
            self.bulk.stop(grace)
        stopped.wait()
        self.store.close()


def _open_persist(path: str, capacity: int):
    # Imported here: only servers that persist need lmdb. The same store class the lmdb:
    # tier uses, so a directory written by either is read by both.
    from kvtier.kvstore.tiers.lmdb_store import LmdbStore

    return LmdbStore(path, capacity)


def start_server(args: argparse.Namespace) -> RunningServer:
    """Build and start the server from parsed flags; ValueError for a bad configuration."""
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
    if args.max_message_bytes < 4096:
        raise ValueError(f"--max-message-bytes must be at least 4096, got {args.max_message_bytes}")
    limits = _bulk_limits(args)  # ValueError naming the bad limit, before anything opens
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
    interceptors = [TokenAuthInterceptor(grants)] if grants else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.workers), options=options,
                         interceptors=interceptors)
    bulk = None
    try:
        if args.bulk_listen != "off":
            bulk = _open_bulk(args, store, limits)
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
    server.start()
    if bulk is not None:
        bulk.start()
    return RunningServer(server, port, store, health, bulk)


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


def _open_bulk(args, store: BlockStore, limits: BulkLimits) -> BulkListener:
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
                            ssl_context=context, limits=limits)
    except OSError as e:
        raise ValueError(f"cannot listen on {spec} for the bulk stream: {e.strerror or e}")


def run_kv_server(args: argparse.Namespace) -> int:
    """Serve until SIGTERM / SIGINT, then drain; the process exit code."""
    keep_block_memory_for_reuse()
    try:
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
