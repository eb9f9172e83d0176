"""benchmarks/gpu_check.py off the GPU: `--help` works anywhere, a machine without CUDA gets
a clear message and a non-zero exit, and every part's code runs on tiny CPU shapes (the
kernels through triton's interpreter, the engine on the CPU), so the script's first GPU run
fails only on what needs the GPU."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import triton_setup  # noqa: E402,F401  (first: sets TRITON_INTERPRET before triton loads)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
KV = 32 << 20  # device KV pool of the tiny CPU runs
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=32000, max_position_embeddings=1024)


@pytest.fixture
def parts(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as `python benchmarks/gpu_check.py` finds its siblings
    import gpu_check_parts

    return gpu_check_parts


def test_help_works_anywhere():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--skip-tests" in proc.stdout and "tier_save" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_and_fails():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--skip-tests"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and proc.stdout == ""


def test_kernel_parts_on_tiny_cpu_shapes(parts):
    dec = parts.decode_attention(True, device="cpu", dtype=torch.float32, batch=2, ctx=40, heads=4, kv_heads=2,
                                 head_dim=16)
    assert dec["ok"] and dec["triton_us"] > 0 and dec["max_abs_err"] < 1e-4
    save = parts.tier_save_bandwidth(True, device="cpu", dtype=torch.float32, block_shape=(2, 2, 16, 2, 16),
                                     num_blocks=16, batch=4)
    assert save["ok"] and set(save["gbps"]) == {"gather_to_pinned", "plain_pinned_copy", "index_select_cpu",
                                                 "gather_on_device_then_pinned_copy"}


@pytest.mark.slow
def test_engine_parts_on_a_tiny_cpu_model(parts, tmp_path):
    path = str(tmp_path / "tiny")
    assert parts.write_model(path, TINY, torch.float32)["params_m"] < 5
    eq = parts.hf_equality(path, tol=1e-3, quick=True, device="cpu", dtype=torch.float32, max_tokens=4, kv_bytes=KV)
    assert eq["ok"] and eq["backend"] == "sdpa" and eq["worst_logprob_diff"] < 1e-3, eq
    ttft = parts.ttft_from_cpu_tier(path, True, device="cpu", prompt_tokens=200, tier="cpu:64MiB", dtype="float32",
                                    kv_bytes=KV)
    assert ttft["ok"] and ttft["tokens_from_cpu"] >= 192, ttft
    tput = parts.offline_throughput(path, True, device="cpu", dtype=torch.float32, num_requests=8, out_tokens=4,
                                    hf_batches=(2,), kv_bytes=KV)
    assert tput["ok"] and tput["kvtier_tok_s"] > 0, tput
