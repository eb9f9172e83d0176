"""Pool the repeats of several `agentic.py` runs: per mix and policy, the median turns/s over
every repeat of every run, and auto's ratios to the best fixed policy and to "discard, no
tier". Repeats of one policy spread wider than the gaps between the tier policies, so more
repeats than one run's three settle the comparison better. Prints JSON.

    python benchmarks/agentic_pool.py benchmarks/results/agentic-run1.json benchmarks/results/agentic.json
"""
from __future__ import annotations

import argparse
import json
import statistics

BASELINE = "discard, no tier"


def pool(results: list[dict]) -> dict:
    out = {}
    for mix in results[0]["mixes"]:
        runs: dict[str, list[float]] = {}
        for result in results:
            for policy, row in result["mixes"][mix].items():
                if isinstance(row, dict):
                    runs.setdefault(policy, []).extend(row["turns_per_s_runs"])
        medians = {policy: round(statistics.median(r), 3) for policy, r in runs.items()}
        best = max(v for p, v in medians.items() if p not in ("auto", BASELINE))
        out[mix] = {"repeats": len(runs["auto"]), "turns_per_s": medians,
                    "auto_over_best_fixed": round(medians["auto"] / best, 3),
                    "auto_over_discard_no_tier": round(medians["auto"] / medians[BASELINE], 3)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="JSON files written by agentic.py --out")
    args = ap.parse_args(argv)
    print(json.dumps(pool([json.load(open(f)) for f in args.results]), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
