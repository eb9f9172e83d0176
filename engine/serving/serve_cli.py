"""`kvtier serve`: engine start-up, uvicorn on a socket we bind ourselves (so --port 0 works and
the bound address is printed), graceful SIGTERM. Its options are the config tree's `server`
section (serve_config.py); the flags come from there."""
from __future__ import annotations

import contextlib
import socket
import sys


def _graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn re-raises a caught SIGTERM once it has shut down, so the process dies by the
        signal; we have finished the shutdown ourselves by then and exit 0 instead."""

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    return GracefulServer


def run_serve(config, serve, log_level: str = "warning") -> int:
    """config: the EngineConfig; serve: the ServeConfig (both from the config tree)."""
    import uvicorn

    from kvtier.engine.engine_core import Engine
    from kvtier.engine.serving.async_engine import AsyncEngine
    from kvtier.engine.serving.chat_template import ChatTemplate
    from kvtier.engine.serving.openai_server import create_app

    template = ChatTemplate.for_model(config.model)
    sock = _bind(serve.host, serve.port)  # a taken port fails before the model loads
    try:
        # Built on its loop thread: the only thread that runs torch ops (async_engine.py).
        engine = AsyncEngine(lambda: Engine(config), gather_window=serve.gather_window)
    except BaseException:
        sock.close()
        raise

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        await engine.shutdown(serve.shutdown_grace)  # abort what is left, close (flush) the tiers

    app = create_app(engine, serve.served_model_name or config.model, template,
                     api_key=serve.api_key or None, max_queue=serve.max_queue, lifespan=lifespan,
                     stream_interval=serve.stream_interval)
    host, port = sock.getsockname()[:2]
    print(f"kvtier serve: listening on http://{host}:{port}", flush=True)
    # uvicorn handles SIGTERM/SIGINT: stop accepting, wait up to the grace period for open
    # requests, then run the lifespan shutdown above.
    _GracefulServer = _graceful_server_class()
    uv_config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=serve.shutdown_grace)
    try:
        _GracefulServer(uv_config).run(sockets=[sock])
    finally:
        engine.close()  # done already unless uvicorn failed before its lifespan ran
    print("kvtier serve: stopped", file=sys.stderr, flush=True)
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:  # port taken, unknown host: one line from the CLI, not a traceback
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
