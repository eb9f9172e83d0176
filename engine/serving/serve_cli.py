"""`kvtier serve`: flags, engine start-up, uvicorn on a socket we bind ourselves (so --port 0
works and the bound address is printed), graceful SIGTERM."""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on start-up)")
    p.add_argument("--served-model-name", default=None, help="the `model` clients send (default: --model)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (or env KVTIER_API_KEY)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests allowed to wait beyond --max-num-seqs; more are answered 429")
    p.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="seconds in-flight requests get to finish on SIGTERM before they are aborted")
    p.add_argument("--log-level", default="warning")


def _graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises a caught SIGTERM once it has shut down, so the process dies by the
        signal; we have finished the shutdown ourselves by then and exit 0 instead."""

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    return GracefulServer


def run_serve(args: argparse.Namespace, engine_kwargs: dict) -> int:
    import uvicorn

    from kvtier.engine.config import EngineConfig
    from kvtier.engine.engine_core import Engine
    from kvtier.engine.serving.async_engine import AsyncEngine
    from kvtier.engine.serving.chat_template import ChatTemplate
    from kvtier.engine.serving.openai_server import create_app

    if args.max_queue < 0:
        raise ValueError(f"--max-queue: must be >= 0, got {args.max_queue}")
    template = ChatTemplate.for_model(args.model)
    engine = AsyncEngine(Engine(EngineConfig.from_kwargs(args.model, **engine_kwargs)))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        await engine.shutdown(args.shutdown_grace)  # abort what is left, close (flush) the tiers

    app = create_app(engine, args.served_model_name or args.model, template,
                     api_key=args.api_key or os.environ.get("KVTIER_API_KEY") or None,
                     max_queue=args.max_queue, lifespan=lifespan)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:  # port taken, unknown host: one line from the CLI, not a traceback
        sock.close()
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = sock.getsockname()[:2]
    print(f"kvtier serve: listening on http://{host}:{port}", flush=True)
    # uvicorn handles SIGTERM/SIGINT: stop accepting, wait up to the grace period for open
    # requests, then run the lifespan shutdown above.
    _GracefulServer = _graceful_server_class()
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_grace)
    _GracefulServer(config).run(sockets=[sock])
    print("kvtier serve: stopped", file=sys.stderr, flush=True)
    return 0
