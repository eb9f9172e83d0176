"""The engine's config tree: EngineConfig's fields split into sections, plus the server and
logging sections, resolved from flags > environment > --config file > defaults.

New EngineConfig fields join the tree by themselves: `section_of` places them (a "section"
in the field's metadata, the table below, a name prefix, else "engine"), and they get a
flag (--field-name), a variable (KVTIER_<SECTION>_<FIELD>) and a file key. Help and flag
spellings for the existing fields live in _META here, so config.py stays a plain dataclass.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Mapping

from kvtier.config_tree.keys import ALL_SECTIONS
from kvtier.config_tree import (LoggingConfig, Resolved, Source, add_key_flags, build, defaults_layer, env_layer,
                                file_layer, flags_layer, keys_from_dataclass, kwargs_layer, load_config_file, merge)
from kvtier.engine.config import EngineConfig
from kvtier.engine.config_aliases import TIERS, add_alias_flags, alias_flags_layer, lmcache_layer
from kvtier.engine.serving.serve_config import ServeConfig

ENGINE_SECTIONS = ("engine", "scheduler", "cache", "tiers", "connector", "parking", "metrics", "events")
_SECTION_OF = {
    "max_num_seqs": "scheduler", "max_num_batched_tokens": "scheduler",
    "block_size": "cache", "enable_prefix_caching": "cache", "gpu_memory_utilization": "cache",
    "kv_write_policy": "tiers", "max_parked_fraction": "parking",
}
# First match wins; fields named like these land in that section.
_PREFIXES = (("kv_events", "events"), ("metrics", "metrics"), ("park", "parking"), ("kv_tier", "tiers"),
             ("kv_connector", "connector"), ("kv_load", "connector"), ("kv_cache", "cache"),
             ("kv_group", "cache"), ("ssm_", "cache"))
_META = {
    "model": {"help": "Hugging Face model directory"},
    "tokenizer": {"help": "tokenizer directory (default: the model's)"},
    "dtype": {"help": "auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16"},
    "device": {"help": "auto, cpu, cuda, cuda:N"},
    "block_size": {"help": "tokens per KV block"},
    "max_num_seqs": {"help": "most requests running at once"},
    "max_num_batched_tokens": {"help": "token budget of one step"},
    "max_model_len": {"help": "longest prompt + output (default: the model's)"},
    "enable_prefix_caching": {"help": "reuse KV of shared prompt prefixes", "off_flag": "--no-prefix-caching"},
    "kv_cache_memory_bytes": {"help": "device KV pool size, e.g. 512MiB", "size": True,
                              "flag": "--kv-cache-memory", "flag_aliases": ("--kv-cache-memory-bytes",)},
    "seed": {"help": "random seed"},
    "deterministic": {"help": "batch-invariant kernels: bitwise-identical logprobs whatever the batch, chunking "
                              "or tier (docs/determinism.md)"},
    "attention_backend": {"help": "attention path", "choices": ("auto", "torch", "sdpa", "triton", "reference")},
    "kv_tiers": {"help": "KV tier below the device pool, fastest first (repeatable): cpu:4GiB, "
                         "lmdb:PATH?size=64GiB, redis://host:port/0?ttl=3600, grpc://host:port",
                 "flag": "--kv-tier", "flag_aliases": ("--kv-tiers",), "repeatable": True},
    "kv_connector": {"help": "connector: tiered, multi, an entry point or package.module:Class"},
    "kv_connector_config": {"help": "the connector's config (JSON object)"},
    "kv_group_memory_fractions": {"help": "share of the KV memory per KV group (default: by need)"},
    "ssm_checkpoint_interval": {"help": "tokens between SSM state checkpoints, a multiple of block_size",
                                "metavar": "TOKENS"},
    "ssm_checkpoint_policy": {"help": "where SSM checkpoints are taken", "choices": ("auto", "last-boundary")},
    "park_policy": {"help": "how parked requests keep their KV (auto: by expected cost)",
                    "choices": ("keep", "offload", "discard", "auto")},
    "max_parked_fraction": {"help": "most of the device KV memory parked requests may pin"},
    "gpu_memory_utilization": {"help": "vLLM's fraction of the GPU's memory for this engine; sizes the device "
                                       "KV pool on CUDA (ignored on the CPU)"},
    "kv_write_policy": {"help": "how tiers below the first are written",
                        "choices": ("write-through", "write-back")},
    "metrics_port": {"help": "serve Prometheus /metrics on this port (0: any free port)"},
    "kv_load_timeout_s": {"help": "seconds a connector load may take before it is recomputed"},
    "kv_events_endpoint": {"help": "publish KV events on this ZMQ address (vLLM's schema), e.g. tcp://*:5557"},
    "kv_events_topic": {"help": "ZMQ topic of the KV-event messages"},
    "kv_events_replay_endpoint": {"help": "answer vLLM-style replay requests for missed KV-event batches on this "
                                          "ZMQ address, e.g. tcp://*:5558"},
    "kv_events_replay_batches": {"help": "KV-event batches kept for replay"},
    "kv_events_file": {"help": "append KV events to this JSON-lines file"},
    "kv_events_queue": {"help": "events each consumer may have queued before new ones are dropped"},
}
_ENGINE_TREE_ONLY = "KVTIER_CACHE_DIR"  # the demo's cache directory, not a config key
ENV_ALIASES = {"KVTIER_API_KEY": "server.api_key"}


def section_of(f: dataclasses.Field) -> str:
    section = f.metadata.get("section") or _SECTION_OF.get(f.name) or next(
        (s for prefix, s in _PREFIXES if f.name.startswith(prefix)), "engine")
    if section not in ENGINE_SECTIONS or section not in ALL_SECTIONS:
        raise ValueError(f"EngineConfig.{f.name}: unknown section {section!r}")
    return section


def engine_keys() -> list:
    return keys_from_dataclass(EngineConfig, section_of, _META)


def tree_keys(server: bool) -> list:
    keys = engine_keys()
    if server:
        keys += keys_from_dataclass(ServeConfig, lambda f: "server")
    return keys + keys_from_dataclass(LoggingConfig, lambda f: "logging")


def add_tree_flags(parser: argparse.ArgumentParser, server: bool) -> None:
    """--config, every key's flag and the compatibility aliases."""
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML or JSON config file (flags and KVTIER_* variables override it)")
    add_key_flags(parser, tree_keys(server))
    add_alias_flags(parser)


def default_kv_tiers() -> list[str]:
    """The CLI's embedded default: a CPU tier and a persistent LMDB tier in the cache dir."""
    from kvtier.engine.demo import cache_dir

    return ["cpu:1GiB", f"lmdb:{cache_dir() / 'kv-lmdb'}?size=8GiB"]


def resolve_cli(args: argparse.Namespace, environ: Mapping[str, str], server: bool = False) -> Resolved:
    """A CLI command's tree. Without any tier or connector setting, the CLI (unlike `LLM`)
    gets the default tiers, so a second run starts warm from disk."""
    keys = tree_keys(server)
    layers = [defaults_layer(keys)]
    if getattr(args, "config", None):
        layers.append(file_layer(keys, load_config_file(args.config), lmcache_layer))
    layers += [env_layer(keys, environ, ENV_ALIASES if server else None, frozenset({_ENGINE_TREE_ONLY})),
               {**flags_layer(keys, args), **alias_flags_layer(args)}]
    resolved = merge(keys, layers)
    if resolved.sources[TIERS].kind == "default" and resolved.get("connector.kv_connector") is None:
        resolved.values[TIERS] = default_kv_tiers()
        resolved.sources[TIERS] = Source("default", "(kvtier CLI: cpu + lmdb)")
    return resolved


def _engine_section_keys(resolved: Resolved) -> list:
    return [k for k in resolved.keys if k.section in ENGINE_SECTIONS]


def engine_config(resolved: Resolved) -> EngineConfig:
    return build(EngineConfig, resolved, _engine_section_keys(resolved))


def engine_kwargs(resolved: Resolved) -> dict:
    """EngineConfig arguments except the model (for callers that pick it themselves)."""
    return {k.name: resolved.values[k.path] for k in _engine_section_keys(resolved)
            if k.name != "model" and k.path in resolved.values}


def serve_config(resolved: Resolved) -> ServeConfig:
    return build(ServeConfig, resolved, [k for k in resolved.keys if k.section == "server"])


def llm_engine_config(model: str, kwargs: Mapping[str, object], environ: Mapping[str, str]) -> EngineConfig:
    """`LLM(model, **kwargs)`: keyword arguments > KVTIER_* variables > EngineConfig defaults."""
    keys = engine_keys()
    layers = [defaults_layer(keys), env_layer(keys, environ, reserved=frozenset({_ENGINE_TREE_ONLY})),
              kwargs_layer(keys, {"model": model, **kwargs})]
    resolved = merge(keys, layers)
    return engine_config(resolved)
