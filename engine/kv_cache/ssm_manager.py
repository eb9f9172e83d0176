"""Manager of an SSM (Mamba2) group: live state slots and prefix checkpoints.

The group's pool holds state slots. A running request owns one live slot, updated in place
by every step. A checkpoint is a slot holding the state at a block-aligned position P,
published like a block under the chained hash of the prefix [0, P) (block_hashes[P/bs - 1],
with the last block's tokens kept to verify hits). Idle checkpoints sit in the pool's LRU
free queue and are evicted like cached blocks.

Checkpoints are written while a request computes past these positions:
- the last block boundary of its prompt (the next turn of a conversation resumes there);
- every `interval` tokens (prompt and output);
- its branch point: the longest block-aligned prefix it shares with an earlier prompt,
  when that lies beyond its resume point, so a third request sharing that prefix resumes
  from it (the first two only shared it, neither had a checkpoint there);
- every block boundary, for a request that will park at a tool call.
A checkpoint written this step is not a resume point until the step has run (`end_step`).
"""
from __future__ import annotations

from collections import OrderedDict

from kvtier.engine.attention.ssm_metadata import NO_SLOT
from kvtier.engine.kv_cache.block_pool import KVBlock
from kvtier.engine.kv_cache.group_manager import GroupHits, GroupManager, StepPlan
from kvtier.engine.request import Request

_SEEN_PREFIXES = 65536  # prompt block hashes remembered to find branch points


class _CheckpointHits(GroupHits):
    def __init__(self, found: dict[int, KVBlock]):
        self._found = found
        self.upper = max(found, default=0)

    def can_resume(self, n: int) -> bool:
        return n == 0 or n in self._found

    def blocks(self, n: int) -> list[KVBlock | None]:
        return [self._found[n]] if n else []


class _SsmState:
    """One request's slots."""

    __slots__ = ("live", "init", "init_pos", "fallback", "step", "positions")

    def __init__(self, positions: set[int]):
        self.live: KVBlock | None = None
        self.init: KVBlock | None = None  # checkpoint the next step starts from (hit or load)
        self.init_pos = 0
        self.fallback: KVBlock | None = None  # device checkpoint kept while a load is in flight
        self.step: list[tuple[int, KVBlock]] = []  # checkpoints written by the current step
        self.positions = positions  # prompt positions to checkpoint

    def held(self) -> list[KVBlock]:
        out = [b for b in (self.live, self.init, self.fallback) if b is not None]
        return out + [b for _, b in self.step]


class SsmStateManager(GroupManager):
    def __init__(self, *args, interval: int, branch_points: bool = True, **kwargs):
        """interval: tokens between checkpoints (0: none but prompt ends and branch points)."""
        super().__init__(*args, **kwargs)
        self.interval = interval
        self.branch_points = branch_points
        self.states: dict[str, _SsmState] = {}
        self._fresh: set[bytes] = set()
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def find_hits(self, request: Request, max_blocks: int) -> GroupHits:
        bs = self.block_size
        found: dict[int, KVBlock] = {}
        for n in range(1, min(max_blocks, len(request.block_hashes)) + 1):
            h = request.block_hashes[n - 1]
            if h in self.pool.cached and h not in self._fresh:
                block = self.pool.get_cached_block(h, request.token_ids_slice((n - 1) * bs, n * bs))
                if block is not None:
                    found[n] = block
        return _CheckpointHits(found)

    def release_unneeded(self, request: Request) -> None:
        """Drop last step's checkpoints (now published) and a start checkpoint already used."""
        st = self.states.get(request.request_id)
        if st is None:
            return
        done = [b for _, b in st.step]
        st.step = []
        if st.init is not None and request.num_computed_tokens > st.init_pos:
            done.append(st.init)
            st.init = None
        if st.fallback is not None and st.init is None:
            done.append(st.fallback)
            st.fallback = None
        self.pool.free(done)

    def needs(self, request: Request, hits: list[KVBlock | None], plan: StepPlan) -> tuple[int, int]:
        """(a live slot if the request has none, plus one for a checkpoint to load; idle hits)."""
        st = self.states.get(request.request_id)
        new = int(st is None or st.live is None) + int(plan.loading)
        idle = sum(1 for b in hits if b is not None and b.ref_cnt == 0)
        return new, idle

    def apply(self, request: Request, hits: list[KVBlock | None], plan: StepPlan, new: int) -> None:
        """Take the hit checkpoint, a live slot, a slot for a checkpoint to load, and
        checkpoint slots for the positions this step computes past."""
        rid = request.request_id
        st = self.states.get(rid)
        if st is None:
            st = self.states[rid] = _SsmState(self._admission_positions(request, plan.device_tokens))
        hit = next((b for b in hits if b is not None), None)
        if hit is not None:
            self.pool.touch([hit])
            st.init, st.init_pos = hit, plan.device_tokens
        if st.live is None:
            st.live = self.pool.allocate(1)[0]
        if plan.loading:
            st.fallback = st.init
            st.init = self.pool.allocate(1)[0]
            st.init_pos = plan.start
        if plan.num_new:
            self._plan_checkpoints(request, st, plan.start, plan.total)

    def _admission_positions(self, request: Request, resume: int) -> set[int]:
        bs = self.block_size
        n_prompt = request.num_prompt_tokens // bs
        positions = {n_prompt * bs}
        if not self.branch_points:
            return {p for p in positions if p > resume}
        branch = 0
        for h in request.block_hashes[:n_prompt]:
            if h not in self._seen:
                break
            self._seen.move_to_end(h)
            branch += 1
        positions.add(branch * bs)
        for h in request.block_hashes[:n_prompt]:
            self._seen[h] = None
        while len(self._seen) > _SEEN_PREFIXES:
            self._seen.popitem(last=False)
        return {p for p in positions if p > resume}

    def _plan_checkpoints(self, request: Request, st: _SsmState, start: int, end: int) -> None:
        if not self.enable_caching:
            return
        bs = self.block_size
        first = start // bs + 1
        for n in range(first, min(end // bs, len(request.block_hashes)) + 1):
            pos = n * bs
            # A request that will park checkpoints every block: resumed after its KV left the
            # device, it restarts from its last full block, not from its prompt's end.
            parks = request.sampling_params.park is not None
            if not parks and pos not in st.positions and not (self.interval and pos % self.interval == 0):
                continue
            h = request.block_hashes[n - 1]
            if h in self.pool.cached or self.pool.num_free_blocks <= 1:
                continue  # already checkpointed, or no room (keep a slot for an admission): optional
            block = self.pool.allocate(1)[0]
            self.pool.cache_block(block, h, request.token_ids_slice(pos - bs, pos))
            self._fresh.add(h)
            if self.track_transfers:
                self.newly_full.append((block.block_id, h))
            st.step.append((pos, block))

    def step_view(self, request: Request, num_computed: int) -> tuple[int, int, list[tuple[int, int]]]:
        """(init slot, live slot, [(tokens into the chunk, checkpoint slot)]) for this step."""
        st = self.states[request.request_id]
        if st.init is not None:
            init = st.init.block_id
        else:
            init = st.live.block_id if num_computed > 0 else NO_SLOT
        return init, st.live.block_id, [(pos - num_computed, b.block_id) for pos, b in st.step]

    def load_block_ids(self, request: Request, device_tokens: int, resume_tokens: int) -> list[int]:
        st = self.states[request.request_id]
        return [st.init.block_id] if resume_tokens > device_tokens else []

    def publish_loaded(self, request: Request, num_tokens: int) -> None:
        """A load ended: on success its checkpoint becomes a device checkpoint; on failure
        (num_tokens back at the device resume point) the request starts from the fallback."""
        st = self.states[request.request_id]
        if num_tokens == st.init_pos and st.init is not None:
            n = num_tokens // self.block_size
            self.pool.cache_block(st.init, request.block_hashes[n - 1],
                                  request.token_ids_slice(num_tokens - self.block_size, num_tokens))
            if st.fallback is not None:
                self.pool.free([st.fallback])
                st.fallback = None
            return
        if st.init is not None:
            self.pool.free([st.init])
        st.init, st.fallback = st.fallback, None
        st.init_pos = num_tokens

    def block_ids(self, request_id: str) -> list[int]:
        st = self.states.get(request_id)
        return [] if st is None or st.live is None else [st.live.block_id]

    def end_step(self) -> None:
        self._fresh.clear()

    def free(self, request: Request, first_out: bool = False) -> None:
        st = self.states.pop(request.request_id, None)
        if st is not None:
            self.pool.free(st.held(), first_out)

    def transfer(self, old: Request, new: Request) -> None:
        """A resumed request takes over a parked one's state (its live slot holds the state
        after every token computed so far), with checkpoint positions for its new prompt."""
        st = self.states.pop(old.request_id, None)
        if st is not None:
            st.positions = self._admission_positions(new, new.num_computed_tokens)
            self.states[new.request_id] = st

    def held_blocks(self, request_id: str) -> int:
        st = self.states.get(request_id)
        return 0 if st is None else len(st.held())
