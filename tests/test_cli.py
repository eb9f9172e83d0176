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


@pytest.mark.parametrize("args", [[], ["generate"], ["make-model"], ["demo"], ["serve"], ["kv-server"],
                                  ["config", "show"], ["config", "show-kv-server"]])
def test_help(args):
    proc = kvtier(*args, "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout
    if args:  # every subcommand takes --log-level
        assert "--log-level {debug,info,warning,error}" in proc.stdout


@pytest.mark.parametrize("args, needle", [
    (["generate", "--model", "m", "--prompt", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["generate", "--prompt", "x"], "--model"),
    (["make-model", "out", "--arch", "gpt5"], "invalid choice"),
    (["generate", "--model", "m", "--prompt", "x", "--kv-cache-memory", "lots"], "cannot parse"),
    (["make-model", "out", "--log-level", "loud"], "invalid choice"),
    (["config", "show", "--block-size", "big"], "cache.block_size: expected an integer"),
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


def test_config_show_names_every_source(tmp_path):
    config = tmp_path / "kvtier.yaml"
    config.write_text("engine:\n  model: /m\nscheduler:\n  max_num_seqs: 3\ncache:\n  block_size: 32\n")
    proc = kvtier("config", "show", "--config", str(config), "--max-num-seqs", "9", "--device", "cpu",
                  env={"KVTIER_CACHE_BLOCK_SIZE": "8", "KVTIER_SERVER_PORT": "0"})
    assert proc.returncode == 0, proc.stderr
    lines = {line.split(":")[0].strip(): line for line in proc.stdout.splitlines()}
    assert lines["model"].endswith(f"# file {config}:2")
    assert lines["max_num_seqs"].startswith("  max_num_seqs: 9") and lines["max_num_seqs"].endswith("# flag --max-num-seqs")
    assert lines["block_size"].startswith("  block_size: 8") and lines["block_size"].endswith("# env KVTIER_CACHE_BLOCK_SIZE")
    assert lines["port"].endswith("# env KVTIER_SERVER_PORT") and lines["seed"].endswith("# default")
    assert lines["kv_tiers"].endswith("# default (kvtier CLI: cpu + lmdb)")
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheduler:\n  max_num_seqs: 3\n  max_num_seqz: 4\n")
    proc = kvtier("config", "show", "--config", str(bad))
    assert proc.returncode == 2 and f"scheduler.max_num_seqz: unknown key (from file {bad}:3)" in proc.stderr


def test_generate_takes_its_model_and_options_from_a_config_file(tiny_model, tmp_path):
    config = tmp_path / "kvtier.yaml"
    config.write_text(f"engine:\n  model: {tiny_model}\ntiers:\n  kv_tiers: null\n")
    proc = kvtier("generate", "--config", str(config), "--prompt", "hello", "--max-tokens", "3", "--json",
                  env={"KVTIER_SCHEDULER_MAX_NUM_SEQS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["token_ids"]) <= 3


def _start(args, env, needle):
    proc = subprocess.Popen([sys.executable, "-m", "kvtier", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    line = proc.stdout.readline()
    if needle not in line:
        proc.kill()
        pytest.fail(f"did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, line


def test_serve_and_kv_server_start_from_a_config_file(tiny_model, tmp_path):
    import httpx

    config = tmp_path / "kvtier.yaml"
    config.write_text(f"engine:\n  model: {tiny_model}\n  device: cpu\ncache:\n  kv_cache_memory_bytes: 1MiB\n"
                      "server:\n  port: 0\n  served_model_name: from-config\n  api_key: secret\n"
                      "kv_server:\n  listen: 127.0.0.1:0\n  capacity: 4MiB\nlogging:\n  level: error\n")
    proc, line = _start(["serve", "--config", str(config), "--no-kv-tiers"], {}, "listening on")
    try:
        url = re.search(r"(http://\S+)", line).group(1)
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer secret"}).json()
        assert [m["id"] for m in models["data"]] == ["from-config"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    proc, line = _start(["kv-server", "--config", str(config)], {"KVTIER_KV_SERVER_DRAIN_SECONDS": "0.5"},
                        "kvtier kv-server listening on 127.0.0.1:")
    try:
        port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
        assert port > 0
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
