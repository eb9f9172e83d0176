"""Time to first token for one long prompt: recomputed, hit on the device, loaded from a tier.

For each tier spec, in one process and one run: (1) a fresh prompt is prefilled from
scratch (recompute), (2) the same prompt again hits the device prefix cache, (3) the device
cache is dropped and the prompt comes back from the tier. `--slow-ms` adds rows for a tier
made slow on purpose (a delay per get call plus a bandwidth cap), to show that the
load-or-recompute planner keeps TTFT within a few percent of recompute however slow it is.
`--prompt-tokens 1024,4096,8176` measures every length (one row per tier and length), for
a plot of TTFT against context length.

    python benchmarks/ttft.py [--prompt-tokens 8176] [--tier cpu:2GiB --tier lmdb:/tmp/x?size=4GiB]
                              [--slow-ms 0,5,50,500] [--repeats 3] [--out f.json]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time

from bench_io import emit
import torch

from kvtier import LLM, SamplingParams
from kvtier.engine.make_model import make_model
from kvtier.engine.model_config import load_model_config
from kvtier.kvstore.tiers.cpu_tier import CpuTier
from kvtier.kvstore.tiers.base import Tier
from kvtier.kvstore.tiers.spec import BlockLayout

ONE_TOKEN = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


class SlowTier(Tier):
    """Wraps a tier and makes its reads slow: `delay_s` per get call plus a bandwidth cap."""

    name = "slow"

    def __init__(self, inner: Tier, delay_s: float, bandwidth: float):
        super().__init__(inner.capacity_bytes)
        self.inner, self.delay_s, self.bandwidth = inner, delay_s, bandwidth
        self.nominal_read_bandwidth = inner.nominal_read_bandwidth
        self._stats = inner._stats  # the planner reads the measured bandwidth from here

    def lookup_prefix(self, keys):
        return self.inner.lookup_prefix(keys)

    def contains(self, keys):
        return self.inner.contains(keys)

    def get(self, keys, into):
        ok = self.inner.get(keys, into)  # records its own bytes and seconds in the shared stats
        nbytes = sum(t.numel() * t.element_size() for t, good in zip(into, ok) if good)
        pause = self.delay_s + nbytes / self.bandwidth
        time.sleep(pause)
        self._stats.add(read_seconds=pause)
        return ok

    def put(self, keys, blocks):
        self.inner.put(keys, blocks)

    def delete(self, keys):
        self.inner.delete(keys)

    def close(self):
        self.inner.close()


def _ttft(llm: LLM, prompt: list[int]):
    out = llm.generate({"prompt_token_ids": prompt}, ONE_TOKEN, use_tqdm=False)[0]
    return out.metrics.ttft, out


def _drop_device_cache(llm: LLM) -> None:
    if not llm.engine.kv.reset_prefix_cache():
        raise RuntimeError("device blocks still in use")


def measure(llm: LLM, vocab: int, n_tokens: int, repeats: int, rng: random.Random) -> dict:
    rec, dev, tier, sources = [], [], [], []
    for _ in range(repeats):
        prompt = [rng.randrange(3, vocab) for _ in range(n_tokens)]
        t, out = _ttft(llm, prompt)
        if out.kv_sources.get("computed", n_tokens) != n_tokens:
            # Prompts come from a fixed seed: a store kept from an earlier run serves them.
            raise RuntimeError(f"the 'recompute' run reused KV ({out.kv_sources}): start from an empty tier")
        rec.append(t)
        dev.append(_ttft(llm, prompt)[0])
        connector = llm.engine.connector
        if connector is not None:
            connector.flush()
            _drop_device_cache(llm)
            t, out = _ttft(llm, prompt)
            tier.append(t)
            sources.append(out.kv_sources)
    row = {
        "recompute_ms": round(statistics.median(rec) * 1000, 1),
        "device_hit_ms": round(statistics.median(dev) * 1000, 1),
        "device_hit_over_recompute": round(statistics.median(dev) / statistics.median(rec), 4),
    }
    if tier:
        row.update(
            tier_hit_ms=round(statistics.median(tier) * 1000, 1),
            tier_hit_over_recompute=round(statistics.median(tier) / statistics.median(rec), 4),
            kv_sources=sources[-1],
        )
    # Every repeat as well as the medians: on a shared machine one slow repeat says more
    # about the host than about the tier.
    row["runs_ms"] = {name: [round(t * 1000, 1) for t in times]
                      for name, times in (("recompute", rec), ("device_hit", dev), ("tier_hit", tier)) if times}
    return row


def slow_tier_row(model: str, delay_s: float, n_tokens: int, args, rng: random.Random) -> dict:
    cfg = load_model_config(model)
    layout = BlockLayout((cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim), torch.float32, torch.device("cpu"))
    slow = SlowTier(CpuTier(2 << 30, layout), delay_s, args.slow_bandwidth)
    with LLM(model, kv_connector="tiered", kv_connector_config={"tiers": [slow]}) as llm:
        # One read through the tier first, so the planner has measured it (until then it
        # assumes the tier's nominal bandwidth).
        warm = [rng.randrange(3, cfg.vocab_size) for _ in range(n_tokens)]
        _ttft(llm, warm)
        llm.engine.connector.flush()
        _drop_device_cache(llm)
        _ttft(llm, warm)
        row = measure(llm, cfg.vocab_size, n_tokens, args.repeats, rng)
    return {"tier": f"slow cpu (+{delay_s * 1000:g} ms/call, {args.slow_bandwidth / 1e6:g} MB/s)",
            "prompt_tokens": n_tokens, **row}


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"expected positive token counts, got {text!r}")
    return lengths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir (default: the 'small' llama, made in a temp dir)")
    ap.add_argument("--prompt-tokens", type=_lengths, default=[8176], help="one length or several, comma-separated")
    ap.add_argument("--tier", action="append", default=None, help="tier spec (repeatable); default cpu:2GiB")
    ap.add_argument("--slow-ms", default="", help="comma-separated per-call delays (ms) for slow-tier rows")
    ap.add_argument("--slow-bandwidth", type=float, default=200e6, help="bytes/s cap of the slow tier")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    tmp = tempfile.TemporaryDirectory(prefix="kvtier-ttft-")
    model = args.model or make_model(tmp.name + "/model", arch="llama", size="small", seed=0)
    vocab = load_model_config(model).vocab_size
    rng = random.Random(0)
    rows = []
    for spec in args.tier or ["cpu:2GiB"]:
        with LLM(model, kv_tiers=[spec]) as llm:
            _ttft(llm, [rng.randrange(3, vocab) for _ in range(min(args.prompt_tokens))])  # warm-up, untimed
            for n in args.prompt_tokens:
                rows.append({"tier": spec, "prompt_tokens": n, **measure(llm, vocab, n, args.repeats, rng)})
    for ms in [float(x) for x in args.slow_ms.split(",") if x]:
        for n in args.prompt_tokens:
            rows.append(slow_tier_row(model, ms / 1000, n, args, rng))
    lengths = args.prompt_tokens[0] if len(args.prompt_tokens) == 1 else args.prompt_tokens
    result = {"benchmark": "ttft", "prompt_tokens": lengths, "rows": rows}
    return emit(result, args.out)


if __name__ == "__main__":
    sys.exit(main())
