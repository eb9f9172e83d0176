"""The `server` section of the config tree: what `kvtier serve` needs beyond the engine."""
from __future__ import annotations

from dataclasses import dataclass, field


def _f(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class ServeConfig:
    host: str = _f("127.0.0.1", "address to listen on")
    port: int = _f(8000, "port to listen on; 0 picks a free port (printed on start-up)")
    served_model_name: str | None = _f(None, "the `model` clients send (default: the model path)")
    api_key: str | None = _f(None, "require `Authorization: Bearer KEY` (env KVTIER_API_KEY works too)",
                             metavar="KEY")
    max_queue: int = _f(256, "requests allowed to wait beyond max_num_seqs; more are answered 429")
    shutdown_grace: float = _f(10.0, "seconds in-flight requests get to finish on SIGTERM before they are aborted")
    gather_window: float = _f(1.5, "when requests arrive in bursts, an idle engine waits for the rest of one until "
                              "none has come for this times the longest recent burst's span (at most 0.1 s); "
                              "0: never")
    stream_interval: int = _f(1, "streamed responses send the first token at once, then every this many tokens "
                              "(fewer, larger events: less work for server and clients per token)")

    def __post_init__(self) -> None:
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be a port number in [0, 65535], got {self.port!r}")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"max_queue: must be >= 0, got {self.max_queue}")
        if not 0 <= self.gather_window <= 10:
            raise ValueError(f"gather_window: must be in [0, 10], got {self.gather_window}")
        if isinstance(self.stream_interval, bool) or not isinstance(self.stream_interval, int) \
                or self.stream_interval < 1:
            raise ValueError(f"stream_interval: must be an integer >= 1, got {self.stream_interval!r}")
        if not self.shutdown_grace >= 0:
            raise ValueError(f"shutdown_grace: must be >= 0 seconds, got {self.shutdown_grace}")
