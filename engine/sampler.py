"""Turn logits [S, V] into next tokens: temperature, top-k, top-p, min-p, then an exponential race.

Randomness contract (what makes seeded requests reproducible and batch-invariant): every
non-greedy row draws exactly one Exponential(1) noise vector of size V per step from its own
generator (a seeded request's, else the shared one, rows in batch order), and the token is
argmax(probs / noise). That picks token i with probability probs[i] (the "exponential race",
as in vLLM), and a seeded row's token depends only on its own logits and its own generator.
Greedy rows draw nothing. `reference_sample` consumes generators the same way.

Filter semantics, shared with the reference:
- top-k keeps tokens whose scaled logit is >= the k-th largest (ties at the boundary kept);
- top-p sorts the (top-k renormalised) probs descending and keeps the shortest prefix whose
  sum reaches top_p, always at least the top token; ties with the last kept prob are kept,
  so the result never depends on how the sort orders equal values;
- min-p drops tokens with prob < min_p * max prob (a ratio, so renormalising does not matter).
Dropped tokens get prob exactly 0, and 0 / noise = 0 never wins the race.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from kvtier.engine.sampling_params import SamplingParams

# exponential_ can return exactly 0 on some backends; p / 0 would be inf (or nan for p = 0).
_TINY = torch.finfo(torch.float32).tiny


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: None unless the request set logprobs=k; else {token_id: logprob} of the top-k
    # tokens (descending) followed by the sampled token when it is not among them. Logprobs
    # are log_softmax of the raw logits, before temperature and filters (vLLM's default).
    logprobs: list[dict[int, float] | None]
    # Per row with logprobs: 1 + the number of tokens with a strictly higher raw logprob.
    ranks: list[int | None]


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """The per-request generator the engine creates for a request with a seed."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _draw_noise(out: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Fill a 1-D float32 tensor of size V with Exponential(1) noise from `generator`."""
    return out.exponential_(generator=generator).clamp_(min=_TINY)


def _effective_top_k(params: SamplingParams, vocab_size: int) -> int:
    return params.top_k if 0 < params.top_k < vocab_size else 0


class Sampler:
    """Vectorised sampler. `generator` serves the rows without a per-request generator
    (None = torch's default generator of the logits' device)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> SamplerOutput:
        if logits.dim() != 2:
            raise ValueError(f"logits: expected shape [S, V], got {tuple(logits.shape)}")
        num_rows, vocab_size = logits.shape
        if len(params) != num_rows:
            raise ValueError(f"params: got {len(params)} for {num_rows} rows of logits")
        if generators is None:
            generators = [None] * num_rows
        elif len(generators) != num_rows:
            raise ValueError(f"generators: got {len(generators)} for {num_rows} rows of logits")
        logits = logits.float()
        device = logits.device

        greedy = [i for i, p in enumerate(params) if p.is_greedy]
        if len(greedy) == num_rows:  # the common all-greedy batch: one kernel, no indexing
            tokens = logits.argmax(dim=-1)
        else:
            tokens = torch.empty(num_rows, dtype=torch.long, device=device)
            if greedy:
                index = torch.tensor(greedy, device=device)
                tokens[index] = logits[index].argmax(dim=-1)
            self._sample_random_rows(logits, params, generators, tokens)

        token_ids = tokens.tolist()
        logprobs, ranks = _gather_logprobs(logits, params, tokens, token_ids)
        return SamplerOutput(token_ids, logprobs, ranks)

    def _sample_random_rows(self, logits, params, generators, tokens) -> None:
        vocab_size = logits.shape[1]
        rows = [i for i, p in enumerate(params) if not p.is_greedy]
        # Noise first, one row at a time in batch order: that fixes how each generator is
        # consumed independently of how rows are grouped below.
        noise = torch.empty(len(rows), vocab_size, dtype=torch.float32, device=logits.device)
        for j, i in enumerate(rows):
            gen = generators[i]
            _draw_noise(noise[j], self.generator if gen is None else gen)
        groups: dict[tuple, list[int]] = {}
        for j, i in enumerate(rows):
            p = params[i]
            key = (p.temperature, _effective_top_k(p, vocab_size), p.top_p, p.min_p)
            groups.setdefault(key, []).append(j)
        for (temperature, top_k, top_p, min_p), members in groups.items():
            local = torch.tensor(members, device=logits.device)
            index = torch.tensor([rows[j] for j in members], device=logits.device)
            probs = _filtered_probs(logits[index], temperature, top_k, top_p, min_p)
            tokens[index] = (probs / noise[local]).argmax(dim=-1)


def _filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                    min_p: float) -> torch.Tensor:
    """Probabilities [G, V] after temperature and filters; dropped tokens are exactly 0."""
    x = logits / temperature
    if top_k:
        kth = x.topk(top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if top_p < 1.0:
        ordered = probs.sort(dim=-1, descending=True).values
        # float64 so the boundary does not hinge on float32 rounding of a long running sum.
        cumulative = ordered.double().cumsum(dim=-1)
        # Position i is kept while the sum of the positions before it is still < top_p.
        keep = 1 + (cumulative[:, :-1] < top_p).sum(dim=-1, keepdim=True)
        threshold = ordered.gather(1, keep - 1)
        probs = probs.masked_fill(probs < threshold, 0.0)
    if min_p > 0.0:
        # In float64, like the reference: min_p * max must not round up past a kept prob.
        cutoff = min_p * probs.max(dim=-1, keepdim=True).values.double()
        probs = probs.masked_fill(probs.double() < cutoff, 0.0)
    return probs


def _gather_logprobs(logits, params, tokens, token_ids):
    num_rows = len(params)
    logprobs: list[dict[int, float] | None] = [None] * num_rows
    ranks: list[int | None] = [None] * num_rows
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not wanted:
        return logprobs, ranks
    index = torch.tensor(wanted, device=logits.device)
    raw = torch.log_softmax(logits[index], dim=-1)
    sampled = raw.gather(1, tokens[index].unsqueeze(1))
    rank_list = ((raw > sampled).sum(dim=-1) + 1).tolist()
    sampled_list = sampled.squeeze(1).tolist()
    k_max = min(max(params[i].logprobs for i in wanted), raw.shape[1])
    top_values, top_ids = raw.topk(k_max, dim=-1) if k_max else (None, None)
    # One device->host copy per tensor, not one per row.
    top_values = top_values.tolist() if k_max else [[]] * len(wanted)
    top_ids = top_ids.tolist() if k_max else [[]] * len(wanted)
    for j, i in enumerate(wanted):
        k = params[i].logprobs
        entry = dict(zip(top_ids[j][:k], top_values[j][:k]))
        entry.setdefault(token_ids[i], sampled_list[j])
        logprobs[i] = entry
        ranks[i] = rank_list[j]
    return logprobs, ranks


def reference_sample(logits_row: torch.Tensor, params: SamplingParams,
                     generator: torch.Generator | None) -> int:
    """Slow, one-row, obviously correct sampler with the same semantics and the same
    generator consumption as `Sampler` (pass the shared generator for unseeded rows)."""
    logits = logits_row.float()
    if params.is_greedy:
        return int(torch.argmax(logits))
    x = logits / params.temperature
    top_k = _effective_top_k(params, x.numel())
    if top_k:
        kth = torch.sort(x, descending=True).values[top_k - 1]
        x = torch.where(x < kth, torch.full_like(x, float("-inf")), x)
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        # Walk the probs from the largest down, taking each while the total so far < top_p.
        total, threshold = 0.0, None
        for p in sorted(probs.tolist(), reverse=True):
            if threshold is not None and total >= params.top_p:
                break
            threshold = p
            total += p
        probs = torch.where(probs < threshold, torch.zeros_like(probs), probs)
    if params.min_p > 0.0:
        largest = max(probs.tolist())
        kept = [p if p >= params.min_p * largest else 0.0 for p in probs.tolist()]
        probs = torch.tensor(kept, dtype=torch.float32, device=probs.device)
    noise = _draw_noise(torch.empty_like(probs), generator)
    return int(torch.argmax(probs / noise))
