"""`kvtier` command line: generate, make-model, demo, serve."""
from __future__ import annotations

import argparse
import json
import sys

from kvtier.sizes import size_arg


class _Parser(argparse.ArgumentParser):
    """A bad flag exits 2 with one line naming the problem (argparse prints the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--kv-cache-memory", type=size_arg, default=None, help="device KV pool size, e.g. 512MiB")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    g.add_argument("--seed", type=int, default=0)
    h = p.add_argument_group("hybrid models (sliding-window and SSM layers)")
    h.add_argument("--kv-group-memory-fractions", type=_fractions, default=None, metavar="F,F,...",
                   help="share of the KV memory per KV group (default: by need, see the README)")
    h.add_argument("--ssm-checkpoint-interval", type=int, default=None, metavar="TOKENS",
                   help="tokens between SSM state checkpoints, a multiple of --block-size")
    h.add_argument("--ssm-checkpoint-policy", choices=["auto", "last-boundary"], default="auto")
    k = p.add_argument_group("tool-call parking")
    k.add_argument("--park-policy", choices=["keep", "offload", "discard", "auto"], default="auto",
                   help="how parked requests keep their KV (default: auto, by expected cost)")
    k.add_argument("--max-parked-fraction", type=float, default=0.5,
                   help="most of the device KV memory parked requests may pin")
    t = p.add_argument_group("KV tiers")
    t.add_argument(
        "--kv-tier",
        action="append",
        default=None,
        metavar="SPEC",
        help="KV tier below the device pool, fastest first (repeatable): cpu:4GiB, "
        "lmdb:PATH?size=64GiB, redis://host:port/0?ttl=3600, grpc://host:port",
    )
    t.add_argument("--no-kv-tiers", action="store_true", help="no tiers at all (not even the defaults)")
    t.add_argument("--kv-write-policy", choices=["write-through", "write-back"], default="write-through")


def _fractions(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def default_kv_tiers() -> list[str]:
    """Embedded default: a CPU tier and a persistent LMDB tier under the user's cache dir."""
    from kvtier.engine.demo import cache_dir

    return ["cpu:1GiB", f"lmdb:{cache_dir() / 'kv-lmdb'}?size=8GiB"]


def kv_tiers(args: argparse.Namespace) -> list[str] | None:
    if args.no_kv_tiers:
        if args.kv_tier:
            raise ValueError("--no-kv-tiers and --kv-tier contradict each other")
        return None
    return args.kv_tier or default_kv_tiers()


def engine_kwargs(args: argparse.Namespace) -> dict:
    tiers = kv_tiers(args)
    return dict(
        kv_tiers=tiers,
        kv_connector_config={"write_policy": args.kv_write_policy} if tiers else None,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        kv_cache_memory_bytes=args.kv_cache_memory,
        enable_prefix_caching=not args.no_prefix_caching,
        seed=args.seed,
        kv_group_memory_fractions=args.kv_group_memory_fractions,
        ssm_checkpoint_interval=args.ssm_checkpoint_interval,
        ssm_checkpoint_policy=args.ssm_checkpoint_policy,
        park_policy=args.park_policy,
        max_parked_fraction=args.max_parked_fraction,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvtier", description="LLM inference with a tiered KV cache")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate text for one or more prompts")
    g.add_argument("--model", required=True, help="Hugging Face model directory")
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
    _add_engine_flags(d)

    from kvtier.engine.serving.serve_cli import add_serve_flags

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_serve_flags(s)
    _add_engine_flags(s)
    return parser


def _run_generate(args) -> int:
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
    with LLM(args.model, **engine_kwargs(args)) as llm:
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
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
            from kvtier.engine.serving.serve_cli import run_serve

            return run_serve(args, engine_kwargs(args))
        from kvtier.engine.demo import run_demo

        return run_demo(args, engine_kwargs(args))
    except (ValueError, FileNotFoundError) as e:
        # Bad input (flags, config, model files): one line, exit 2, no traceback.
        print(f"kvtier {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
