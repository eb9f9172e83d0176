"""One command for a CUDA machine: the GPU tests, the triton kernels compiled on the device,
greedy equality against transformers in bfloat16, and the GPU figures, as one JSON object.

    pip install --no-deps --no-build-isolation --no-index -e .    # torch, triton, transformers present
    python benchmarks/gpu_check.py [--out gpu_check.json] [--skip-tests] [--quick]

Parts (each reports on its own; one failing does not stop the others):
  tests        pytest on the device (subprocesses): the kernel, backend and tier-copy tests,
               then `pytest -m gpu` over the rest of tests/ (modules whose optional
               dependencies are missing, e.g. lmdb or redis, count as collection errors)
  hf_equality  greedy tokens of kvtier (attention backend auto = triton) against transformers,
               both bfloat16 on CUDA, teacher-forced: at every step our token must be within
               --tol (log-probability) of transformers' best
  decode       paged-attention decode: triton kernel vs torch SDPA over contiguous K/V (ratio)
  tier_save    device -> pinned host GB/s of a tier save (gather_blocks) vs a plain pinned copy_
  ttft         time to first token of an 8k-token prompt from the CPU tier vs recomputed
  throughput   offline tokens/s on a ~0.86B random-weight Llama, kvtier vs transformers generate

Needs torch with CUDA, triton and transformers; not lmdb, redis or the serving extras. Exits
2 with a message where no CUDA device is present, 1 if any check failed.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # siblings, as other benchmarks

from bench_io import emit  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--skip-tests", action="store_true", help="skip the pytest runs")
    ap.add_argument("--quick", action="store_true", help="fewer requests and repeats (a smoke run)")
    ap.add_argument("--tol", type=float, default=0.15,
                    help="teacher-forced tolerance in log-probability for bfloat16 (default 0.15)")
    ap.add_argument("--tests-timeout", type=float, default=150.0, help="seconds for each pytest run")
    ap.add_argument("--workdir", help="where to write the random checkpoint (default: a temp dir)")
    return ap.parse_args(argv)


def cuda_ready() -> str | None:
    """None when the checks can run, else why not."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device is present (torch.cuda.is_available() is False); run this on a GPU machine"
    from kvtier.engine.kernels import triton_available

    if not triton_available("cuda"):
        return "triton does not import (pip install triton); the GPU path needs it"
    return None


def run_part(result: dict, out: str | None, name: str, fn, *args) -> None:
    start = time.perf_counter()
    try:
        result[name] = fn(*args)
    except Exception as e:  # report and go on: the other parts still say something
        result[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
    result[name]["seconds"] = round(time.perf_counter() - start, 1)
    gc.collect()  # the part's engines and models go before the next part allocates its own
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.empty_cache()
    print(f"[gpu_check] {name}: {'ok' if result[name].get('ok', True) else 'FAILED'} "
          f"({result[name]['seconds']} s)", file=sys.stderr, flush=True)
    if out:  # the parts so far, in case a time limit stops the run before the end
        with open(out, "w") as f:
            json.dump(result, f, indent=2)


def main(argv=None) -> int:
    args = parse_args(argv)
    why = cuda_ready()
    if why is not None:
        print(f"gpu_check: {why}", file=sys.stderr)
        return 2
    import torch

    import gpu_check_parts as parts

    result: dict = {"benchmark": "gpu_check", "device": torch.cuda.get_device_name(0),
                    "torch": torch.__version__, "quick": args.quick}
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        pass
    if not args.skip_tests:
        run_part(result, args.out, "tests", parts.run_tests, ROOT, args.tests_timeout)
    workdir = args.workdir or tempfile.mkdtemp(prefix="kvtier-gpu-check-")
    model = os.path.join(workdir, "llama-0.9b")
    run_part(result, args.out, "model", parts.write_model, model)
    run_part(result, args.out, "hf_equality", parts.hf_equality, model, args.tol, args.quick)
    run_part(result, args.out, "decode", parts.decode_attention, args.quick)
    run_part(result, args.out, "tier_save", parts.tier_save_bandwidth, args.quick)
    run_part(result, args.out, "ttft", parts.ttft_from_cpu_tier, model, args.quick)
    run_part(result, args.out, "throughput", parts.offline_throughput, model, args.quick)
    result["ok"] = all(v.get("ok", True) for v in result.values() if isinstance(v, dict))
    emit(result, args.out)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
