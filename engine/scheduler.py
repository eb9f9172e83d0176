"""Continuous batching under a token budget, chunked prefill, preemption by recompute.

Each step: running requests first (decodes and unfinished prompt chunks, FCFS order), then
waiting requests by arrival while budget, sequence slots and KV blocks last. KV memory is
asked of one coordinator that answers for every KV group (engine/kv_cache/coordinator.py):
a step fits only if every group has room. When a pool runs dry the latest-arrived running
request is preempted: its blocks are freed (they keep their hashes, so re-admission usually
hits the prefix cache, or the connector's tiers) and it waits again at the front.

With a connector, a waiting request whose prefix continues in a tier beyond the device hit
gets blocks for it and parks in WAITING_FOR_KV while the worker side loads them; it runs
from the first block that did not load intact (a hybrid model: from its device resume
point unless the whole load succeeded). A request whose tier lookup is still in
flight (a remote store), or whose next block another request is loading (engine/kv_loads.py:
loaded once, then shared), is passed over until that resolves; the rest go on.
"""
from __future__ import annotations

import time
from collections import deque

from kvtier.connectors.base import ConnectorOutput, KVConnector
from kvtier.engine.kv_cache.coordinator import KVCacheCoordinator
from kvtier.engine.kv_loads import KVLoads
from kvtier.engine.request import Request, RequestStatus
from kvtier.engine.scheduler_output import ScheduledSeq, SchedulerOutput
from kvtier.engine.stop_checks import stop_status

__all__ = ["Scheduler", "ScheduledSeq", "SchedulerOutput"]


class Scheduler:
    def __init__(
        self,
        kv: KVCacheCoordinator,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        connector: KVConnector | None = None,
        parking=None,
    ):
        """connector: its scheduler half (the engine passes a ConnectorGuard); parking: the
        ParkingLot for requests that park at a tool call (engine/parking/)."""
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.connector = connector
        self.parking = parking
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.loads = KVLoads(kv, connector)  # WAITING_FOR_KV requests
        self.held: dict[str, Request] = {}  # finished, blocks kept until the connector saved them
        self.num_preemptions = 0
        self.num_preempted_tokens = 0  # computed tokens thrown away by preemption
        self.num_load_failures = 0  # blocks that failed to load and were recomputed

    def add(self, request: Request) -> str | None:
        """Queue a request, or return why it can never run (the caller fails it)."""
        error = self._check(request)
        if error is not None:
            return error
        self.kv.update_block_hashes(request)
        self._enqueue(request)
        return None

    def _check(self, request: Request) -> str | None:
        n = request.num_prompt_tokens
        if n > self.max_model_len:
            return f"prompt has {n} tokens, more than max_model_len={self.max_model_len}"
        return self.kv.admission_error(n)

    def resume(self, entry, request: Request) -> str | None:
        """Queue the next turn of a parked request (a ParkedEntry taken from the lot) at its
        conversation's place in the queue; it takes over the parked blocks if they were kept."""
        request.priority = entry.priority
        request.resumed_tokens = len(entry.tokens)
        error = self._check(request)
        if error is not None:
            if entry.pinned:
                self.kv.free(entry.request)
            return error
        self.kv.update_block_hashes(request)
        if entry.pinned:
            self.kv.transfer(entry.request, request)
            request.num_computed_tokens = entry.request.num_computed_tokens
            request.holds_kv = True
        self._enqueue(request)
        return None

    def _enqueue(self, request: Request) -> None:
        """Waiting requests stay in priority (arrival) order; new ones usually go last."""
        i = len(self.waiting)
        while i > 0 and self.waiting[i - 1].priority > request.priority:
            i -= 1
        self.waiting.insert(i, request)

    def _make_room(self) -> bool:
        """Memory is short: demote a parked request before anyone is preempted or refused."""
        return self.parking is not None and self.parking.demote_one()

    @property
    def loading(self) -> dict[str, tuple[Request, int, int]]:
        return self.loads.loading

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req, num_new):
                if self._make_room():
                    continue
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted itself; the loop bound shrank with `running`
            self._schedule(req, num_new, out)
            budget -= num_new
            i += 1
        if not out.preempted:
            self._admit_waiting(out, budget)
        self.loads.notify_connector()
        return out

    def _schedule(self, req: Request, num_new: int, out: SchedulerOutput) -> None:
        out.seqs.append(ScheduledSeq(req, req.num_computed_tokens, num_new,
                                     self.kv.step_view(req, req.num_computed_tokens)))

    def _start_running(self, req: Request, num_new: int, out: SchedulerOutput) -> None:
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        self._schedule(req, num_new, out)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        # FCFS: stop at the first waiting request that does not fit; never admit in a step that preempted.
        # One exception: a request whose tier lookup is still due (lookup -> None) keeps its
        # place but is passed over this step, so a slow store holds up only that request;
        # the connector answers it within its lookup budget. At most max_num_seqs are passed over.
        skipped = 0
        while (skipped < min(len(self.waiting), self.max_num_seqs) and budget > 0
               and self._num_active() < self.max_num_seqs):
            req = self.waiting[skipped]
            if req.holds_kv:  # a resumed turn on its parked blocks: only the new tokens run
                num_new = min(req.num_tokens - req.num_computed_tokens, budget)
                if not self.kv.allocate_slots(req, num_new):
                    if self._make_room():
                        continue
                    break
                del self.waiting[skipped]
                req.holds_kv = False
                self._record_admission(req, req.num_computed_tokens, {})
                self._start_running(req, num_new, out)
                budget -= num_new
                continue
            hit = self.kv.get_computed_blocks(req)
            num_hit_tokens = hit.num_tokens
            if self.loads and self.loads.waits_for_shared(req, num_hit_tokens):
                skipped += 1  # its next block is being loaded for another request: wait for it
                continue
            num_external = self.connector.lookup(req, num_hit_tokens) \
                if self.connector and not req.load_timed_out else 0
            if num_external is None:
                skipped += 1
                continue
            if req.prefetch_only and not num_external:  # nothing in the tiers beyond the device
                del self.waiting[skipped]
                continue
            if num_external:
                if not self.kv.allocate_slots(req, 0, hit, num_external_tokens=num_external):
                    if self._make_room():
                        continue
                    break
                del self.waiting[skipped]
                self.loads.start(req, num_hit_tokens, num_external)
                continue
            num_new = min(req.num_tokens - num_hit_tokens, budget)
            if not self.kv.allocate_slots(req, num_new, hit):
                if self._make_room():
                    continue
                break
            del self.waiting[skipped]
            self._record_admission(req, num_hit_tokens, {})
            req.num_computed_tokens = num_hit_tokens
            self._start_running(req, num_new, out)
            budget -= num_new

    def join_running(self, out: SchedulerOutput) -> bool:
        """Add running requests the step does not cover yet (loads that just landed) while
        its token budget and the pool allow, without preempting anyone; True if any joined."""
        scheduled = {id(s.request) for s in out.seqs}
        budget = self.max_num_batched_tokens - out.num_tokens
        joined = False
        for req in self.running:
            if budget <= 0:
                break
            if id(req) in scheduled:
                continue
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.allocate_slots(req, num_new):
                continue
            self._schedule(req, num_new, out)
            budget -= num_new
            joined = True
        if joined:
            self.loads.notify_connector()
        return joined

    def _num_active(self) -> int:
        return len(self.running) + len(self.loading)

    def _record_admission(self, req: Request, num_cached: int, sources: dict[str, int]) -> None:
        """First admission only: how much of the prompt was reused, and from where."""
        if req.num_cached_tokens >= 0:
            return
        req.num_cached_tokens = num_cached
        device = num_cached - sum(sources.values())
        req.kv_sources = {"device": device, **sources, "computed": req.num_prompt_tokens - num_cached}
        self.kv.prefix_queries += req.num_prompt_tokens
        self.kv.prefix_hits += device
        if req.resumed_tokens and self.parking is not None:
            whole = num_cached >= req.resumed_tokens - self.kv.block_size
            self.parking.record_resume("tier" if sources else "device" if whole else "recomputed")

    def on_connector_output(self, output: ConnectorOutput) -> None:
        """Loads that ended: run each request from its first block that did not load intact."""
        for rid, result in output.finished_loads.items():
            if self.connector.timed_out(rid):  # recompute in other blocks: the load may still write its own
                self.num_load_failures += result.num_blocks
                req = self.loads.time_out(rid)
                if req is not None:
                    req.status = RequestStatus.WAITING
                    self.waiting.appendleft(req)
                continue
            landed = self.loads.land(rid, result)
            if landed is None:
                continue
            req = landed.request
            self.num_load_failures += result.num_blocks - result.num_blocks_ok
            self._record_admission(req, req.num_computed_tokens, self.loads.sources(landed))
            req.status = RequestStatus.RUNNING
            self.running.append(req)
        self.loads.settle_late(self.connector.take_settled_late())
        for rid in output.finished_saves:
            req = self.held.pop(rid, None)
            if req is not None:
                self.kv.free(req)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        self.num_preempted_tokens += req.num_computed_tokens
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed counts, append sampled tokens, run stop checks; return finished requests."""
        finished = []
        self.kv.end_step()
        now = time.monotonic()
        for seq in out.seqs:
            req = seq.request
            req.num_computed_tokens = seq.num_computed + seq.num_new
            token = sampled.get(req.request_id)
            if token is None:
                continue
            if req.first_token_time is None:
                req.first_token_time = now
            req.output_token_ids.append(token)
            status = stop_status(req, token, self.max_model_len, self.kv.max_seq_tokens)
            if status is not None:
                self.finish(req, status)
                finished.append(req)
            else:
                self.kv.update_block_hashes(req)
        return finished

    def finish(self, req: Request, status: RequestStatus) -> None:
        """End a request wherever it is (running, waiting) and release its blocks."""
        req.status = status
        req.finished_time = time.monotonic()
        if req.request_id in self.loading:
            return  # a load is writing into its blocks: freed when the load reports back
        if req in self.running:
            self.running.remove(req)
            if self._parks(req, status):
                return
        elif req in self.waiting:
            self.waiting.remove(req)
        if self.connector is not None and self.connector.on_request_finished(req, self.kv.block_ids(req.request_id)):
            self.held[req.request_id] = req
            return
        self.kv.free(req)

    def _parks(self, req: Request, status: RequestStatus) -> bool:
        """A request that asked to park (a tool call) and stopped normally goes to the lot."""
        if self.parking is None or req.sampling_params.park is None or status not in (
                RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH):
            return False
        self.kv.update_block_hashes(req)  # the lot finds it by the hash of its last full block
        req.parked_id = self.parking.park(req)
        return True
