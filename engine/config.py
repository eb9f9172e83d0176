"""Engine configuration: one dataclass built from kwargs or CLI flags, validated once."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from kvtier.engine.attention.backends import resolve_backend

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
}

_DEFAULT_CPU_KV_BYTES = 1 << 30  # 1 GiB device pool when running on the CPU
_CUDA_KV_FRACTION = 0.8  # share of free GPU memory left after weights


def parse_dtype(value: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto`/None picks float32 on the CPU and bfloat16 on CUDA (vLLM's convention)."""
    if isinstance(value, torch.dtype):
        return value
    if value in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        return _DTYPES[str(value).lower()]
    except KeyError:
        raise ValueError(f"dtype: unknown value {value!r}; choose one of auto, {', '.join(sorted(_DTYPES))}")


def parse_device(value: str | torch.device | None) -> torch.device:
    if isinstance(value, torch.device):
        return value
    if value in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: cannot parse {value!r}; use auto, cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was requested but no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {value!r} is not supported; use auto, cpu or cuda[:N]")
    return device


def _positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


@dataclass
class EngineConfig:
    """Everything `LLM(...)` and `kvtier generate` accept; names follow vLLM where it has one."""

    model: str
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    device: str | torch.device = "auto"
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    kv_cache_memory_bytes: int | None = None
    seed: int = 0
    # Which attention path runs; "reference" is the slow obviously-correct one for tests.
    attention_backend: str = "auto"
    # KV tiers below the device pool, fastest first: ["cpu:4GiB", "lmdb:/path?size=64GiB"].
    kv_tiers: list[str] | None = None
    # A connector by name ("tiered", "multi", an entry point, or "package.module:Class").
    kv_connector: str | None = None
    kv_connector_config: dict | None = None
    # Seconds a connector has to report a load it started; past that the load counts as
    # failed and the request recomputes (docs/connectors.md). Generous: the tiers' own
    # socket timeouts (0.25-5 s) end a stuck read long before.
    kv_load_timeout_s: float = 30.0
    # Hybrid models: share of the device KV budget per KV group (None: by need, see
    # engine/kv_cache/budget.py), and tokens between SSM state checkpoints (None: the
    # smallest block multiple whose attention KV weighs one checkpoint).
    kv_group_memory_fractions: list[float] | None = None
    ssm_checkpoint_interval: int | None = None
    # "auto": checkpoints at prompt ends, every interval and at branch points; "last-boundary":
    # at prompt ends only (what a one-checkpoint-per-request engine keeps; for comparison).
    ssm_checkpoint_policy: str = "auto"
    # Requests that park at a tool call (SamplingParams(park=...)): keep, offload, discard
    # or auto (by expected cost), and the most of the device KV memory parked requests may pin.
    park_policy: str = "auto"
    max_parked_fraction: float = 0.5
    # KV events (docs/kv_events.md): a ZMQ PUB endpoint speaking vLLM's schema, e.g.
    # "tcp://*:5557" (needs `pip install kvtier[events]`), its topic, vLLM's replay socket
    # and how many batches it keeps, a JSON-lines file, and how many events each consumer may
    # have queued before new ones are dropped (counted).
    kv_events_endpoint: str | None = None
    kv_events_topic: str = ""
    kv_events_replay_endpoint: str | None = None
    kv_events_replay_batches: int = 10_000
    kv_events_file: str | None = None
    kv_events_queue: int = 10_000
    # vLLM's --gpu-memory-utilization: the share of the GPU's memory this engine may use
    # (weights included); the device KV pool gets what is left of it. Ignored on the CPU.
    gpu_memory_utilization: float | None = None
    # How the tiered connector writes tiers below the first (None: its default, write-through).
    kv_write_policy: str | None = None
    # Serve this engine's Prometheus metrics over HTTP on this port (all interfaces; 0: any
    # free port); None: no HTTP server, metrics only through LLM.metrics_text().
    metrics_port: int | None = None
    # Batch-invariant kernels (docs/determinism.md): a request's logprobs are the same bits
    # whatever the batch, the chunking, or the tier its KV came from. Requests may opt out
    # per request (SamplingParams(deterministic=False)) and then run the fast kernels.
    deterministic: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model: a path to a Hugging Face model directory is required")
        self.device = parse_device(self.device)
        self.dtype = parse_dtype(self.dtype, self.device)
        _positive_int("block_size", self.block_size)
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive_int("max_model_len", self.max_model_len, allow_none=True)
        _positive_int("kv_cache_memory_bytes", self.kv_cache_memory_bytes, allow_none=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: must be an integer, got {self.seed!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError("enable_prefix_caching: must be True or False")
        resolve_backend(self.attention_backend, self.device)  # unknown name, or triton where it cannot run
        mp = self.metrics_port
        if mp is not None and (isinstance(mp, bool) or not isinstance(mp, int) or not 0 <= mp <= 65535):
            raise ValueError(f"metrics_port: must be a port number in [0, 65535] or None, got {mp!r}")
        self._validate_groups()
        self._validate_parking()
        self._validate_connector()
        self._validate_kv_events()
        self._validate_aliases()
        self._validate_determinism()

    def _validate_determinism(self) -> None:
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"deterministic: must be True or False, got {self.deterministic!r}")
        if self.deterministic and self.kv_tiers:
            from kvtier.engine.determinism import check_tier_codecs

            check_tier_codecs(self.kv_tiers)

    def _validate_parking(self) -> None:
        from kvtier.engine.parking.policy import POLICIES

        if self.park_policy not in POLICIES:
            raise ValueError(f"park_policy: unknown {self.park_policy!r}; choose one of {', '.join(POLICIES)}")
        f = self.max_parked_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
            raise ValueError(f"max_parked_fraction: must be a number in [0, 1], got {f!r}")

    def _validate_kv_events(self) -> None:
        for key, example in (("kv_events_endpoint", "tcp://*:5557"), ("kv_events_replay_endpoint", "tcp://*:5558")):
            ep = getattr(self, key)
            if ep is not None and (not isinstance(ep, str) or not ep.startswith(("tcp://", "ipc://", "inproc://"))):
                raise ValueError(f"{key}: expected a ZMQ address such as {example!r}, got {ep!r}")
        if self.kv_events_replay_endpoint is not None and self.kv_events_endpoint is None:
            raise ValueError("kv_events_replay_endpoint: replays what kv_events_endpoint publishes; set that too")
        _positive_int("kv_events_replay_batches", self.kv_events_replay_batches)
        if not isinstance(self.kv_events_topic, str):
            raise ValueError(f"kv_events_topic: must be a string, got {self.kv_events_topic!r}")
        if self.kv_events_file is not None and (not isinstance(self.kv_events_file, str) or not self.kv_events_file):
            raise ValueError(f"kv_events_file: must be a file path, got {self.kv_events_file!r}")
        _positive_int("kv_events_queue", self.kv_events_queue)

    def _validate_groups(self) -> None:
        fractions = self.kv_group_memory_fractions
        if fractions is not None:
            if isinstance(fractions, (str, bytes)) or not isinstance(fractions, (list, tuple)) or not all(
                isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1 for f in fractions
            ):
                raise ValueError(f"kv_group_memory_fractions: must be a list of numbers in (0, 1], got {fractions!r}")
            if sum(fractions) > 1 + 1e-9:
                raise ValueError(f"kv_group_memory_fractions: must sum to at most 1, got {sum(fractions)}")
        if self.ssm_checkpoint_policy not in ("auto", "last-boundary"):
            raise ValueError(f"ssm_checkpoint_policy: unknown {self.ssm_checkpoint_policy!r}; use auto or last-boundary")
        _positive_int("ssm_checkpoint_interval", self.ssm_checkpoint_interval, allow_none=True)
        if self.ssm_checkpoint_interval is not None and self.ssm_checkpoint_interval % self.block_size:
            raise ValueError(f"ssm_checkpoint_interval: must be a multiple of block_size ({self.block_size}), "
                             f"got {self.ssm_checkpoint_interval}")

    def _validate_connector(self) -> None:
        from kvtier.kvstore.tiers.spec import parse_tier_spec

        if self.kv_tiers is not None:
            if isinstance(self.kv_tiers, str) or not isinstance(self.kv_tiers, (list, tuple)):
                raise ValueError("kv_tiers: must be a list of tier specs, e.g. ['cpu:4GiB']")
            for spec in self.kv_tiers:
                if isinstance(spec, str):
                    parse_tier_spec(spec)  # fail fast, naming the bad spec
            if self.kv_connector not in (None, "tiered"):
                raise ValueError("kv_tiers: only the 'tiered' connector takes tiers; put them in kv_connector_config")
        if self.kv_connector_config is not None and not isinstance(self.kv_connector_config, dict):
            raise ValueError("kv_connector_config: must be a dict")
        t = self.kv_load_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise ValueError(f"kv_load_timeout_s: must be a positive number of seconds, got {t!r}")
        if (self.kv_tiers or self.kv_connector) and not self.enable_prefix_caching:
            raise ValueError("kv_connector: tiers key blocks by their prefix hash; keep enable_prefix_caching on")

    def _validate_aliases(self) -> None:
        u = self.gpu_memory_utilization
        if u is not None and (isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1):
            raise ValueError(f"gpu_memory_utilization: must be a number in (0, 1], got {u!r}")
        if self.kv_write_policy not in (None, "write-through", "write-back"):
            raise ValueError(f"kv_write_policy: unknown {self.kv_write_policy!r}; use write-through or write-back")

    def connector_spec(self) -> tuple[str, dict] | None:
        """(name, config) of the connector to build, or None for no connector."""
        if self.kv_tiers:
            policy = {"write_policy": self.kv_write_policy} if self.kv_write_policy else {}
            return "tiered", {**(self.kv_connector_config or {}), **policy, "tiers": list(self.kv_tiers)}
        if self.kv_connector:
            return self.kv_connector, dict(self.kv_connector_config or {})
        return None

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(model=model, **kwargs)

    def kv_pool_bytes(self) -> int:
        """Bytes for the device KV pool: explicit, else a default that fits the device."""
        if self.kv_cache_memory_bytes is not None:
            return self.kv_cache_memory_bytes
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            if self.gpu_memory_utilization is None:
                return int(free * _CUDA_KV_FRACTION)
            # Called once the weights are loaded: what is in use already counts against the share.
            budget = int(total * self.gpu_memory_utilization) - (total - free)
            if budget <= 0:
                raise ValueError(f"gpu_memory_utilization: {self.gpu_memory_utilization} of the GPU leaves no "
                                 f"room for the KV cache ({(total - free) / 2**30:.1f} GiB already in use)")
            return budget
        if self.gpu_memory_utilization is not None:
            logging.getLogger(__name__).warning(
                "gpu_memory_utilization is ignored on the CPU; the device KV pool is %d MiB "
                "(set kv_cache_memory_bytes to change it)", _DEFAULT_CPU_KV_BYTES >> 20)
        return _DEFAULT_CPU_KV_BYTES
