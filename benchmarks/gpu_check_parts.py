"""The parts of benchmarks/gpu_check.py, each returning a JSON-able dict with an `ok` flag.

Every part takes its device (CUDA by default) and sizes as arguments, so tests can run the
same code on tiny shapes on the CPU (the kernels then through triton's interpreter).
"""
from __future__ import annotations

import importlib.util
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

import torch

# ~0.86B parameters: 16 layers of hidden 2048 (GQA 16 / 4 heads of 128), MLP 5632, vocab 32000.
KV_BYTES = 16 << 30  # device KV pool of each engine (explicit: the parts run one after another)
BIG_LLAMA = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                 head_dim=128, intermediate_size=5632, vocab_size=32000, max_position_embeddings=16384)

# ---- tests -----------------------------------------------------------------------------------

KERNEL_TESTS = ["tests/test_kernel_paged_attention.py", "tests/test_kernel_kv_write.py",
                "tests/test_kernel_block_copy.py", "tests/test_kernel_fp8.py", "tests/test_kernel_available.py",
                "tests/test_attention_backends.py", "tests/test_tier_device_copy.py"]


def _pytest(root: str, args: list[str], timeout: float) -> dict:
    report = os.path.join(tempfile.mkdtemp(prefix="kvtier-pytest-"), "report.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *args]
    if importlib.util.find_spec("xdist") is not None:  # compile kernels in parallel where xdist is there
        cmd += ["-n", "4"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-3000:]
        return {"ok": False, "error": f"timed out after {timeout} s", "tail": out.decode(errors="replace")
                if isinstance(out, bytes) else out}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if os.path.exists(report):
        for suite in ET.parse(report).getroot().iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
    failed = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"ok": proc.returncode == 0, "returncode": proc.returncode, **counts, "failed": failed[:30],
            "wall_s": round(time.perf_counter() - start, 1), "tail": proc.stdout[-1500:] + proc.stderr[-500:]}


def run_tests(root: str, timeout: float) -> dict:
    kernels = _pytest(root, KERNEL_TESTS, timeout)
    ignore = [f"--ignore={t}" for t in KERNEL_TESTS]
    # Modules needing absent optional packages (lmdb, redis, zmq, fastapi) fail to collect;
    # they hold no gpu case that the device could run anyway.
    gpu = _pytest(root, ["-m", "gpu", "--continue-on-collection-errors", *ignore, "tests"], timeout)
    # Collection errors of modules with missing optional packages are reported, not failed.
    gpu_ok = gpu["ok"] or ("error" not in gpu and gpu["failures"] == 0 and gpu["tests"] > 0)
    return {"ok": kernels["ok"] and gpu_ok, "kernels_and_backends": kernels, "gpu_marked": gpu}


# ---- the model ---------------------------------------------------------------------------------

def write_model(path: str, sizes: dict | None = None, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> dict:
    """A random-weight Llama checkpoint (engine/make_model.py's layout and tokenizer), `sizes`
    overriding its `small` config; weights stored in `dtype`."""
    import json

    from safetensors.torch import save_file

    from kvtier.engine.make_model import make_model, model_config, random_state_dict

    sizes = BIG_LLAMA if sizes is None else sizes
    make_model(path, "llama", "small", seed)  # tokenizer and configs; weights replaced below
    cfg = {**model_config("llama", "small"), **sizes, "initializer_range": 0.02,
           "torch_dtype": str(dtype).removeprefix("torch.")}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    weights = {k: v.to(dtype) for k, v in random_state_dict(cfg, seed).items()}
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return {"ok": True, "params_m": round(sum(w.numel() for w in weights.values()) / 1e6, 1)}


def _prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _vocab(path: str) -> int:
    from kvtier.engine.model_config import load_model_config

    return load_model_config(path).vocab_size


# ---- greedy equality with transformers ---------------------------------------------------------

def hf_equality(path: str, tol: float, quick: bool, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                max_tokens: int = 16, kv_bytes: int = KV_BYTES) -> dict:
    """Teacher-forced: transformers scores our whole stream in one forward; at each step our
    token's log-probability must be within `tol` of its best one there. Also counts streams
    equal to transformers' own greedy `generate`."""
    from transformers import AutoModelForCausalLM

    from kvtier import LLM, SamplingParams

    prompts = _prompts(4 if quick else 8, 20, 300, _vocab(path), seed=1)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=1, ignore_eos=True)
    with LLM(path, device=device, dtype=str(dtype).removeprefix("torch."), max_num_batched_tokens=256,
             kv_cache_memory_bytes=kv_bytes) as llm:
        backend = llm.engine.runner.attention.name
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    worst_gap = worst_lp = 0.0
    equal_streams = 0
    with torch.inference_mode():
        for prompt, out in zip(prompts, outs):
            ours = out.outputs[0].token_ids
            ids = torch.tensor([prompt + ours], device=device)
            lp = torch.log_softmax(hf(ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
            picked = lp[torch.arange(len(ours)), torch.tensor(ours, device=device)]
            worst_gap = max(worst_gap, (lp.max(dim=-1).values - picked).max().item())
            mine = torch.tensor([out.outputs[0].logprobs[i][t].logprob for i, t in enumerate(ours)], device=device)
            worst_lp = max(worst_lp, (mine - picked).abs().max().item())
            theirs = hf.generate(torch.tensor([prompt], device=device), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False)[0, len(prompt):].tolist()
            equal_streams += theirs == ours
    del hf
    return {"ok": worst_gap <= tol, "backend": backend, "streams": len(prompts), "equal_to_generate": equal_streams,
            "worst_teacher_forced_gap": round(worst_gap, 4), "worst_logprob_diff": round(worst_lp, 4), "tol": tol}


# ---- timing helpers ---------------------------------------------------------------------------

def _time(fn, device: str, repeats: int) -> float:
    """Median seconds of fn() after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- paged-attention decode --------------------------------------------------------------------

def decode_attention(quick: bool, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, batch: int = 32,
                     ctx: int = 4096, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                     block_size: int = 16) -> dict:
    """One decode token per sequence over `ctx` keys: the triton kernel reading the paged pool
    against SDPA over K/V already contiguous (its best case), and SDPA with the gather from
    the pool that it needs first."""
    import torch.nn.functional as F

    from kvtier.engine.kernels.attention_inputs import PagedAttentionInputs
    from kvtier.engine.kernels.paged_attention_triton import paged_attention

    per_seq = -(-ctx // block_size)
    gen = torch.Generator(device="cpu").manual_seed(0)
    pool = torch.randn(batch * per_seq + 1, 2, block_size, kv_heads, head_dim, generator=gen).to(device, dtype)
    tables = torch.randperm(batch * per_seq, generator=gen).view(batch, per_seq).to(device, torch.int32)
    q = torch.randn(batch, heads, head_dim, generator=gen).to(device, dtype)
    i32 = dict(dtype=torch.int32, device=device)
    inputs = PagedAttentionInputs(tables, torch.arange(batch + 1, **i32), torch.full((batch,), ctx, **i32),
                                  torch.zeros(batch, **i32), 1, ctx)
    scale = head_dim**-0.5
    out = torch.empty_like(q)

    def gather():
        kv = pool[tables.long()]  # [B, blocks, 2, bs, kvh, d]
        return (kv[:, :, 0].flatten(1, 2)[:, :ctx].transpose(1, 2), kv[:, :, 1].flatten(1, 2)[:, :ctx].transpose(1, 2))

    k, v = gather()
    k, v = k.contiguous(), v.contiguous()
    qs = q[:, :, None]
    repeats = 5 if quick else 20
    t_triton = _time(lambda: paged_attention(q, pool, inputs, scale, out), device, repeats)
    t_sdpa = _time(lambda: F.scaled_dot_product_attention(qs, k, v, scale=scale, enable_gqa=True), device, repeats)
    t_gather = _time(lambda: F.scaled_dot_product_attention(qs, *gather(), scale=scale, enable_gqa=True),
                     device, repeats)
    ref = F.scaled_dot_product_attention(qs, k, v, scale=scale, enable_gqa=True)[:, :, 0]
    err = (paged_attention(q, pool, inputs, scale, out).float() - ref.float()).abs().max().item()
    return {"ok": err < 2e-2, "shape": dict(batch=batch, ctx=ctx, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                            block_size=block_size, dtype=str(dtype)),
            "triton_us": round(t_triton * 1e6, 1), "sdpa_contiguous_us": round(t_sdpa * 1e6, 1),
            "sdpa_with_gather_us": round(t_gather * 1e6, 1),
            "triton_over_sdpa_contiguous": round(t_triton / t_sdpa, 3),
            "triton_over_sdpa_with_gather": round(t_triton / t_gather, 3), "max_abs_err": err}


# ---- tier save bandwidth -----------------------------------------------------------------------

def tier_save_bandwidth(quick: bool, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                        block_shape: tuple = (16, 2, 16, 8, 128), num_blocks: int = 2048, batch: int = 256) -> dict:
    """GB/s from the device pool to pinned host memory for a save of `batch` scattered blocks:
    gather_blocks straight into pinned staging (the connector's path) against one plain
    pinned `copy_` of as many contiguous bytes (the DMA ceiling), plus the former
    index_select + .cpu() and a device-side gather followed by a pinned copy."""
    from kvtier.engine.kernels.block_copy_triton import gather_blocks

    pin = device == "cuda"
    pool = torch.randn(num_blocks, *block_shape, device=device, dtype=dtype)
    ids = torch.randperm(num_blocks)[:batch].to(device=device, dtype=torch.int32)
    staging = torch.empty(batch, *block_shape, dtype=dtype, pin_memory=pin)
    device_staging = torch.empty(batch, *block_shape, dtype=dtype, device=device)
    nbytes = staging.numel() * staging.element_size()
    repeats = 5 if quick else 20
    t_gather = _time(lambda: gather_blocks(pool, ids, staging), device, repeats)
    exact = torch.equal(staging, pool[ids.long()].cpu())
    t_plain = _time(lambda: staging.copy_(pool[:batch], non_blocking=True), device, repeats)
    t_old = _time(lambda: pool.index_select(0, ids.long()).cpu(), device, repeats)
    t_two = _time(lambda: staging.copy_(gather_blocks(pool, ids, device_staging), non_blocking=True), device, repeats)
    gbps = {name: round(nbytes / t / 1e9, 2) for name, t in
            (("gather_to_pinned", t_gather), ("plain_pinned_copy", t_plain), ("index_select_cpu", t_old),
             ("gather_on_device_then_pinned_copy", t_two))}
    ratio = gbps["gather_to_pinned"] / gbps["plain_pinned_copy"]
    return {"ok": exact, "bytes": nbytes, "gbps": gbps, "gather_over_plain": round(ratio, 3),
            "goal_met": ratio >= 0.8}


# ---- TTFT from the CPU tier --------------------------------------------------------------------

def ttft_from_cpu_tier(path: str, quick: bool, device: str = "cuda", prompt_tokens: int = 8000,
                       tier: str = "cpu:2GiB", dtype: str = "bfloat16", kv_bytes: int = KV_BYTES) -> dict:
    """Seconds to the first token of a prompt_tokens-long prompt: recomputed (cold) against
    loaded from the CPU tier after the device prefix cache was cleared (always loaded:
    load_or_recompute off)."""
    from kvtier import LLM, SamplingParams

    vocab = _vocab(path)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    a, b, warm = _prompts(3, prompt_tokens, prompt_tokens, vocab, seed=7)
    with LLM(path, device=device, dtype=dtype, kv_tiers=[tier], kv_connector_config={"load_or_recompute": False},
             max_num_batched_tokens=8192, kv_cache_memory_bytes=kv_bytes) as llm:
        llm.generate([{"prompt_token_ids": warm}], one, use_tqdm=False)  # compile and allocate, untimed

        def run(prompt):
            start = time.perf_counter()
            out = llm.generate([{"prompt_token_ids": prompt}], one, use_tqdm=False)[0]
            return time.perf_counter() - start, out

        t_cold_a, first = run(a)
        t_cold_b, _ = run(b)
        hits, cleared = [], True  # the first load also pays one-time costs (kernel compiles, staging)
        for _ in range(2):
            llm.engine.connector.flush(30)
            cleared &= llm.reset_prefix_cache()
            hits.append(run(a))
    cold = min(t_cold_a, t_cold_b)
    (t_first, _), (t_hit, hit) = hits
    same = all(h.outputs[0].token_ids == first.outputs[0].token_ids for _, h in hits)
    loaded = min(h.kv_sources.get("cpu", 0) for _, h in hits)
    return {"ok": cleared and loaded > 0 and same, "prompt_tokens": prompt_tokens,
            "ttft_recompute_ms": round(cold * 1e3, 1), "ttft_cpu_tier_first_load_ms": round(t_first * 1e3, 1),
            "ttft_cpu_tier_ms": round(t_hit * 1e3, 1), "speedup": round(cold / t_hit, 2),
            "tokens_from_cpu": loaded, "sources": dict(hit.kv_sources)}


# ---- offline throughput ------------------------------------------------------------------------

def offline_throughput(path: str, quick: bool, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                       num_requests: int = 64, out_tokens: int = 128, hf_batches: tuple = (16, 64),
                       kv_bytes: int = KV_BYTES) -> dict:
    """Generated tokens per second, kvtier against transformers `generate` (sorted, left-padded
    batches; its fastest batch size is the denominator, padding tokens not counted)."""
    from transformers import AutoModelForCausalLM

    from kvtier import LLM, SamplingParams

    n = num_requests // 4 if quick else num_requests
    prompts = _prompts(n, 64, 512, _vocab(path), seed=3)
    params = SamplingParams(temperature=0, max_tokens=out_tokens, ignore_eos=True)
    name = str(dtype).removeprefix("torch.")
    with LLM(path, device=device, dtype=name, max_num_seqs=max(n, 1), max_num_batched_tokens=4096,
             kv_cache_memory_bytes=kv_bytes) as llm:
        llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=2), use_tqdm=False)
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        t_ours = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    order = sorted(range(n), key=lambda i: len(prompts[i]))
    hf_tps = {}
    with torch.inference_mode():
        hf.generate(torch.tensor([prompts[0]], device=device), max_new_tokens=2, do_sample=False, pad_token_id=0)
        for size in hf_batches:
            size = min(size, n)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for b in range(0, n, size):
                idx = order[b : b + size]
                longest = max(len(prompts[i]) for i in idx)
                ids = torch.zeros(len(idx), longest, dtype=torch.long)
                mask = torch.zeros(len(idx), longest, dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, longest - len(prompts[i]):] = torch.tensor(prompts[i])
                    mask[r, longest - len(prompts[i]):] = 1
                hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=out_tokens,
                            min_new_tokens=out_tokens, do_sample=False, pad_token_id=0)
            if device == "cuda":
                torch.cuda.synchronize()
            hf_tps[size] = n * out_tokens / (time.perf_counter() - start)
    del hf
    ours = generated / t_ours
    best = max(hf_tps.values())
    return {"ok": generated == n * out_tokens, "requests": n, "out_tokens": out_tokens,
            "kvtier_tok_s": round(ours, 1), "transformers_tok_s": {str(k): round(v, 1) for k, v in hf_tps.items()},
            "kvtier_over_best_transformers": round(ours / best, 2)}
