"""Tier lookups that never hold the engine loop on a remote store.

Local tiers (host memory, local disk) answer in microseconds and are asked inline, as
before. Remote tiers (Redis, kv-servers) are asked on a small thread pool:

- lookup() submits the probe and waits for it inline once, while the step's small wait
  allowance (`wait_s`, shared by all lookups of one step) lasts; a healthy store on a LAN
  answers within it, so the answer usually comes in the same step.
- Otherwise it returns None ("ask again next step"): the scheduler passes over that
  request for this step and the others keep running. Later asks only look whether the
  answer is in, without waiting, so a probe costs the engine loop at most `wait_s` in all
  (an idle loop waits on `pending()` instead of spinning).
- A probe not answered within `budget_s` of its start is given up: the request goes on
  with what the local tiers hold, the tier the probe is stuck in counts a failure on its
  circuit breaker at once (`Tier.missed_deadline`) and is skipped by
  new lookups until that stuck call returns. So a frozen store costs one request at most
  `budget_s` of waiting and the engine loop at most `wait_s` per step.

Tiers declare which they are (`Tier.remote`: cpu and lmdb are local, the rest remote).
"""
from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kvtier.kvstore.faults import FaultLog
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.tiers.base import Tier

_MAX_PROBES = 256  # probes remembered for requests that stopped asking (aborted, preempted)


@dataclass(frozen=True)
class LookupBudget:
    """budget_s: how long a request may wait for a remote tier's answer before it goes on
    without it. wait_s: how long one engine step may wait, in all, for remote answers.

    A healthy store answers in about a millisecond, but on a busy host the probe thread
    also waits for CPU and for the GIL behind the engine loop: with 0.05 s, healthy stores
    missed the budget under load in tests; 0.25 s still bounds what a frozen store costs
    one request, and the engine loop's cost is set by wait_s alone."""

    budget_s: float = 0.25
    wait_s: float = 0.005
    workers: int = 4

    def __post_init__(self):
        for name in ("budget_s", "wait_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"kv_connector_config: lookup_{name} must be a number of seconds >= 0, got {value!r}")
        if self.wait_s > self.budget_s:
            raise ValueError(f"kv_connector_config: lookup_wait_s ({self.wait_s}) must not exceed "
                             f"lookup_budget_s ({self.budget_s})")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"lookup workers: must be an int >= 1, got {self.workers!r}")


class _Probe:
    """One request's remote lookup: what local tiers found, and the pool's job for the rest."""

    def __init__(self, keys: list[BlockKey], where: list[int | None], missing: list[int]):
        self.keys = keys
        self.where = where  # tier of each block found locally, None elsewhere
        self.missing = missing  # positions the local tiers do not hold
        self.started = time.monotonic()
        self.future: cf.Future | None = None
        self.tier: int | None = None  # remote tier the job is waiting on now (under the lock)
        self.stalled: int | None = None  # tier marked stalled on this probe's behalf
        self.abandoned = False
        self.prefix = True  # answer with the leading run only


class RemoteLookups:
    def __init__(self, tiers: Sequence[Tier], names: Sequence[str], budget: LookupBudget, faults: FaultLog):
        self.tiers = list(tiers)
        self.names = list(names)
        self.budget = budget
        self.remote = [bool(t.remote) for t in self.tiers]
        self._faults = faults
        self._pool = (cf.ThreadPoolExecutor(budget.workers, thread_name_prefix="kvtier-lookup")
                      if any(self.remote) else None)
        self._probes: dict[str, _Probe] = {}  # request id -> probe in flight (engine loop only)
        self._lock = threading.Lock()
        self._stalled = [0] * len(self.tiers)  # given-up probes still inside each tier
        self._wait_left = budget.wait_s
        self.missed = [0] * len(self.tiers)  # probes given up while inside each tier
        self.deferred = 0  # lookups answered "ask again next step"

    def new_step(self) -> None:
        self._wait_left = self.budget.wait_s

    def lookup(self, request_id: str, keys: list[BlockKey], prefix: bool = True) -> list | None:
        """Tier of each block in the longest prefix held anywhere (as TierHierarchy.lookup),
        or None while a remote answer is still due. prefix=False: the tier of every key,
        None where no tier holds it (hybrid models need blocks that are not a prefix)."""
        probe = self._probes.get(request_id)
        if probe is not None and probe.keys != keys:  # the request moved on: ask afresh
            self._drop(request_id)
            probe = None
        if probe is None:
            probe = self._start(keys)
            probe.prefix = prefix
            if probe.future is None:
                return _result(probe, probe.where)
            if len(self._probes) >= _MAX_PROBES:
                self._sweep()
            self._probes[request_id] = probe
            return self._answer(request_id, probe, wait=True)
        return self._answer(request_id, probe, wait=False)

    def pending(self) -> list[cf.Future]:
        """Probes in flight, for an engine loop with nothing else to do to wait on."""
        return [p.future for p in self._probes.values()]

    def forget(self, request_id: str) -> None:
        """The request went away (finished, aborted): stop caring about its probe."""
        self._drop(request_id)

    def _drop(self, request_id: str) -> None:
        probe = self._probes.pop(request_id, None)
        if probe is None:
            return
        if time.monotonic() - probe.started >= self.budget.budget_s:
            self._give_up(probe)  # overdue: counts against the tier
        else:
            with self._lock:
                probe.abandoned = True

    def _start(self, keys: list[BlockKey]) -> _Probe:
        where: list[int | None] = [None] * len(keys)
        for t, tier in enumerate(self.tiers):
            if self.remote[t]:
                continue
            todo = [i for i, w in enumerate(where) if w is None]
            if not todo:
                break
            for i, hit in zip(todo, self._contains(t, [keys[i] for i in todo])):
                if hit:
                    where[i] = t
        probe = _Probe(keys, where, [i for i, w in enumerate(where) if w is None])
        with self._lock:
            live = any(self.remote[t] and not self._stalled[t] for t in range(len(self.tiers)))
        if probe.missing and live:
            probe.future = self._pool.submit(self._probe_remote, probe)
        return probe

    def _answer(self, request_id: str, probe: _Probe, wait: bool) -> list[int] | None:
        future = probe.future
        if wait and self._wait_left > 0 and not future.done():
            start = time.monotonic()
            cf.wait([future], timeout=self._wait_left)
            self._wait_left -= time.monotonic() - start
        if future.done():
            del self._probes[request_id]
            where = list(probe.where)
            try:
                found = future.result()
            except Exception as e:  # a bug in the probe: go on with the local answer
                self._faults.record("lookup", e)
                found = {}
            for i, t in found.items():
                where[i] = t
            return _result(probe, where)
        if time.monotonic() - probe.started < self.budget.budget_s:
            self.deferred += 1
            return None
        del self._probes[request_id]
        self._give_up(probe)
        return _result(probe, probe.where)

    def _give_up(self, probe: _Probe) -> None:
        """Stop waiting for a probe; the tier it is stuck in counts a failure now."""
        with self._lock:
            probe.abandoned = True
            t = probe.tier
            if t is not None and probe.stalled is None:
                probe.stalled = t
                self._stalled[t] += 1
        if t is None or probe.future.done():
            return
        self.missed[t] += 1
        self._faults.record(f"lookup {self.names[t]}",
                            TimeoutError(f"no answer within lookup_budget_s={self.budget.budget_s}"))
        try:
            self.tiers[t].missed_deadline()
        except Exception as e:  # a tier bug must not reach the engine loop
            self._faults.record(f"missed_deadline {self.names[t]}", e)

    def _sweep(self) -> None:
        now = time.monotonic()
        for rid in [r for r, p in self._probes.items() if now - p.started >= self.budget.budget_s]:
            self._drop(rid)

    # --- on a pool thread -------------------------------------------------------------
    def _probe_remote(self, probe: _Probe) -> dict[int, int]:
        """Position -> remote tier, for the blocks the local tiers lack; each remote tier,
        in order, is asked about what the tiers above it did not hold."""
        found: dict[int, int] = {}
        todo = probe.missing
        for t, tier in enumerate(self.tiers):
            if not todo:
                break
            with self._lock:
                if probe.abandoned:
                    break
                if not self.remote[t] or self._stalled[t]:
                    continue  # a stalled tier: another probe is stuck in it; count these as misses
                probe.tier = t
            try:
                present = self._contains(t, [probe.keys[i] for i in todo])
            finally:
                with self._lock:
                    probe.tier = None
                    if probe.stalled == t:
                        self._stalled[t] -= 1
                        probe.stalled = None
            still = []
            for i, hit in zip(todo, present):
                if hit:
                    found[i] = t
                else:
                    still.append(i)
            todo = still
        return found

    def _contains(self, t: int, keys: list[BlockKey]) -> list[bool]:
        try:
            present = list(self.tiers[t].contains(keys))
        except Exception as e:  # tiers report store faults as misses; this is a bug: count it
            self._faults.record(f"lookup {self.names[t]}", e)
            return [False] * len(keys)
        return present if len(present) == len(keys) else [False] * len(keys)

    def close(self) -> None:
        if self._pool is not None:
            with self._lock:
                for probe in self._probes.values():
                    probe.abandoned = True
            self._probes.clear()
            self._pool.shutdown(wait=False, cancel_futures=True)


def _result(probe: _Probe, where: list[int | None]) -> list:
    return _prefix(where) if probe.prefix else list(where)


def _prefix(where: list[int | None]) -> list[int]:
    out: list[int] = []
    for t in where:
        if t is None:
            break
        out.append(t)
    return out
