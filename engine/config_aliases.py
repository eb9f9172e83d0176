"""Spellings other tools' users already know, mapped onto the config tree.

vLLM flags: --kv-offloading-size GiB (a CPU tier), --kv-transfer-config JSON (a connector by
name with its config); --gpu-memory-utilization is an EngineConfig field of that name.
LMCache YAML keys (top level of a --config file): local_cpu, max_local_cpu_size (GB),
local_disk, max_local_disk_size (GB), remote_url -> tiers.kv_tiers. docs/configuration.md
has the table. LMCache's "GB" are 2**30 bytes, so they become GiB here.
"""
from __future__ import annotations

import argparse
import json

from kvtier.config_tree import ConfigFile, Setting, Source

TIERS = "tiers.kv_tiers"
_VLLM_IGNORED = {"kv_role", "kv_rank", "kv_parallel_size", "kv_buffer_device", "kv_buffer_size", "engine_id",
                 "kv_ip", "kv_port"}  # meaningful for vLLM's disaggregated prefill only
LMCACHE_KEYS = ("local_cpu", "max_local_cpu_size", "local_disk", "max_local_disk_size", "remote_url")
_REMOTE_SCHEMES = ("redis://", "rediss://", "redis+cluster://", "grpc://")


def add_alias_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("compatibility (vLLM spellings) and shortcuts")
    g.add_argument("--no-kv-tiers", action="store_true", default=argparse.SUPPRESS,
                   help="no tiers at all (not even the CLI's default cpu + lmdb tiers)")
    g.add_argument("--kv-offloading-size", default=argparse.SUPPRESS, metavar="GIB",
                   help="vLLM: offload KV to a CPU tier of this many GiB (same as --kv-tier cpu:NGiB)")
    g.add_argument("--kv-transfer-config", default=argparse.SUPPRESS, metavar="JSON",
                   help='vLLM: {"kv_connector": NAME, "kv_connector_extra_config": {...}}')


def alias_flags_layer(args: argparse.Namespace) -> dict[str, Setting]:
    layer: dict[str, Setting] = {}
    tiers_given = getattr(args, "kv_tiers", None) is not None
    if getattr(args, "no_kv_tiers", False):
        if tiers_given:
            raise ValueError("--no-kv-tiers and --kv-tier contradict each other")
        layer[TIERS] = Setting(None, Source("flag", "--no-kv-tiers"))
    if hasattr(args, "kv_offloading_size"):
        if tiers_given or TIERS in layer:
            raise ValueError("--kv-offloading-size: give either it or --kv-tier/--no-kv-tiers, not both")
        layer[TIERS] = Setting([offloading_tier(args.kv_offloading_size)], Source("flag", "--kv-offloading-size"))
    if hasattr(args, "kv_transfer_config"):
        for path, value in transfer_config(args.kv_transfer_config).items():
            layer[path] = Setting(value, Source("flag", "--kv-transfer-config"))
    return layer


def offloading_tier(text: str) -> str:
    try:
        gib = float(text)
    except ValueError:
        gib = -1.0
    if not gib > 0:
        raise ValueError(f"--kv-offloading-size: expected a positive number of GiB, got {text!r}")
    return f"cpu:{gib:g}GiB"


def transfer_config(text: str) -> dict[str, object]:
    """vLLM's KVTransferConfig JSON -> connector.kv_connector / connector.kv_connector_config."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--kv-transfer-config: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("kv_connector"), str):
        raise ValueError('--kv-transfer-config: expected {"kv_connector": NAME, ...}')
    unknown = sorted(set(data) - _VLLM_IGNORED - {"kv_connector", "kv_connector_extra_config",
                                                   "kv_connector_module_path"})
    if unknown:
        raise ValueError(f"--kv-transfer-config: unknown key(s) {', '.join(unknown)}")
    extra = data.get("kv_connector_extra_config") or {}
    if not isinstance(extra, dict):
        raise ValueError("--kv-transfer-config: kv_connector_extra_config must be an object")
    name = data["kv_connector"]
    if data.get("kv_connector_module_path"):  # vLLM loads NAME from that module
        name = f"{data['kv_connector_module_path']}:{name}"
    return {"connector.kv_connector": name, "connector.kv_connector_config": extra or None}


def lmcache_layer(config: ConfigFile) -> dict[str, Setting]:
    """Top-level LMCache keys of a --config file -> one tiers.kv_tiers setting."""
    entries = config.top_level
    for name, entry in entries.items():
        if name not in LMCACHE_KEYS:
            raise ValueError(f"{name}: unknown key (from file {config.where(entry.line)}); top-level keys are "
                             f"sections or the LMCache tier keys {', '.join(LMCACHE_KEYS)}")
    value = {n: e.value for n, e in entries.items()}
    first = min(e.line for e in entries.values())
    source = Source("file", f"{config.where(first)} (LMCache keys)")

    def gib(name: str, default):
        v = value.get(name, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"{name}: expected a positive number of GB, got {v!r} "
                             f"(from file {config.where(entries[name].line) if name in entries else config.path})")
        return f"{v:g}GiB"

    tiers = []
    local_cpu = value.get("local_cpu", True)
    if not isinstance(local_cpu, bool):
        raise ValueError(f"local_cpu: expected true or false (from file {config.where(entries['local_cpu'].line)})")
    if local_cpu:
        tiers.append(f"cpu:{gib('max_local_cpu_size', 5)}")  # LMCache's default size
    disk = value.get("local_disk")
    if disk:
        if not isinstance(disk, str):
            raise ValueError(f"local_disk: expected a path (from file {config.where(entries['local_disk'].line)})")
        tiers.append(f"lmdb:{disk.removeprefix('file://')}?size={gib('max_local_disk_size', None)}")
    remote = value.get("remote_url")
    if remote:
        if not isinstance(remote, str) or not remote.startswith(_REMOTE_SCHEMES):
            raise ValueError(f"remote_url: {remote!r} is not supported; use redis://, rediss://, "
                             f"redis+cluster:// or grpc:// (from file {config.where(entries['remote_url'].line)})")
        tiers.append(remote)
    return {TIERS: Setting(tiers or None, source)}
