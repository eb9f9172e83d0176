"""Per-step metadata of an SSM (Mamba2) group: which state slot each sequence reads and writes.

A state slot (one row of the group's pool, `[num_slots, layers_in_group, MambaSpec.numel]`)
holds every layer's conv and SSM state of one sequence at one position. Each step a
sequence starts from `init_slot` (its own live slot when it is continuing, a prefix
checkpoint on a cache hit, or zeros for a fresh sequence), runs its `q_len` new tokens, and
leaves the state in `live_slot`. `checkpoints` asks for copies of the state part-way:
(n, slot) = the state after the first n tokens of this chunk goes into `slot` as well.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

NO_SLOT = -1  # init_slot for a sequence that starts from the zero state


@dataclass
class SsmSeq:
    q_start: int  # first row of this sequence in the flat batch
    q_len: int
    init_slot: int  # NO_SLOT: zero state
    live_slot: int
    checkpoints: list[tuple[int, int]] = field(default_factory=list)  # (tokens into the chunk, slot), ascending
    invariant: bool = False  # deterministic request: its prefill runs the decode recurrence token by token


@dataclass
class SsmMetadata:
    seqs: list[SsmSeq]  # batch order
    prefill_seqs: list[SsmSeq]  # seqs not in the decode batch
    # Single-token sequences, run as one batched recurrent update.
    decode_rows: torch.Tensor  # [B] rows of the flat batch
    decode_init_slots: torch.Tensor  # [B] (never NO_SLOT: a one-token chunk of a fresh sequence is a prefill)
    decode_live_slots: torch.Tensor  # [B]
    decode_checkpoints: list[tuple[int, int]]  # (live slot, checkpoint slot): copy after the update


def build_ssm_metadata(seqs: list[SsmSeq], device: torch.device) -> SsmMetadata:
    decodes = [s for s in seqs if s.q_len == 1 and s.init_slot != NO_SLOT]
    prefill = [s for s in seqs if not (s.q_len == 1 and s.init_slot != NO_SLOT)]

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return SsmMetadata(
        seqs=seqs,
        prefill_seqs=prefill,
        decode_rows=tensor([s.q_start for s in decodes]),
        decode_init_slots=tensor([s.init_slot for s in decodes]),
        decode_live_slots=tensor([s.live_slot for s in decodes]),
        decode_checkpoints=[(s.live_slot, slot) for s in decodes for _, slot in s.checkpoints],
    )
