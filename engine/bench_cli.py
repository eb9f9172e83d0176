"""`kvtier bench NAME`: run a script of benchmarks/, keep its JSON, draw its PNG plots.

benchmarks/ is not an installed package: the scripts are found in the source checkout the
editable install points at (or `--benchmarks-dir`). Each script runs in its own process (as
`python benchmarks/X.py` would), so a crash or a leak in one never touches the others; its
stderr (progress bars, errors) passes through, its JSON goes to `--out DIR/NAME.json`, and
the plots are drawn here from that JSON by benchmarks/plots.py.

    kvtier bench all --out benchmarks/results --quick     # regenerates the committed PNGs
    kvtier bench ttft --out /tmp/b --args "--prompt-tokens 1024,4096,8176"
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Bench:
    """How one script is run: its file, which shared options it understands, its --quick sizes."""

    script: str
    takes_model: bool = True
    repeats_flag: str | None = "--repeats"
    quick: tuple[str, ...] = ()
    extra_pngs: tuple[str, ...] = field(default=())  # PNGs the script draws itself


# --quick sizes: the whole `bench all --quick` takes a few minutes on a 2-core machine.
# "{tmp}" is replaced by a scratch folder removed after the run.
BENCHES = {
    "throughput": Bench("throughput.py", repeats_flag=None, quick=("--requests", "12", "--hf-batch-size", "4")),
    "tiers": Bench("tiers.py", takes_model=False,
                   quick=("--tiers", "cpu,lmdb,redis,grpc", "--batch", "16", "--compare-repeats", "2",
                          "--lmdb-dir", "{tmp}")),
    "ttft": Bench("ttft.py", quick=("--prompt-tokens", "256,1024,2048", "--tier", "cpu:1GiB",
                                    "--tier", "lmdb:{tmp}/ttft-lmdb?size=1GiB")),
    "multiturn": Bench("multiturn.py", quick=("--users", "6", "--rounds", "4", "--system-tokens", "256",
                                              "--question-tokens", "32", "64", "--answer-tokens", "8")),
    "agentic": Bench("agentic.py", quick=("--agents", "3", "--turns", "3", "--mixes", "fast",
                                          "--device-kv", str(12 << 20)),
                     extra_pngs=("agentic.png",)),
    "hybrid": Bench("hybrid.py", takes_model=False, repeats_flag="--dense-rounds",
                    quick=("--sections", "sliding,granite", "--context", "2048", "--sliding-requests", "6",
                           "--decode-tokens", "16", "--granite-size", "tiny", "--users", "3", "--turns", "2",
                           "--system-tokens", "64")),
    "serve": Bench("serve_load.py", quick=("--turns", "2", "--max-tokens", "8", "--system-tokens", "64")),
}
_QUICK_REPEATS = "1"
_QUICK_CONCURRENCY = "1,2,4"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="run a benchmark of benchmarks/, write its JSON and PNG plots")
    p.add_argument("name", choices=[*BENCHES, "all"], help="which benchmark ('all': each in turn)")
    p.add_argument("--out", default=".", help="folder for NAME.json and NAME.png (created if missing)")
    p.add_argument("--model", default=None, help="model directory, for the benchmarks that take one "
                                                  "(default: each makes a random 'small' llama)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per measurement (default: the script's)")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run, or the committed plots")
    p.add_argument("--concurrency", default=None, metavar="N,N,...",
                   help="serve: numbers of concurrent users, one run each "
                        f"(default 1,4,8; --quick {_QUICK_CONCURRENCY})")
    p.add_argument("--args", dest="script_args", default="", metavar='"FLAGS"',
                   help='more flags for the script, one quoted string, e.g. --args="--prompt-tokens 4096"; '
                        "they come last, so they win over --quick's")
    p.add_argument("--no-plots", action="store_true", help="write the JSON only")
    p.add_argument("--benchmarks-dir", default=None, help="the benchmarks/ folder (default: the source checkout's)")
    return p


def find_benchmarks_dir(explicit: str | None = None) -> Path:
    """benchmarks/ beside the installed (editable) kvtier package, or `explicit`."""
    if explicit:
        where = Path(explicit)
    else:
        import kvtier

        where = Path(kvtier.__file__).resolve().parent.parent / "benchmarks"
    if not (where / "bench_io.py").is_file():
        raise FileNotFoundError(f"no benchmark scripts in {where}: `kvtier bench` runs the scripts of a source "
                                "checkout (git clone, then pip install -e .); or pass --benchmarks-dir")
    return where


def _validate(args) -> None:
    if args.repeats is not None and args.repeats < 1:
        raise ValueError("--repeats: must be at least 1")
    if args.model is not None and args.name != "all" and not BENCHES[args.name].takes_model:
        raise ValueError(f"--model: the {args.name} benchmark does not take a model")
    try:
        shlex.split(args.script_args)
    except ValueError as e:
        raise ValueError(f"--args: {e}") from None
    if args.concurrency is not None:
        _concurrency(args.concurrency)


def _concurrency(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise ValueError(f"--concurrency: expected positive integers separated by commas, got {text!r}")
    return levels


def script_argv(bench: Bench, args, tmp: str) -> list[str]:
    """The script's flags: --quick sizes, then the shared options, then --args."""
    argv = [a.replace("{tmp}", tmp) for a in bench.quick] if args.quick else []
    if args.model and bench.takes_model:
        argv += ["--model", args.model]
    repeats = str(args.repeats) if args.repeats else _QUICK_REPEATS if args.quick else None
    if repeats and bench.repeats_flag:
        argv += [bench.repeats_flag, repeats]
    return argv + shlex.split(args.script_args)


def _run_script(path: Path, argv: list[str], json_path: Path) -> dict:
    # stdout repeats the JSON that --out writes: dropped; stderr (progress, errors) passes through.
    proc = subprocess.run([sys.executable, str(path), *argv, "--out", str(json_path)], stdout=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"{path.name} exited with status {proc.returncode} (its errors are above)")
    with open(json_path) as f:
        return json.load(f)


def run_one(name: str, args, bench_dir: Path, out: Path) -> tuple[dict, list[Path]]:
    """Run one benchmark; returns its result and the files written."""
    bench = BENCHES[name]
    with tempfile.TemporaryDirectory(prefix=f"kvtier-bench-{name}-") as tmp:
        argv = script_argv(bench, args, tmp)
        if name == "agentic":
            argv += ["--png", str(out / "agentic.png")] if not args.no_plots else ["--png", ""]
        if name != "serve":
            return _run_script(bench_dir / bench.script, argv, out / f"{name}.json"), [out / f"{name}.json"]
        # One serve_load run per concurrency level, gathered into serve.json.
        levels = _concurrency(args.concurrency or (_QUICK_CONCURRENCY if args.quick else "1,4,8"))
        runs, files = [], []
        for users in levels:
            path = out / f"serve-users-{users}.json"
            runs.append(_run_script(bench_dir / bench.script, argv + ["--users", str(users)], path))
            files.append(path)
    result = {"benchmark": "serve", "concurrency": levels, "runs": runs}
    (out / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    return result, [*files, out / "serve.json"]


def load_plots(bench_dir: Path):
    """benchmarks/plots.py as a module (it is not part of the installed package)."""
    spec = importlib.util.spec_from_file_location("kvtier_benchmark_plots", bench_dir / "plots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def draw(name: str, result: dict, plots, out: Path) -> list[Path]:
    """The PNGs of one result (agentic draws its own, in its script)."""
    drawn = []
    if name in plots.PLOTTERS:
        drawn.append(Path(plots.PLOTTERS[name](result, str(out / f"{name}.png"))))
    if name == "multiturn":
        drawn.append(Path(plots.plot_multiturn_turns(result, str(out / "multiturn-turns.png"))))
    drawn += [out / png for png in BENCHES[name].extra_pngs if (out / png).is_file()]
    return drawn


def run(args) -> int:
    _validate(args)
    bench_dir = find_benchmarks_dir(args.benchmarks_dir)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plots = None
    if not args.no_plots:
        try:
            from kvtier.engine.demo_plot import pyplot

            pyplot()
            plots = load_plots(bench_dir)
        except ImportError as e:
            print(f"kvtier bench: JSON only, no plots: {e}", file=sys.stderr)
    names = list(BENCHES) if args.name == "all" else [args.name]
    failed = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            result, files = run_one(name, args, bench_dir, out)
            if plots is not None:
                files += draw(name, result, plots, out)
        except (RuntimeError, OSError, KeyError, ValueError) as e:
            # One broken benchmark (or plot of an unexpected shape) does not stop the others.
            print(f"{name}: failed: {e!r}", flush=True)
            failed.append(name)
            continue
        print(f"{name}: {time.perf_counter() - start:.0f} s, wrote {', '.join(str(f) for f in files)}", flush=True)
    if failed:
        print(f"kvtier bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
