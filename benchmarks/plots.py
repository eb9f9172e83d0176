"""PNG plots of the benchmarks' JSON (as printed by each script through bench_io.emit).

One function per benchmark, `plot_<name>(result, path) -> path`; `PLOTTERS` maps the names
`kvtier bench` uses onto them. matplotlib is an optional extra: every function raises
ImportError with an install hint when it is missing.

    python benchmarks/plots.py NAME RESULT.json OUT.png
"""
from __future__ import annotations

import json
import sys

from kvtier.engine.demo_plot import SOURCE_COLORS, TurnRecord, plot_turns, pyplot, source_color, tier_label, tier_name


def _save(fig, plt, path: str, title: str) -> str:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _grouped_bars(ax, labels: list[str], series: dict[str, list[float]], colors: dict[str, str] | None = None):
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, values, width, label=name, color=(colors or {}).get(name))
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.legend(fontsize=8)


def plot_tiers(result: dict, path: str) -> str:
    """GB/s of each tier's put and get next to its raw client (and gRPC next to Redis)."""
    plt = pyplot()
    pairs = [r for r in result["rows"] if "gbps" in r]
    versus = [r for r in result["rows"] if r.get("tier") == "grpc_vs_redis"]
    fig, axes = plt.subplots(1, 2 if versus else 1, figsize=(12 if versus else 7, 4), squeeze=False)
    ax = axes[0][0]
    _grouped_bars(ax, [f"{r['tier']} {r['op']}" for r in pairs],
                  {"kvtier tier": [r["gbps"] for r in pairs], "raw client": [r["raw_gbps"] for r in pairs]})
    ax.set_ylabel("GB/s (higher is better)")
    ax.set_title(f"tier vs its raw client, {pairs[0]['blocks'] if pairs else 0} blocks per call", fontsize=9)
    if versus:
        ax = axes[0][1]
        labels = [f"{r['value']} x{r['clients']}" for r in versus]
        series = {f"{op} {who}": [r[f"{op}_{who}_gbps"] for r in versus] for op in ("put", "get")
                  for who in ("grpc", "redis")}
        _grouped_bars(ax, labels, series)
        ax.set_ylabel("GB/s")
        ax.set_title("gRPC KV service vs Redis (value size x clients)", fontsize=9)
    return _save(fig, plt, path, f"KV tier throughput ({result.get('model', '')}, {result.get('dtype', '')})")


def plot_ttft(result: dict, path: str) -> str:
    """TTFT against context length: recompute, device hit, and a load from each tier."""
    plt = pyplot()
    default_len = result.get("prompt_tokens")
    curves: dict[str, dict[int, float]] = {}
    kinds = {"recompute": "computed", "device hit": "device"}  # curve -> colour
    for row in result["rows"]:
        n = row.get("prompt_tokens", default_len)
        curves.setdefault("recompute", {}).setdefault(n, row["recompute_ms"])
        curves.setdefault("device hit", {}).setdefault(n, row["device_hit_ms"])
        if "tier_hit_ms" in row:
            name = f"load from {tier_label(row['tier'])}"
            curves.setdefault(name, {})[n] = row["tier_hit_ms"]
            kinds[name] = tier_name(row["tier"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in curves.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=name,
                color=source_color(kinds[name]) if kinds[name] in SOURCE_COLORS else None)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT, ms (lower is better)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, plt, path, "Time to first token: recompute vs device hit vs tier load")


def plot_multiturn(result: dict, path: str) -> str:
    """Per config: TTFT per round, TTFT p50/p99, throughput, and prompt tokens by KV source."""
    plt = pyplot()
    configs = result["configs"]
    names = list(configs)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0][0]
    for name in names:
        rounds = configs[name]["per_round"]
        ax.plot([r["round"] for r in rounds], [r["ttft_ms_mean"] for r in rounds], marker="o", label=name)
    ax.set_xticks([r["round"] for r in configs[names[0]]["per_round"]])
    ax.set_xlabel("round")
    ax.set_ylabel("mean TTFT, ms")
    ax.set_title("TTFT per round", fontsize=9)
    ax.legend(fontsize=8)
    _grouped_bars(axes[0][1], names, {"p50": [configs[n]["ttft_ms_p50"] for n in names],
                                      "p99": [configs[n]["ttft_ms_p99"] for n in names]})
    axes[0][1].set_title("TTFT, ms (lower is better)", fontsize=9)
    axes[1][0].bar(names, [configs[n]["tokens_per_s"] for n in names], color="#457b9d")
    axes[1][0].set_title("throughput, prompt + output tokens/s (higher is better)", fontsize=9)
    ax = axes[1][1]
    sources = sorted({k for n in names for k in configs[n]["sources"]},
                     key=lambda k: (k == "computed", k != "device", k))
    base = [0] * len(names)
    for src in sources:
        heights = [configs[n]["sources"].get(src, 0) for n in names]
        ax.bar(names, heights, bottom=base, color=source_color(src), label=src)
        base = [b + h for b, h in zip(base, heights)]
    ax.set_title("prompt tokens by KV source", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, plt, path, f"Multi-round QA: {result['users']} users x {result['rounds']} rounds, "
                                 f"{result['system_tokens']}-token shared system prompt")


def plot_multiturn_turns(result: dict, path: str, config: str | None = None) -> str:
    """Every request of one config (default: the first with a tier), TTFT coloured by KV source."""
    configs = result["configs"]
    config = config or next((n for n in configs if n != "none"), next(iter(configs)))
    records = [TurnRecord(rnd["round"], req["user"], req["ttft_ms"], req["sources"])
               for rnd in configs[config]["per_round"] for req in rnd["requests"]]
    return plot_turns(records, path, f"Multi-round QA with tiers '{config}': TTFT per turn by KV source")


def plot_throughput(result: dict, path: str) -> str:
    """Offline throughput of kvtier next to transformers generate, same requests."""
    plt = pyplot()
    engines = [e for e in ("kvtier", "transformers") if e in result]
    fig, ax = plt.subplots(figsize=(6, 4))
    _grouped_bars(ax, ["output tokens/s", "total tokens/s"],
                  {e: [result[e]["output_tok_s"], result[e]["total_tok_s"]] for e in engines})
    ax.set_ylabel("tokens/s (higher is better)")
    return _save(fig, plt, path, f"Offline throughput, {result['requests']} requests "
                                 f"({result.get('speedup_vs_transformers', '?')}x transformers)")


def plot_hybrid(result: dict, path: str) -> str:
    """Whichever sections ran: sliding-window concurrency, Granite multi-turn TTFT, dense speed."""
    plt = pyplot()
    sections = [s for s in ("sliding", "granite", "dense") if s in result]
    fig, axes = plt.subplots(1, len(sections), figsize=(5 * len(sections), 4), squeeze=False)
    for ax, name in zip(axes[0], sections):
        sec = result[name]
        if name == "sliding":
            ax.bar(["window freeing", "all full attention"],
                   [sec["window_freeing"]["peak_running"], sec["all_full_attention"]["peak_running"]],
                   color=["#2a9d8f", "#e76f51"])
            ax.set_title(f"peak running sequences, {sec['context_tokens']}-token context", fontsize=9)
        elif name == "granite":
            rows = [k for k, v in sec.items() if isinstance(v, dict) and "ttft_ms_mean" in v]
            ax.bar(rows, [sec[k]["ttft_ms_mean"] for k in rows], color="#457b9d")
            ax.set_xticks(range(len(rows)), [r.replace("_", "\n") for r in rows], fontsize=7)
            ax.set_title("hybrid multi-turn mean TTFT, ms", fontsize=9)
        else:
            speeds = sec["tokens_per_s"]
            ax.bar(list(speeds), [sorted(v)[len(v) // 2] for v in speeds.values()], color="#6a994e")
            ax.set_title(f"dense tokens/s vs {sec['baseline_ref']}", fontsize=9)
    return _save(fig, plt, path, "KV groups: sliding windows, SSM state, dense path")


def plot_serve(result: dict | list[dict], path: str) -> str:
    """Throughput and TTFT against concurrency: serve_load results, one per number of users
    (a list, or `kvtier bench serve`'s {"runs": [...]}; one plain result plots one point)."""
    plt = pyplot()
    results = result.get("runs", [result]) if isinstance(result, dict) else result
    results = sorted(results, key=lambda r: r["users"])
    users = [r["users"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for tier in ("no_tier", "cpu_tier"):
        for side, style in (("offline", "--"), ("server", "-")):
            if all(tier in r for r in results):
                left.plot(users, [r[tier][side]["tokens_per_s"] for r in results], style, marker="o",
                          label=f"{side}, {tier.replace('_', ' ')}")
        if all(tier in r for r in results):
            right.plot(users, [r[tier]["server"]["ttft_ms_p50"] for r in results], marker="o",
                       label=f"p50, {tier.replace('_', ' ')}")
            right.plot(users, [r[tier]["server"]["ttft_ms_p99"] for r in results], ":", marker="x",
                       label=f"p99, {tier.replace('_', ' ')}")
    left.set_xlabel("concurrent users")
    left.set_ylabel("tokens/s (higher is better)")
    right.set_xlabel("concurrent users")
    right.set_ylabel("server TTFT, ms")
    for ax in (left, right):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, plt, path, "kvtier serve: throughput and TTFT vs concurrency")


PLOTTERS = {"tiers": plot_tiers, "ttft": plot_ttft, "multiturn": plot_multiturn, "throughput": plot_throughput,
            "hybrid": plot_hybrid, "serve": plot_serve}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in PLOTTERS:
        print(f"usage: plots.py {{{','.join(PLOTTERS)}}} RESULT.json OUT.png", file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        result = json.load(f)
    print(PLOTTERS[argv[0]](result, argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
