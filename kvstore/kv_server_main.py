"""`kvtier kv-server`: flags, startup, and a clean SIGTERM drain.

    kvtier kv-server --listen 0.0.0.0:50051 --capacity 8GiB --persist /var/lib/kvtier \
        --auth-token-file tokens.txt --tls-cert cert.pem --tls-key key.pem

Also runnable as `python -m kvtier.kvstore.kv_server_main ...` (the tests do that). Once
bound it prints one line, `kvtier kv-server listening on HOST:PORT`, with the real port when
--listen asked for port 0.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc

from kvtier.engine.sizes import parse_size, size_arg
from kvtier.kvstore.kv_server import BULK_TRANSFER_OPTIONS, KVStoreServicer, kvstore_handler
from kvtier.kvstore.kv_server_health import HealthService
from kvtier.kvstore.kv_server_auth import NamespaceResolver, TokenAuthInterceptor, load_token_file
from kvtier.kvstore.kv_server_store import BlockStore

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
    p.add_argument("--drain-seconds", type=float, default=10.0, help="how long SIGTERM waits for in-flight calls")


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

    def stop(self, grace: float) -> None:
        """Refuse new calls, let in-flight ones finish for up to `grace` seconds, close."""
        self.health.set_serving(False)
        self.server.stop(grace).wait()
        self.store.close()


def _open_persist(path: str, capacity: int):
    from kvtier.kvstore.lmdb_tier import LmdbTier  # only servers that persist need lmdb

    return LmdbTier(path, capacity)


def start_server(args: argparse.Namespace) -> RunningServer:
    """Build and start the server from parsed flags; ValueError for a bad configuration."""
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.max_message_bytes < 4096:
        raise ValueError(f"--max-message-bytes must be at least 4096, got {args.max_message_bytes}")
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
    health = HealthService()
    servicer = KVStoreServicer(store, namespaces, args.max_message_bytes)
    server.add_generic_rpc_handlers((kvstore_handler(servicer), health.generic_handler()))
    try:
        if args.tls_cert:
            with open(args.tls_key, "rb") as k, open(args.tls_cert, "rb") as c:
                credentials = grpc.ssl_server_credentials([(k.read(), c.read())])
            port = server.add_secure_port(args.listen, credentials)
        else:
            port = server.add_insecure_port(args.listen)
    except (OSError, RuntimeError) as e:
        store.close()
        raise ValueError(f"cannot listen on {args.listen}: {e}")
    if port == 0:
        store.close()
        raise ValueError(f"cannot listen on {args.listen}")
    server.start()
    return RunningServer(server, port, store, health)


def run_kv_server(args: argparse.Namespace) -> int:
    """Serve until SIGTERM / SIGINT, then drain; the process exit code."""
    try:
        running = start_server(args)
    except ValueError as e:
        print(f"kvtier kv-server: error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    host = args.listen.rsplit(":", 1)[0]
    print(f"{LISTENING} {host}:{running.port}", flush=True)
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
