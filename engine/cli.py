"""`kvtier` command line: generate, make-model, demo, serve, kv-server, config show.

Engine, server and kv-server options are not declared here: their flags are derived from the
config tree (engine/config_sources.py, kvstore/service/server/config.py), which also reads
KVTIER_* variables and a --config file (docs/configuration.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from kvtier.config_tree import LoggingConfig, add_key_flags, configure_logging, keys_from_dataclass, render_tree


class _Parser(argparse.ArgumentParser):
    """A bad flag exits 2 with one line naming the problem (argparse prints the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_engine_flags(p: argparse.ArgumentParser, server: bool = False) -> None:
    """--config, the engine's (and with `server`, the server's) flags, --log-level and aliases."""
    from kvtier.engine.config_sources import add_tree_flags

    add_tree_flags(p, server)


def resolve(args: argparse.Namespace, server: bool = False):
    """The command's config tree (flags > KVTIER_* > --config file > defaults)."""
    from kvtier.engine.config_sources import resolve_cli

    resolved = resolve_cli(args, os.environ, server)
    configure_logging(resolved.get("logging.level", "warning"))
    return resolved


def engine_kwargs(args: argparse.Namespace) -> dict:
    """EngineConfig arguments (all but the model) from a command's flags, env and --config."""
    from kvtier.engine.config_sources import engine_kwargs as kwargs_of

    return kwargs_of(resolve(args))


def _add_log_level(sub) -> None:
    """--log-level on every subcommand, also those registered without the config tree."""
    keys = keys_from_dataclass(LoggingConfig, lambda f: "logging")
    for p in sub.choices.values():
        add_key_flags(p, keys)  # skips parsers that have it already


def _add_config_parser(sub) -> None:
    c = sub.add_parser("config", help="inspect the resolved configuration")
    csub = c.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    show = csub.add_parser("show", help="print the engine + server tree and where each value came from")
    _add_engine_flags(show, server=True)
    from kvtier.kvstore.service.server.main import add_kv_server_arguments

    add_kv_server_arguments(csub.add_parser("show-kv-server", help="the same for `kvtier kv-server`"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvtier", description="LLM inference with a tiered KV cache")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate text for one or more prompts")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    _add_engine_flags(g)

    m = sub.add_parser("make-model", help="write a random-weight Hugging Face checkpoint and tokenizer")
    m.add_argument("out", help="output directory")
    m.add_argument("--arch", choices=["llama", "mistral", "qwen2", "qwen3", "mamba2", "granite-hybrid"],
                   default="llama")
    m.add_argument("--size", choices=["tiny", "small"], default="small")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--sliding-window", type=int, default=None, metavar="N",
                   help="sliding-window attention of N tokens (mistral: every layer; qwen2: upper half; "
                        "qwen3: every other layer)")

    from kvtier.kvstore.service.server.main import add_kv_server_parser

    add_kv_server_parser(sub)

    d = sub.add_parser("demo", help="multi-turn conversation on a built-in model, showing KV reuse")
    d.add_argument("--model", default=None, help="model directory (default: a cached random 'small' model)")
    d.add_argument("--turns", type=int, default=4)
    d.add_argument("--users", type=int, default=3, help="conversations interleaved turn by turn")
    d.add_argument("--max-tokens", type=int, default=32)
    d.add_argument("--png", default=None, help="where to draw TTFT per turn (default: in the kvtier cache dir)")
    _add_engine_flags(d)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _add_engine_flags(s, server=True)

    from kvtier.engine.bench_cli import add_parser as add_bench_parser

    add_bench_parser(sub)
    _add_config_parser(sub)
    _add_log_level(sub)
    return parser


def _run_generate(args) -> int:
    from kvtier.engine.config_sources import engine_config
    from kvtier.engine.config_sources import engine_kwargs as kwargs_of
    from kvtier.engine.llm import LLM
    from kvtier.engine.sampling_params import SamplingParams

    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.sampling_seed,
        max_tokens=args.max_tokens,
        stop=args.stop,
    )
    resolved = resolve(args)
    model = engine_config(resolved).model  # validates, naming each bad value's source
    with LLM(model, **kwargs_of(resolved)) as llm:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    for out in outputs:
        c = out.outputs[0]
        if args.json:
            print(json.dumps({"prompt": out.prompt, "text": c.text, "token_ids": c.token_ids,
                              "finish_reason": c.finish_reason, "num_cached_tokens": out.num_cached_tokens,
                              "kv_sources": out.kv_sources, "error": out.error}))
        elif out.error:
            print(f"error: {out.error}", file=sys.stderr)
        else:
            print(c.text)
    return 0


def _run_config(args) -> int:
    if args.config_command == "show-kv-server":
        from kvtier.kvstore.service.server.config import build_kv_server_config, resolve_kv_server

        resolved = resolve_kv_server(args, os.environ)
        build_kv_server_config(resolved)  # validation errors name the key and its source
    else:
        from kvtier.engine.config_sources import engine_config, serve_config

        resolved = resolve(args, server=True)
        serve_config(resolved)
        if "engine.model" in resolved.values:
            engine_config(resolved)
    print(render_tree(resolved), end="")
    return 0


def _run_serve(args) -> int:
    from kvtier.engine.config_sources import engine_config, serve_config
    from kvtier.engine.serving.serve_cli import run_serve

    resolved = resolve(args, server=True)
    return run_serve(engine_config(resolved), serve_config(resolved), resolved.get("logging.level"))


def _run_demo(args) -> int:
    from kvtier.engine.config_sources import engine_kwargs as kwargs_of
    from kvtier.engine.demo import run_demo

    resolved = resolve(args)
    args.model = resolved.get("engine.model")  # None: the demo's cached model
    return run_demo(args, kwargs_of(resolved))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        configure_logging(getattr(args, "log_level", None) or "warning")  # the tree may refine it
        if args.command == "generate":
            return _run_generate(args)
        if args.command == "kv-server":
            from kvtier.kvstore.service.server.main import run_kv_server

            return run_kv_server(args)
        if args.command == "make-model":
            from kvtier.engine.make_model import make_model

            print(make_model(args.out, arch=args.arch, size=args.size, seed=args.seed,
                             sliding_window=args.sliding_window))
            return 0
        if args.command == "serve":
            return _run_serve(args)
        if args.command == "config":
            return _run_config(args)
        if args.command == "bench":
            from kvtier.engine.bench_cli import run as run_bench

            return run_bench(args)
        return _run_demo(args)
    except (ValueError, FileNotFoundError) as e:
        # Bad input (flags, config, model files): one line, exit 2, no traceback.
        print(f"kvtier {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
