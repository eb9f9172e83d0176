"""`--log-level`: one logging configuration for the process, quiet (warning) by default."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

LEVELS = ("debug", "info", "warning", "error")


@dataclass
class LoggingConfig:
    level: str = field(default="warning", metadata={
        "help": "log level (debug, info, warning, error)", "flag": "--log-level", "choices": LEVELS})

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level: unknown {self.level!r}; choose one of {', '.join(LEVELS)}")


def configure_logging(level: str) -> None:
    """Set the `kvtier` loggers' level and give them one stderr handler, once per process."""
    if level not in LEVELS:
        raise ValueError(f"--log-level: unknown {level!r}; choose one of {', '.join(LEVELS)}")
    root = logging.getLogger("kvtier")
    root.setLevel(level.upper())
    if not any(getattr(h, "_kvtier", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("kvtier %(levelname)s %(name)s: %(message)s"))
        handler._kvtier = True
        root.addHandler(handler)
