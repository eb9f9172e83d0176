"""The config tree: flags > KVTIER_* environment > --config file > defaults, sources, errors,
aliases, and every EngineConfig field reachable three ways."""
import argparse
import dataclasses
import json
import logging

import pytest

from kvtier.engine.cli import build_parser
from kvtier.engine.config import EngineConfig
from kvtier.engine.config_sources import (engine_config, engine_keys, llm_engine_config, resolve_cli, serve_config,
                                          tree_keys)
from kvtier.kvstore.service.server.config import build_kv_server_config, resolve_kv_server
from kvtier.kvstore.service.server.main import add_kv_server_arguments, start_server


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def write(tmp_path, text: str, name: str = "kvtier.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


FILE = """\
engine:
  model: /models/from-file
  seed: 11
scheduler:
  max_num_seqs: 3
  max_num_batched_tokens: 512
cache:
  block_size: 32
parking:
  max_parked_fraction: 0.25
server:
  port: 9100
  max_queue: 5
"""


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path):
    config = write(tmp_path, FILE)
    env = {"KVTIER_SCHEDULER_MAX_NUM_SEQS": "5", "KVTIER_CACHE_BLOCK_SIZE": "8", "KVTIER_SERVER_PORT": "9200"}
    args = parse("serve", "--config", config, "--max-num-seqs", "7", "--port", "9300")
    r = resolve_cli(args, env, server=True)
    got = {p: (r.values[p], str(r.sources[p])) for p in (
        "scheduler.max_num_seqs", "cache.block_size", "engine.seed", "scheduler.max_num_batched_tokens",
        "parking.max_parked_fraction", "engine.dtype", "server.port", "server.max_queue", "server.host")}
    assert got == {
        "scheduler.max_num_seqs": (7, "flag --max-num-seqs"),  # flag beats env and file
        "cache.block_size": (8, "env KVTIER_CACHE_BLOCK_SIZE"),  # env beats file
        "engine.seed": (11, f"file {config}:3"),
        "scheduler.max_num_batched_tokens": (512, f"file {config}:6"),
        "parking.max_parked_fraction": (0.25, f"file {config}:10"),
        "engine.dtype": ("auto", "default"),
        "server.port": (9300, "flag --port"),
        "server.max_queue": (5, f"file {config}:13"),
        "server.host": ("127.0.0.1", "default"),
    }
    cfg = engine_config(r)
    assert (cfg.model, cfg.max_num_seqs, cfg.block_size, cfg.seed) == ("/models/from-file", 7, 8, 11)
    assert serve_config(r).port == 9300


def test_json_file_works_like_yaml(tmp_path):
    config = write(tmp_path, json.dumps({"engine": {"model": "m"}, "cache": {"kv_cache_memory_bytes": "2MiB"}},
                                        indent=1), "kvtier.json")
    r = resolve_cli(parse("generate", "--prompt", "x", "--config", config), {})
    assert r.values["cache.kv_cache_memory_bytes"] == 2 << 20
    assert str(r.sources["cache.kv_cache_memory_bytes"]).startswith(f"file {config}:")


@pytest.mark.parametrize("text, needle", [
    ("scheduler:\n  max_num_seqs: 4\n  max_num_seqz: 4\n", r"scheduler\.max_num_seqz: unknown key \(from file .*:3\)"),
    ("cache:\n  block_size: sixteen\n", r"cache\.block_size: expected an integer, got 'sixteen' \(from file .*:2\)"),
    ("cache:\n  enable_prefix_caching: 1\n", r"cache\.enable_prefix_caching: expected true or false.*:2\)"),
    ("\n\ncache:\n  kv_cache_memory_bytes: 4 gigs\n",
     r"cache\.kv_cache_memory_bytes: cannot parse '4 gigs'.*\(from file .*:4\)"),
    ("tiers:\n  kv_tiers: cpu:1GiB\n", r"tiers\.kv_tiers: expected a list.*:2\)"),
    ("cachee:\n  block_size: 16\n", r":1: unknown section 'cachee'"),
    ("block_size: 16\n", r"block_size: unknown key \(from file .*:1\)"),
    ("cache: [1, 2\n", r"not valid YAML"),
])
def test_file_errors_name_key_and_line(tmp_path, text, needle):
    args = parse("serve", "--config", write(tmp_path, text))
    with pytest.raises(ValueError, match=needle):
        resolve_cli(args, {}, server=True)


def test_validation_errors_name_the_source(tmp_path):
    config = write(tmp_path, "engine:\n  model: m\n  device: cpu\ncache:\n  block_size: 0\n")
    with pytest.raises(ValueError, match=r"cache\.block_size: must be a positive integer.*\(from file .*:5\)"):
        engine_config(resolve_cli(parse("generate", "--prompt", "x", "--config", config), {}))
    with pytest.raises(ValueError, match=r"parking\.park_policy: unknown 'pin'.*\(from env KVTIER_PARKING_PARK_POLICY\)"):
        engine_config(resolve_cli(parse("generate", "--prompt", "x", "--model", "m", "--device", "cpu"),
                                  {"KVTIER_PARKING_PARK_POLICY": "pin"}))
    with pytest.raises(ValueError, match=r"engine\.model: required; set --model, KVTIER_ENGINE_MODEL"):
        engine_config(resolve_cli(parse("generate", "--prompt", "x"), {}))


@pytest.mark.parametrize("env, needle", [
    ({"KVTIER_SCHEDULER_MAX_NUM_SEQ": "4"}, "KVTIER_SCHEDULER_MAX_NUM_SEQ: no such configuration key"),
    ({"KVTIER_SCHEDULER_MAX_NUM_SEQS": "four"}, r"scheduler\.max_num_seqs: expected an integer.*env KVTIER_SCHEDULER_MAX_NUM_SEQS"),
    ({"KVTIER_CACHE_KV_CACHE_MEMORY_BYTES": "lots"}, r"cache\.kv_cache_memory_bytes: cannot parse 'lots'.*env"),
])
def test_env_errors_name_the_variable(env, needle):
    with pytest.raises(ValueError, match=needle):
        resolve_cli(parse("generate", "--prompt", "x"), env)


def test_env_vars_kvtier_uses_for_other_things_are_not_keys():
    r = resolve_cli(parse("serve"), {"KVTIER_CACHE_DIR": "/tmp/x", "KVTIER_API_KEY": "k", "KVTIER_OTHER_THING": "1"},
                    server=True)
    assert r.values["server.api_key"] == "k" and str(r.sources["server.api_key"]) == "env KVTIER_API_KEY"
    r = resolve_cli(parse("serve"), {"KVTIER_API_KEY": "old", "KVTIER_SERVER_API_KEY": "new"}, server=True)
    assert r.values["server.api_key"] == "new"


def _sample(key):
    """(text for a flag / variable, the value it must resolve to) for a key of this kind."""
    if key.choices:
        choice = key.choices[-1]
        return choice, choice
    return {"int": ("7", 7), "float": ("0.25", 0.25), "size": ("3MiB", 3 << 20), "list": ("cpu:1GiB", ["cpu:1GiB"]),
            "float_list": ("0.5,0.25", [0.5, 0.25]), "dict": ('{"a": 1}', {"a": 1}),
            "str": ("text", "text"), "any": ("text", "text")}[key.kind]


def test_every_engine_config_field_is_reachable_by_flag_env_and_file(tmp_path):
    keys = {k.name: k for k in engine_keys()}
    assert set(keys) == {f.name for f in dataclasses.fields(EngineConfig)}, "a field is missing from the tree"
    parser_actions = build_parser()._subparsers._group_actions[0].choices["serve"]._option_string_actions
    for name, key in keys.items():
        assert key.flag in parser_actions, f"{name}: no flag"
        if key.kind == "bool":
            argv, env_text, value = [f"--no-{key.flag[2:]}"], "false", False
        else:
            text, value = _sample(key)
            argv, env_text = [key.flag, text], text
        by_flag = resolve_cli(parse("serve", *argv), {}, server=True)
        assert by_flag.values[key.path] == value and by_flag.sources[key.path].kind == "flag", name
        by_env = resolve_cli(parse("serve"), {key.env: env_text}, server=True)
        assert by_env.values[key.path] == value and str(by_env.sources[key.path]) == f"env {key.env}", name
        config = write(tmp_path, json.dumps({key.section: {name: value}}))
        by_file = resolve_cli(parse("serve", "--config", config), {}, server=True)
        assert by_file.values[key.path] == value and by_file.sources[key.path].kind == "file", name


def test_new_fields_get_a_section_by_name():
    sections = {k.name: k.section for k in tree_keys(server=True)}
    assert sections["max_num_seqs"] == "scheduler" and sections["block_size"] == "cache"
    assert sections["kv_tiers"] == "tiers" and sections["kv_connector"] == "connector"
    assert sections["park_policy"] == "parking" and sections["port"] == "server" and sections["level"] == "logging"
    assert all(s in ("engine", "scheduler", "cache", "tiers", "connector", "parking", "metrics", "events", "server",
                     "logging") for s in sections.values())


def test_llm_kwargs_go_through_the_tree():
    env = {"KVTIER_SCHEDULER_MAX_NUM_SEQS": "3", "KVTIER_CACHE_BLOCK_SIZE": "32"}
    cfg = llm_engine_config("m", {"device": "cpu", "block_size": 8}, env)
    assert (cfg.max_num_seqs, cfg.block_size) == (3, 8)  # env fills in, keyword arguments win
    with pytest.raises(ValueError, match="unknown engine argument"):
        llm_engine_config("m", {"max_num_seq": 3}, {})
    with pytest.raises(ValueError, match=r"scheduler\.max_num_seqs: .*\(from kwarg max_num_seqs\)"):
        llm_engine_config("m", {"device": "cpu", "max_num_seqs": 0}, {})


def test_cli_default_tiers_unless_tiers_or_a_connector_are_configured(tmp_path):
    assert [t.split(":")[0] for t in resolve_cli(parse("serve"), {}).values["tiers.kv_tiers"]] == ["cpu", "lmdb"]
    assert resolve_cli(parse("serve", "--no-kv-tiers"), {}).values["tiers.kv_tiers"] is None
    assert resolve_cli(parse("serve"), {"KVTIER_TIERS_KV_TIERS": "none"}).values["tiers.kv_tiers"] is None
    r = resolve_cli(parse("serve", "--kv-connector", "multi"), {})
    assert r.values["tiers.kv_tiers"] is None
    with pytest.raises(ValueError, match="contradict"):
        resolve_cli(parse("serve", "--no-kv-tiers", "--kv-tier", "cpu:1GiB"), {})


def test_vllm_aliases():
    r = resolve_cli(parse("serve", "--kv-offloading-size", "2"), {})
    assert r.values["tiers.kv_tiers"] == ["cpu:2GiB"] and str(r.sources["tiers.kv_tiers"]) == "flag --kv-offloading-size"
    with pytest.raises(ValueError, match="kv-offloading-size"):
        resolve_cli(parse("serve", "--kv-offloading-size", "0"), {})
    transfer = json.dumps({"kv_connector": "multi", "kv_role": "kv_both",
                           "kv_connector_extra_config": {"connectors": [{"name": "tiered"}]}})
    r = resolve_cli(parse("serve", "--kv-transfer-config", transfer), {})
    assert r.values["connector.kv_connector"] == "multi"
    assert r.values["connector.kv_connector_config"] == {"connectors": [{"name": "tiered"}]}
    assert r.values["tiers.kv_tiers"] is None  # a connector replaces the CLI's default tiers
    r = resolve_cli(parse("serve", "--kv-transfer-config",
                          '{"kv_connector": "Mine", "kv_connector_module_path": "pkg.mod"}'), {})
    assert r.values["connector.kv_connector"] == "pkg.mod:Mine"
    with pytest.raises(ValueError, match="unknown key.*kv_bogus"):
        resolve_cli(parse("serve", "--kv-transfer-config", '{"kv_connector": "x", "kv_bogus": 1}'), {})


def test_gpu_memory_utilization_is_validated_and_a_noted_no_op_on_the_cpu(caplog):
    with pytest.raises(ValueError, match=r"cache\.gpu_memory_utilization: must be a number in \(0, 1\]"):
        engine_config(resolve_cli(parse("serve", "--model", "m", "--device", "cpu",
                                        "--gpu-memory-utilization", "1.5"), {}))
    plain = EngineConfig(model="m", device="cpu")
    cfg = engine_config(resolve_cli(parse("serve", "--model", "m", "--device", "cpu",
                                          "--gpu-memory-utilization", "0.5"), {}))
    with caplog.at_level(logging.WARNING, logger="kvtier"):
        assert cfg.kv_pool_bytes() == plain.kv_pool_bytes()
    assert "gpu_memory_utilization is ignored on the CPU" in caplog.text


def test_write_policy_reaches_the_tiered_connector():
    cfg = engine_config(resolve_cli(parse("serve", "--model", "m", "--device", "cpu", "--kv-tier", "cpu:1MiB",
                                          "--kv-write-policy", "write-back"), {}))
    assert cfg.connector_spec() == ("tiered", {"write_policy": "write-back", "tiers": ["cpu:1MiB"]})


def test_lmcache_yaml_keys_map_onto_tiers(tmp_path):
    config = write(tmp_path, "engine:\n  model: m\nlocal_cpu: true\nmax_local_cpu_size: 2\n"
                             "local_disk: file:///data/kv/\nmax_local_disk_size: 20\nremote_url: redis://cache:6379/0\n")
    r = resolve_cli(parse("serve", "--config", config), {})
    assert r.values["tiers.kv_tiers"] == ["cpu:2GiB", "lmdb:/data/kv/?size=20GiB", "redis://cache:6379/0"]
    assert str(r.sources["tiers.kv_tiers"]) == f"file {config}:3 (LMCache keys)"
    config = write(tmp_path, "local_cpu: false\nlocal_disk: /data/kv\nmax_local_disk_size: 1.5\n")
    assert resolve_cli(parse("serve", "--config", config), {}).values["tiers.kv_tiers"] == ["lmdb:/data/kv?size=1.5GiB"]
    config = write(tmp_path, "local_cpu: true\nchunk_size: 256\n")
    with pytest.raises(ValueError, match=r"chunk_size: unknown key \(from file .*:2\)"):
        resolve_cli(parse("serve", "--config", config), {})
    config = write(tmp_path, "remote_url: lm://localhost:65432\n")
    with pytest.raises(ValueError, match="remote_url: 'lm://localhost:65432' is not supported"):
        resolve_cli(parse("serve", "--config", config), {})
    config = write(tmp_path, "local_cpu: true\ntiers:\n  kv_tiers: [cpu:1GiB]\n")
    with pytest.raises(ValueError, match="set twice"):
        resolve_cli(parse("serve", "--config", config), {})


def test_kv_server_tree_and_start_from_a_config_file(tmp_path):
    config = write(tmp_path, "kv_server:\n  listen: 127.0.0.1:0\n  capacity: 3MiB\n  bulk_listen: 'off'\n"
                             "  workers: 2\nlogging:\n  level: info\n")
    parser = argparse.ArgumentParser()
    add_kv_server_arguments(parser)
    r = resolve_kv_server(parser.parse_args(["--config", config, "--workers", "3"]),
                          {"KVTIER_KV_SERVER_DRAIN_SECONDS": "1.5", "KVTIER_CACHE_BLOCK_SIZE": "8"})
    cfg = build_kv_server_config(r)
    assert (cfg.capacity, cfg.workers, cfg.drain_seconds, cfg.bulk_listen) == (3 << 20, 3, 1.5, "off")
    assert r.values["logging.level"] == "info"
    running = start_server(parser.parse_args(["--config", config]))
    try:
        assert running.port > 0 and running.store.capacity_bytes == 3 << 20 and running.bulk is None
    finally:
        running.stop(0)
    with pytest.raises(ValueError, match=r"kv_server\.capacit: unknown key \(from file .*:2\)"):
        resolve_kv_server(parser.parse_args(["--config", write(tmp_path, "kv_server:\n  capacit: 1GiB\n")]), {})
    with pytest.raises(ValueError, match=r"kv_server\.workers: must be >= 1.*\(from env KVTIER_KV_SERVER_WORKERS\)"):
        build_kv_server_config(resolve_kv_server(parser.parse_args([]), {"KVTIER_KV_SERVER_WORKERS": "0"}))


@pytest.mark.gpu
def test_gpu_memory_utilization_sizes_the_device_pool_on_cuda():
    import torch

    free, total = torch.cuda.mem_get_info()
    used = total - free
    share = min(1.0, (used + (1 << 30)) / total)  # leaves about 1 GiB for the KV pool
    cfg = EngineConfig(model="m", device="cuda", gpu_memory_utilization=share)
    assert abs(cfg.kv_pool_bytes() - (int(total * share) - used)) < 64 << 20  # other processes may move a bit
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(model="m", device="cuda", gpu_memory_utilization=max(used / total / 2, 1e-6)).kv_pool_bytes()
