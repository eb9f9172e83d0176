"""Requests parked at a tool call, between the turn that called the tool and the next one.

A parked request is the finished turn itself (its tokens, hashes and, when kept, its blocks
under its own request id in the KV cache). The policy (policy.py) decides per request:
- keep: its blocks stay held (pinned: the pool never evicts a held block), including the
  partial last block and SSM live state, so the next turn prefills only what it appends;
- offload: its blocks are released (findable by prefix until the pool reuses them) while
  the connector's tiers hold their copies (blocks are saved as they fill); shortly before
  the expected resume they are prefetched back onto the device if they left it;
- discard: released like any finished request (ordinary prefix caching), no prefetch.
  (Releasing offloaded blocks to the head of the free queue instead measured slower in
  benchmarks/agentic.py: their reloads cost more than the memory they freed first.)
Decisions are revisited as time passes (without a tier, a keep that outstays its expected
pause is demoted; with one, it is first in line when memory runs short, see policy.py),
pinned memory is bounded by `max_parked_fraction` of the pool, and every entry
ends by its TTL: a kept one is demoted then, never dropped while a tier has room.
"""
from __future__ import annotations

import dataclasses
import heapq
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from kvtier.engine.kv_cache.coordinator import KVCacheCoordinator
from kvtier.engine.parking.params import ParkParams
from kvtier.engine.parking.pause_stats import PauseStats
from kvtier.engine.parking.policy import CostInputs, choose
from kvtier.engine.request import Request

REVIEW_S = 0.05  # how often kept requests are reconsidered
PREFETCH_LEAD_S = 0.05  # an offloaded request is loaded back this long before its expected resume
# Loads shorter than this are not worth a prefetch: they join the step that needs them
# (a host-memory tier moves a long context in a few ms); slower tiers are prefetched.
PREFETCH_MIN_S = 0.02
_FORGOTTEN = 4096  # ids of expired / released entries remembered for clear errors
DEFAULT_PREFILL_TOKENS_PER_S = 1000.0  # before the engine has measured its own


@dataclass
class ParkedEntry:
    parked_id: str
    request: Request  # the parked turn: prompt + output tokens, hashes, salt
    params: ParkParams
    parked_at: float
    deadline: float
    priority: float  # arrival of the conversation's first turn: resumed turns keep it
    policy: str
    tokens: list[int] = field(default_factory=list)
    resume_at: float = 0.0  # expected resume (clock time), for the prefetch of an offloaded one
    prefetched: bool = False
    nbytes: int = 0  # device KV bytes of its blocks when it parked
    transfer_s: float | None = None  # estimated load time from the first tier (None: no tier)

    @property
    def pinned(self) -> bool:
        return self.policy == "keep"


class ParkingLot:
    def __init__(self, kv: KVCacheCoordinator, policy: str, max_parked_fraction: float,
                 tier_bandwidth: Callable[[], float | None], prefill_tokens_per_s: Callable[[], float | None],
                 clock: Callable[[], float] = time.monotonic,
                 prefetch: Callable[["ParkedEntry"], None] | None = None):
        """prefetch: loads an offloaded request's KV back onto the device before its expected
        resume (the engine queues a load-only request); None: no prefetching."""
        self.kv = kv
        self.policy = policy
        self.max_parked_fraction = max_parked_fraction
        self.tier_bandwidth = tier_bandwidth
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.clock = clock
        self.prefetch = prefetch
        self.pauses = PauseStats()
        self.entries: dict[str, ParkedEntry] = {}
        self._by_tail: dict[bytes | None, set[str]] = {}  # hash of the last full block -> ids
        self._deadlines: list[tuple[float, str]] = []
        self._forgotten: OrderedDict[str, str] = OrderedDict()  # id -> why it is gone
        self._next_review = 0.0
        self.counts = {"parked": 0, "keep": 0, "offload": 0, "discard": 0, "demoted": 0, "ttl_expiries": 0,
                       "released": 0}
        self.resumes = {"device": 0, "tier": 0, "recomputed": 0}

    # ---- parking --------------------------------------------------------------------
    def park(self, req: Request) -> str:
        now = self.clock()
        params: ParkParams = req.sampling_params.park
        pid = uuid.uuid4().hex
        # The parked blocks move to an id of their own: the caller may reuse the request id.
        parked = dataclasses.replace(req, request_id=f"parked:{pid}")
        self.kv.transfer(req, parked)
        entry = ParkedEntry(pid, parked, params, now, now + params.ttl_s, req.priority, "keep",
                            req.prompt_token_ids + req.output_token_ids)
        entry.resume_at = now + self.pauses.expected_remaining(params.tool, params.expected_pause_s, 0.0)
        entry.nbytes = int(self.kv.held_share(parked.request_id) * self._pool_bytes())
        bandwidth = self.tier_bandwidth()
        entry.transfer_s = entry.nbytes / bandwidth if bandwidth else None
        entry.policy = self._decide(entry, now) if self.policy == "auto" else self.policy
        req = parked
        self.counts["parked"] += 1
        self.counts[entry.policy] += 1
        if not entry.pinned:
            self.kv.free(req)
        self.entries[entry.parked_id] = entry
        self._by_tail.setdefault(_tail(req), set()).add(entry.parked_id)
        heapq.heappush(self._deadlines, (entry.deadline, entry.parked_id))
        self._enforce_bound()
        return entry.parked_id

    def _decide(self, entry: ParkedEntry, now: float, pinned_share: float | None = None) -> str:
        """pinned_share: what pinned entries hold, when the caller has it already."""
        req = entry.request
        share = self.kv.held_share(req.request_id)
        pause = self.pauses.expected_remaining(entry.params.tool, entry.params.expected_pause_s, now - entry.parked_at)
        bandwidth = self.tier_bandwidth()
        transfer = None if not bandwidth else share * self._pool_bytes() / bandwidth
        speed = self.prefill_tokens_per_s() or DEFAULT_PREFILL_TOKENS_PER_S
        # What the other, running requests use: neither this request nor other pinned ones.
        own = 0.0 if entry.parked_id in self.entries else share
        pinned = self.pinned_share() if pinned_share is None else pinned_share
        pressure = max(0.0, self.kv.used_share() - pinned - own)
        return choose(CostInputs(share, pressure, pause, transfer, len(entry.tokens) / speed))

    # ---- leaving the lot ------------------------------------------------------------
    def take(self, parked_id: str) -> ParkedEntry:
        """Remove an entry to resume it; KeyError naming why when it cannot be."""
        entry = self.entries.get(parked_id)
        if entry is None:
            why = self._forgotten.get(parked_id, "unknown")
            raise KeyError(f"parked_id {parked_id!r}: {why}; nothing to resume")
        self._remove(entry, "resumed (already resuming or resumed)")
        self.pauses.observe(entry.params.tool, self.clock() - entry.parked_at)
        return entry

    def release(self, parked_id: str) -> None:
        entry = self.entries.get(parked_id)
        if entry is None:
            raise KeyError(f"parked_id {parked_id!r}: {self._forgotten.get(parked_id, 'unknown')}")
        self._remove(entry, "released")
        if entry.pinned:
            self.kv.free(entry.request)
        self.counts["released"] += 1

    def match(self, req: Request) -> ParkedEntry | None:
        """The parked sequence the new request's tokens extend (longest first), if any."""
        if not self.entries:
            return None
        tokens = None
        for k in range(len(req.block_hashes), -1, -1):
            ids = self._by_tail.get(req.block_hashes[k - 1] if k else None)
            for pid in sorted(ids or (), key=lambda i: -len(self.entries[i].tokens)):
                entry = self.entries[pid]
                n = len(entry.tokens)
                if n >= req.num_tokens or entry.request.hash_root != req.hash_root:
                    continue
                tokens = tokens if tokens is not None else req.prompt_token_ids
                if tokens[:n] == entry.tokens:
                    return entry
        return None

    def _remove(self, entry: ParkedEntry, why: str) -> None:
        del self.entries[entry.parked_id]
        tail = _tail(entry.request)
        self._by_tail[tail].discard(entry.parked_id)
        if not self._by_tail[tail]:
            del self._by_tail[tail]
        self._forgotten[entry.parked_id] = why
        while len(self._forgotten) > _FORGOTTEN:
            self._forgotten.popitem(last=False)

    # ---- time and memory ------------------------------------------------------------
    def tick(self) -> None:
        """Expire TTLs, revisit kept requests. Cheap when nothing is parked."""
        if not self.entries:
            self._deadlines.clear()
            return
        now = self.clock()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, pid = heapq.heappop(self._deadlines)
            entry = self.entries.get(pid)
            if entry is not None:
                self._remove(entry, "expired (its ttl_s passed)")
                self.counts["ttl_expiries"] += 1
                if entry.pinned:  # demoted: its blocks stay reusable, first out of the pool
                    self.kv.free(entry.request, first_out=True)
        if now < self._next_review:
            return
        self._next_review = now + REVIEW_S
        self._review_kept(now)
        for entry in self.entries.values():
            if (entry.policy == "offload" and not entry.prefetched and self.prefetch is not None
                    and (entry.transfer_s or 0) >= PREFETCH_MIN_S
                    and now >= entry.resume_at - PREFETCH_LEAD_S - entry.transfer_s):
                entry.prefetched = True
                self.prefetch(entry)

    def _review_kept(self, now: float) -> None:
        """auto without a tier: demote the kept requests that now cost more to keep than to
        discard (their pause outlasted its expectation, or the pool filled up). With a tier
        keeping never costs more (policy.py): memory pressure alone demotes them."""
        if self.policy != "auto" or self.tier_bandwidth() is not None:
            return
        kept = [e for e in self.entries.values() if e.pinned]
        pinned = self.pinned_share()
        for entry in kept:
            choice = self._decide(entry, now, pinned)
            if choice != "keep":
                pinned -= self.kv.held_share(entry.request.request_id)
                self.demote(entry, choice)

    def demote(self, entry: ParkedEntry, policy: str = "offload", first_out: bool = False) -> None:
        if entry.pinned:
            self.kv.free(entry.request, first_out=first_out)
            entry.policy = policy
            self.counts["demoted"] += 1

    def demote_one(self) -> bool:
        """Memory is short: demote the kept request that costs most to keep; False if none.
        Its blocks are the first the pool reuses: they were chosen to go, not the blocks
        of requests demoted earlier, which may be nearer their resume by now."""
        kept = [e for e in self.entries.values() if e.pinned]
        if not kept:
            return False
        now = self.clock()
        worst = max(kept, key=lambda e: self.kv.held_share(e.request.request_id) * self.pauses.expected_remaining(
            e.params.tool, e.params.expected_pause_s, now - e.parked_at))
        self.demote(worst, first_out=True)
        return True

    def _pool_bytes(self) -> int:
        return sum(m.pool.num_blocks * m.info.layout.nbytes for m in self.kv.managers)

    def pinned_share(self) -> float:
        return sum(self.kv.held_share(e.request.request_id) for e in self.entries.values() if e.pinned)

    def _enforce_bound(self) -> None:
        while self.pinned_share() > self.max_parked_fraction and self.demote_one():
            pass

    def record_resume(self, source: str) -> None:
        self.resumes[source] += 1

    def stats(self) -> dict:
        pinned = [e for e in self.entries.values() if e.pinned]
        offloaded = [e for e in self.entries.values() if e.policy == "offload"]
        return {"parked": len(self.entries), "pinned": len(pinned), "pinned_share": round(self.pinned_share(), 4),
                "pinned_bytes": int(self.pinned_share() * self._pool_bytes()),
                "offloaded": len(offloaded), "offloaded_bytes": sum(e.nbytes for e in offloaded),
                "decisions": {k: self.counts[k] for k in ("keep", "offload", "discard")},
                "demoted": self.counts["demoted"], "ttl_expiries": self.counts["ttl_expiries"],
                "released": self.counts["released"], "resumes": dict(self.resumes), "tools": self.pauses.summary()}


def _tail(req: Request) -> bytes | None:
    """Index key of a parked request: the hash of its last full block (None: shorter than one)."""
    return req.block_hashes[-1] if req.block_hashes else None
