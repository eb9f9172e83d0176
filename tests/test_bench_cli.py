"""`kvtier bench`, the benchmarks' plots, the demo's plot and the progress bars.

Benchmarks run with tiny models and sizes (a smoke run, never a timing assertion); the plot
functions get JSON of each script's real shape, from a run here or from the committed
results under benchmarks/results/.
"""
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier import LLM, SamplingParams
from kvtier.engine.bench_cli import find_benchmarks_dir, load_plots
from kvtier.engine.make_model import make_model

import matplotlib  # noqa: F401,E402  (a test dependency: the plots are part of what is tested)

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
RESULTS = BENCH_DIR / "results"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def kvtier(*args, timeout=300, cwd=None):
    return subprocess.run([sys.executable, "-m", "kvtier", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("tiny") / "model"), arch="llama", size="tiny", seed=0)


@pytest.fixture(scope="module")
def plots():
    return load_plots(find_benchmarks_dir())


@pytest.fixture
def bench_scripts(monkeypatch):
    """Import benchmark scripts in-process, as `python benchmarks/X.py` would find their siblings."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))


def test_bench_multiturn_writes_json_and_pngs(tiny_model, tmp_path):
    out = tmp_path / "results"
    proc = kvtier("bench", "multiturn", "--quick", "--out", "results", "--model", tiny_model,
                  "--args=--users 2 --rounds 2 --system-tokens 48 --question-tokens 16 24 --answer-tokens 4 "
                  "--configs none,cpu", cwd=tmp_path)  # a relative --out: the folder the user is in
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "multiturn.json").read_text())
    assert result["benchmark"] == "multiturn" and result["repeats"] == 1  # --quick: one repeat
    assert set(result["configs"]) == {"none", "cpu"}
    for row in result["configs"].values():
        assert len(row["per_round"]) == 2 and row["ttft_ms_p99"] >= row["ttft_ms_p50"] > 0
        assert sum(row["sources"].values()) == sum(r["sources"].get("computed", 0) + r["sources"].get("device", 0)
                                                   + r["sources"].get("cpu", 0) for r in row["per_round"])
    # The second round reuses the shared system prompt and the first round's history.
    assert result["configs"]["none"]["prefix_reuse"] > 0.3
    assert is_png(out / "multiturn.png") and is_png(out / "multiturn-turns.png")
    assert str(out / "multiturn.png") in proc.stdout  # says where it wrote


def test_bench_fails_clearly(tmp_path):
    proc = kvtier("bench", "ttft", "--out", str(tmp_path), "--benchmarks-dir", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "no benchmark scripts in" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = kvtier("bench", "tiers", "--model", "m", "--out", str(tmp_path))
    assert proc.returncode == 2 and "does not take a model" in proc.stderr
    proc = kvtier("bench", "serve", "--concurrency", "0,2", "--out", str(tmp_path))
    assert proc.returncode == 2 and "--concurrency" in proc.stderr


def test_script_argv_order(tmp_path):
    """--quick sizes first, shared options next, --args last (argparse keeps the last value)."""
    from argparse import Namespace

    from kvtier.engine.bench_cli import BENCHES, script_argv

    args = Namespace(quick=True, model="M", repeats=None, script_args="--prompt-tokens 99")
    argv = script_argv(BENCHES["ttft"], args, str(tmp_path))
    assert argv[-2:] == ["--prompt-tokens", "99"] and ["--model", "M"] == argv[-6:-4]
    assert argv[-4:-2] == ["--repeats", "1"] and f"lmdb:{tmp_path}/ttft-lmdb?size=1GiB" in argv
    args = Namespace(quick=False, model="M", repeats=2, script_args="")
    assert script_argv(BENCHES["tiers"], args, "x") == ["--repeats", "2"]  # tiers takes no model


def test_ttft_and_tiers_json_plot(tiny_model, tmp_path, plots, bench_scripts):
    import tiers
    import ttft

    assert ttft.main(["--model", tiny_model, "--prompt-tokens", "32,64", "--repeats", "1",
                      "--out", str(tmp_path / "ttft.json")]) == 0
    result = json.loads((tmp_path / "ttft.json").read_text())
    assert [r["prompt_tokens"] for r in result["rows"]] == [32, 64]
    assert is_png(Path(plots.plot_ttft(result, str(tmp_path / "ttft.png"))))
    assert tiers.main(["--tiers", "cpu", "--batch", "2", "--repeats", "1", "--slab-batches", "1",
                       "--model-size", "tiny", "--out", str(tmp_path / "tiers.json")]) == 0
    result = json.loads((tmp_path / "tiers.json").read_text())
    assert is_png(Path(plots.plot_tiers(result, str(tmp_path / "tiers.png"))))


@pytest.mark.parametrize("name", ["throughput", "tiers", "ttft", "multiturn", "hybrid", "serve"])
def test_plots_accept_committed_results(name, plots, tmp_path):
    """The committed JSON of every script (benchmarks/results/, from `kvtier bench all`) plots."""
    source = RESULTS / f"{name}.json"
    if not source.is_file():
        pytest.skip(f"{source} not committed")
    result = json.loads(source.read_text())
    assert is_png(Path(plots.PLOTTERS[name](result, str(tmp_path / f"{name}.png"))))


def test_demo_writes_ttft_png(tiny_model, tmp_path):
    png = tmp_path / "demo.png"
    proc = kvtier("demo", "--model", tiny_model, "--turns", "2", "--users", "1", "--max-tokens", "2",
                  "--kv-tier", "cpu:64MiB", "--png", str(png))
    assert proc.returncode == 0, proc.stderr
    assert "turn 2 user 1" in proc.stdout  # the table as before
    assert f"written to {png}" in proc.stdout and is_png(png)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_generate_progress_only_on_a_terminal(tiny_model, monkeypatch):
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    with LLM(tiny_model) as llm:
        for stream, use_tqdm, shown in ((io.StringIO(), True, False), (_Terminal(), False, False),
                                        (_Terminal(), True, True)):
            monkeypatch.setattr(sys, "stderr", stream)
            llm.generate(["a b", "c d"], params, use_tqdm=use_tqdm)
            monkeypatch.undo()
            assert ("generate" in stream.getvalue() and "2/2" in stream.getvalue()) == shown, stream.getvalue()


def test_model_loading_silent_when_not_a_terminal(tiny_model, monkeypatch):
    import torch

    from kvtier.engine.model_loader import load_model

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    load_model(tiny_model, torch.float32, "cpu")
    assert stream.getvalue() == ""
    # On a terminal the bar shows (after its half-second delay, here zero) and counts every byte.
    from tqdm import tqdm

    import kvtier.engine.model_loader as loader

    bars = []

    def no_delay(*a, **kw):
        bars.append(tqdm(*a, **{**kw, "delay": 0}))
        return bars[-1]

    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(loader, "tqdm", no_delay)
    load_model(tiny_model, torch.float32, "cpu")
    assert "loading weights" in term.getvalue()
    assert bars[0].n == bars[0].total > 0


def test_agentic_pool_takes_medians_over_every_repeat_of_every_run(bench_scripts):
    import agentic_pool

    def run(auto, keep, base):
        return {"mixes": {"fast": {"auto": {"turns_per_s_runs": auto}, "keep": {"turns_per_s_runs": keep},
                                   "discard, no tier": {"turns_per_s_runs": base},
                                   "auto_over_best_fixed": 0.5}}}

    pooled = agentic_pool.pool([run([4, 5, 6], [5, 5, 9], [2, 2, 2]), run([7, 8, 9], [1, 6, 7], [3, 3, 3])])
    row = pooled["fast"]
    assert row["repeats"] == 6 and row["turns_per_s"] == {"auto": 6.5, "keep": 5.5, "discard, no tier": 2.5}
    assert row["auto_over_best_fixed"] == round(6.5 / 5.5, 3) and row["auto_over_discard_no_tier"] == 2.6
