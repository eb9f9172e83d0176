"""Turns a SchedulerOutput into one flat forward pass and sampled tokens.

The runner sees block ids and token positions only; it never talks to the allocator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.engine.attention.backends import get_backend
from kvtier.engine.attention.metadata import StepMetadata
from kvtier.engine.attention.ssm_metadata import SsmSeq, build_ssm_metadata
from kvtier.engine.kv_cache.specs import KVGroup
from kvtier.engine.sampler import Sampler
from kvtier.engine.scheduler import SchedulerOutput


@dataclass
class StepResult:
    sampled: dict[str, int]  # request id -> next token (only sequences that reached their end)
    logprobs: dict[str, dict]  # request id -> {token_id: (logprob, rank)} when asked


class ModelRunner:
    def __init__(self, model: torch.nn.Module, block_size: int, device: torch.device, seed: int,
                 groups: list[KVGroup], attention_backend: str = "sdpa"):
        self.model = model
        # The layers' backend (bound by build_kv_cache) decides what metadata a step needs.
        self.attention = get_backend(attention_backend)
        self.groups = groups
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler()
        # Rows without their own seed draw from this engine-wide generator.
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        token_ids: list[int] = []
        positions: list[int] = []
        views = []
        sample_rows: list[int] = []
        sample_seqs = []
        for seq in out.seqs:
            start, end = seq.num_computed, seq.num_computed + seq.num_new
            token_ids.extend(seq.request.token_ids_slice(start, end))
            positions.extend(range(start, end))
            views.append(seq.block_ids)
            if seq.samples:
                sample_rows.append(len(token_ids) - 1)
                sample_seqs.append(seq)
        meta = self.build_metadata(out, views)
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, pos, meta)
        if not sample_rows:
            return StepResult({}, {})
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        logits = self.model.compute_logits(hidden[rows])
        params = [s.request.sampling_params for s in sample_seqs]
        generators = [s.request.generator or self.generator for s in sample_seqs]
        result = self.sampler(logits, params, generators)
        sampled = {}
        logprobs = {}
        for i, seq in enumerate(sample_seqs):
            rid = seq.request.request_id
            sampled[rid] = result.token_ids[i]
            row = result.logprobs[i]
            if row is not None:
                # Top-k entries come in descending order; the sampled token carries its own rank.
                ranked = {tid: (lp, pos + 1) for pos, (tid, lp) in enumerate(row.items())}
                token = result.token_ids[i]
                ranked[token] = (row[token], result.ranks[i])
                logprobs[rid] = ranked
        return StepResult(sampled, logprobs)

    def build_metadata(self, out: SchedulerOutput, views: list[tuple]) -> StepMetadata:
        """One metadata object per KV group, from each sequence's per-group view."""
        groups = []
        for g in self.groups:
            if g.kind == "ssm":
                seqs, q_start = [], 0
                for seq, view in zip(out.seqs, views):
                    init, live, checkpoints = view[g.index]
                    seqs.append(SsmSeq(q_start, seq.num_new, init, live, checkpoints, seq.request.deterministic))
                    q_start += seq.num_new
                groups.append(build_ssm_metadata(seqs, self.device))
            else:
                specs = [(seq.num_computed, seq.num_new, view[g.index]) for seq, view in zip(out.seqs, views)]
                window = g.spec.window if g.kind == "sliding" else None
                invariant = [seq.request.deterministic for seq in out.seqs]
                groups.append(self.attention.build_metadata(specs, self.block_size, self.device, window=window,
                                                            invariant=invariant))
        return StepMetadata(groups)
