"""The `kvtier` command line, run as a real subprocess."""
import json
import os
import re
import subprocess
import sys

import pytest


def kvtier(*args, env=None, timeout=300):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "kvtier", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    proc = kvtier("make-model", str(out), "--arch", "qwen3", "--size", "tiny", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    return str(out)


@pytest.mark.parametrize("args", [[], ["generate"], ["make-model"], ["demo"]])
def test_help(args):
    proc = kvtier(*args, "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout


@pytest.mark.parametrize("args, needle", [
    (["generate", "--model", "m", "--prompt", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["generate", "--prompt", "x"], "--model"),
    (["make-model", "out", "--arch", "gpt5"], "invalid choice"),
    (["generate", "--model", "m", "--prompt", "x", "--kv-cache-memory", "lots"], "cannot parse"),
])
def test_bad_flags_exit_2_with_one_line(args, needle):
    proc = kvtier(*args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr


def test_bad_tier_spec_and_missing_model_exit_2(tiny_model, tmp_path):
    proc = kvtier("generate", "--model", tiny_model, "--prompt", "x", "--kv-tier", "tape:9")
    assert proc.returncode == 2 and "tape:9" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = kvtier("generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x", "--no-kv-tiers")
    assert proc.returncode == 2 and "nowhere" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_generate_json(tiny_model):
    proc = kvtier("generate", "--model", tiny_model, "--prompt", "hello kvtier", "--prompt", "again",
                  "--max-tokens", "5", "--json", "--no-kv-tiers")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [r["prompt"] for r in rows] == ["hello kvtier", "again"]
    assert all(len(r["token_ids"]) <= 5 and r["finish_reason"] in ("stop", "length") for r in rows)


def test_demo_second_run_starts_warm_from_disk(tiny_model, tmp_path):
    env = {"KVTIER_CACHE_DIR": str(tmp_path / "cache")}
    args = ["demo", "--model", tiny_model, "--turns", "2", "--users", "2", "--max-tokens", "4"]
    first = kvtier(*args, env=env)
    assert first.returncode == 0, first.stderr
    assert "lmdb:" in first.stdout and "cpu:" in first.stdout  # the embedded default tiers
    second = kvtier(*args, env=env)
    assert second.returncode == 0, second.stderr
    first_turn = second.stdout.splitlines()[2]
    assert re.search(r"lmdb \d+", first_turn), f"the first turn must load from disk: {first_turn}"
    assert os.path.isdir(tmp_path / "cache" / "kv-lmdb")
