"""PNG of a multi-turn run: per request, where its prompt's KV came from and its TTFT.

Shared by `kvtier demo` and benchmarks/multiturn.py. matplotlib is an optional extra
(`pip install -e '.[bench]'`); `pyplot()` says so in one line when it is missing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MATPLOTLIB_MISSING = "matplotlib is not installed (pip install -e '.[bench]' or pip install matplotlib)"

# One colour per reuse source, the same in every plot, so figures can be compared side by side.
SOURCE_COLORS = {"device": "#2a9d8f", "cpu": "#e9c46a", "lmdb": "#f4a261", "redis": "#8d5fd3",
                 "grpc": "#457b9d", "slow": "#a8a8a8", "computed": "#e76f51"}
_EXTRA_COLORS = ["#264653", "#6a994e", "#bc4749", "#3d405b"]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend; ImportError with an install hint if absent."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(MATPLOTLIB_MISSING) from None
    matplotlib.use("Agg")  # never opens a window, works without a display
    import matplotlib.pyplot as plt

    return plt


def source_color(name: str) -> str:
    if name in SOURCE_COLORS:
        return SOURCE_COLORS[name]
    return _EXTRA_COLORS[sum(name.encode()) % len(_EXTRA_COLORS)]


def tier_name(source: str) -> str:
    """A tier spec or source name ("lmdb:/x?size=1GiB", "redis://h") to its kind ("lmdb", "redis")."""
    return source.split(":", 1)[0]


def tier_label(spec: str) -> str:
    """A short legend label for a tier spec: its kind and size, no scratch paths ("lmdb 1GiB")."""
    kind, _, rest = spec.partition(":")
    size = rest.split("size=", 1)[1].split("&", 1)[0] if "size=" in rest else rest if kind == "cpu" else ""
    return f"{kind} {size}".strip() if kind in ("cpu", "lmdb") else spec


@dataclass
class TurnRecord:
    """One request of a conversation: its turn, its user, its TTFT and its prompt tokens by source."""

    turn: int
    user: int
    ttft_ms: float
    sources: dict[str, int] = field(default_factory=dict)

    def main_source(self) -> str:
        """The source that supplied most reused tokens; "computed" when nothing was reused."""
        reused = {k: v for k, v in self.sources.items() if k != "computed" and v > 0}
        return max(reused, key=reused.get) if reused else "computed"


def plot_turns(records: list[TurnRecord], path: str, title: str) -> str:
    """Two panels over the same requests (in order): prompt tokens stacked by source, and TTFT
    coloured by the main source. Returns `path`."""
    if not records:
        raise ValueError("plot_turns: no records to plot")
    plt = pyplot()
    names = sorted({k for r in records for k in r.sources}, key=lambda k: (k == "computed", k != "device", k))
    xs = range(len(records))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * len(records) + 2), 6), sharex=True)
    base = [0] * len(records)
    for name in names:
        heights = [r.sources.get(name, 0) for r in records]
        top.bar(xs, heights, bottom=base, color=source_color(name), label=name)
        base = [b + h for b, h in zip(base, heights)]
    top.set_ylabel("prompt tokens")
    top.legend(fontsize=8, title="KV from", title_fontsize=8)
    colors = [source_color(r.main_source()) for r in records]
    bottom.bar(xs, [r.ttft_ms for r in records], color=colors)
    bottom.set_ylabel("TTFT, ms (colour: main source)")
    bottom.set_xticks(list(xs), [f"T{r.turn}\nU{r.user}" for r in records], fontsize=7)
    bottom.set_xlabel("turn / user, in the order sent")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
