"""What one scheduler step hands the model runner: which tokens of which requests to compute."""
from __future__ import annotations

from dataclasses import dataclass, field

from kvtier.engine.request import Request


@dataclass
class ScheduledSeq:
    request: Request
    num_computed: int  # tokens with KV before this step
    num_new: int  # tokens computed this step
    # Per KV group: the block table of an attention group, (init slot, live slot,
    # checkpoints) of an SSM group (KVCacheCoordinator.step_view).
    block_ids: tuple

    @property
    def samples(self) -> bool:
        """The step reaches the end of the known tokens, so it yields the next token."""
        return self.num_computed + self.num_new == self.request.num_tokens


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.seqs)
