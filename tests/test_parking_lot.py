"""Parking under random sequences of park / resume (by id and implicit) / release / TTL
expiry / abort, through the real scheduler and KV groups (no model: block contents are
simulated as in test_block_pool). Every read still sees exactly its own tokens, errors are
clear, and once everything ends every block and state slot is back in its pool."""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_block_pool import MIXES, ROOT, _check_invariants, _run_step, make_coordinator

from kvtier.engine.parking.params import ParkParams
from kvtier.engine.parking.parking_lot import ParkingLot
from kvtier.engine.request import Request, RequestStatus
from kvtier.engine.sampling_params import SamplingParams
from kvtier.engine.scheduler import Scheduler


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _world(kinds, policy, budget=8, num_blocks=20):
    kv = make_coordinator(kinds, num_blocks, True, budget)
    clock = FakeClock()
    lot = ParkingLot(kv, policy, 0.6, lambda: 1e9, lambda: 1000.0, clock=clock)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=budget, max_model_len=64, parking=lot)
    shadows = [{i: [None] * 4 for i in range(m.pool.num_blocks)} if m.group.kind != "ssm" else {}
               for m in kv.managers]
    return kv, lot, sched, clock, shadows


def _params(rng, park: bool) -> SamplingParams:
    park_params = ParkParams(ttl_s=rng.choice([1.0, 5.0]), tool=rng.choice(["a", "b"])) if park else None
    return SamplingParams(max_tokens=rng.randint(1, 4), temperature=0, ignore_eos=True, park=park_params)


def _drain(sched, kv, shadows, rng, steps=300):
    for _ in range(steps):
        if not sched.has_unfinished():
            return
        out = sched.schedule()
        sched.update(out, _run_step(out, kv, shadows, rng))
        _check_invariants(kv, shadows, sched)
    raise AssertionError("the scheduler did not drain")


OPS = ["new", "resume", "implicit", "release", "expire", "abort", "step"]


@settings(max_examples=120, deadline=None)
@given(ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=30), seed=st.integers(0, 1000),
       mix=st.sampled_from(MIXES), policy=st.sampled_from(["keep", "offload", "discard", "auto"]))
def test_random_park_resume_release_expire_abort_leak_nothing(ops, seed, mix, policy):
    kv, lot, sched, clock, shadows = _world(mix, policy)
    rng = random.Random(seed)
    ids = iter(range(10**6))
    for op in ops:
        parked = sorted(lot.entries)
        if op == "new":
            tokens = [rng.randrange(3) for _ in range(rng.randint(1, 20))]
            sched.add(Request(str(next(ids)), tokens, _params(rng, rng.random() < 0.8), hash_root=ROOT))
        elif op in ("resume", "implicit") and parked:
            entry = lot.entries[rng.choice(parked)]
            tokens = entry.tokens + [rng.randrange(3) for _ in range(rng.randint(1, 8))]
            req = Request(str(next(ids)), tokens, _params(rng, rng.random() < 0.5), hash_root=ROOT)
            if op == "implicit":
                kv.update_block_hashes(req)
                found = lot.match(req)
                assert found is not None and len(found.tokens) >= len(entry.tokens)
                entry = found
            sched.resume(lot.take(entry.parked_id), req)
            with pytest.raises(KeyError, match="resum"):
                lot.take(entry.parked_id)
        elif op == "release" and parked:
            pid = rng.choice(parked)
            lot.release(pid)
            with pytest.raises(KeyError, match="released"):
                lot.release(pid)
        elif op == "expire":
            clock.now += 3.0
            lot.tick()
        elif op == "abort":
            live = list(sched.waiting) + list(sched.running)
            if live:
                sched.finish(rng.choice(live), RequestStatus.FINISHED_ABORTED)
        elif op == "step":
            for _ in range(rng.randint(1, 5)):
                if sched.has_unfinished():
                    out = sched.schedule()
                    sched.update(out, _run_step(out, kv, shadows, rng))
                    _check_invariants(kv, shadows, sched)
        assert lot.pinned_share() <= 0.6 + 1e-9
    _drain(sched, kv, shadows, rng)
    for pid in sorted(lot.entries):
        lot.release(pid)
    assert not lot.entries
    for m in kv.managers:  # nothing parked, nothing running: every block and slot is free
        assert m.pool.num_free_blocks == m.pool.num_blocks
        assert not m.req_blocks and not getattr(m, "states", {})


def test_a_resumed_turn_keeps_its_conversations_place_in_the_queue():
    kv, lot, sched, clock, shadows = _world(("full",), "keep", budget=64)
    rng = random.Random(0)
    first = Request("a", [1] * 10, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True,
                                                   park=ParkParams()), hash_root=ROOT)
    sched.add(first)
    _drain(sched, kv, shadows, rng)
    later = [Request(x, [2] * 5, SamplingParams(max_tokens=1), hash_root=ROOT) for x in "bc"]
    for r in later:
        sched.add(r)
    entry = lot.take(first.parked_id)
    resumed = Request("a2", entry.tokens + [0, 0], SamplingParams(max_tokens=1), hash_root=ROOT)
    sched.resume(entry, resumed)
    assert [r.request_id for r in sched.waiting] == ["a2", "b", "c"]
    assert resumed.holds_kv and resumed.num_computed_tokens == 10


def test_memory_pressure_demotes_the_longest_pause_and_reuses_its_blocks_first():
    # 12 blocks of 4 tokens: c (finished, cached), a and b (parked, kept) hold 4 each.
    kv, lot, sched, clock, shadows = _world(("full",), "keep", budget=64, num_blocks=12)
    lot.max_parked_fraction = 1.0
    rng = random.Random(0)

    def run(rid, token, park=None):
        params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, park=park)
        req = Request(rid, [token] * 15, params, hash_root=ROOT)  # 15 + 1 output = 4 blocks
        sched.add(req)
        _drain(sched, kv, shadows, rng)
        return req

    run("c", 3)
    a = run("a", 4, ParkParams(expected_pause_s=30.0))
    b = run("b", 5, ParkParams(expected_pause_s=0.5))
    assert lot.demote_one()
    assert lot.entries[a.parked_id].policy == "offload" and lot.entries[b.parked_id].pinned
    run("d", 6)  # needs 4 blocks: the demoted request's, not c's older cached ones
    probe = Request("probe", [3] * 15, SamplingParams(max_tokens=1), hash_root=ROOT)
    kv.update_block_hashes(probe)
    assert kv.get_computed_blocks(probe).num_tokens == 12  # c's 3 full blocks are still cached


def test_auto_without_a_tier_demotes_a_kept_request_that_outstays_its_pause():
    kv = make_coordinator(("full",), 20, True, 64)
    clock = FakeClock()
    lot = ParkingLot(kv, "auto", 0.6, lambda: None, lambda: 100.0, clock=clock)  # slow prefill: keep pays
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, parking=lot)
    shadows = [{i: [None] * 4 for i in range(20)}]
    rng = random.Random(0)
    parked = Request("a", [4] * 15, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True,
                                                    park=ParkParams(expected_pause_s=0.2)), hash_root=ROOT)
    sched.add(parked)
    _drain(sched, kv, shadows, rng)
    busy = Request("r", [5] * 30, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), hash_root=ROOT)
    sched.add(busy)
    out = sched.schedule()  # another request now uses the pool
    sched.update(out, _run_step(out, kv, shadows, rng))
    entry = lot.entries[parked.parked_id]
    lot.tick()
    assert entry.pinned  # a short pause: keeping is cheaper than recomputing
    clock.now += 120.0  # the tool outstays its 0.2 s expectation by far
    lot.tick()
    assert entry.policy == "discard" and lot.stats()["demoted"] == 1
