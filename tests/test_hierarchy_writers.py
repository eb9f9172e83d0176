"""The hierarchy's one writer per slow tier: its byte bound, its close deadline, the
evict-hook capability for write-back, and faults counted by kind and logged once."""
import json
import logging
import threading
import time

import pytest
import torch
from test_hierarchy import BLOCK, DictTier, FaultyTier, block, blocks, cpu, keys, load_ids

from kvtier.kvstore.hierarchy import TierHierarchy


def test_a_tiers_queue_option_bounds_its_writer_in_bytes():
    gate = threading.Event()
    slow = DictTier("slow", gate=gate)
    slow.write_queue_bytes = 2 * BLOCK  # as `queue=` in the tier's spec sets it
    h = TierHierarchy([cpu(64), slow])
    try:
        h.store(keys([0]), blocks([0]))
        assert slow.entered.wait(5)
        h.store(keys(range(1, 6)), blocks(range(1, 6)))  # a prefix of 2 fits, 3 are dropped
        assert h.stats()["slow"].skipped_writes == 3
        gate.set()
        assert h.flush(timeout=5)
        assert slow.held(range(6)) == [True] * 3 + [False] * 3
    finally:
        gate.set()
        h.close()


def test_close_drains_the_writers_then_closes_the_tiers():
    low = DictTier("low")
    h = TierHierarchy([cpu(64), low])
    for i in range(20):
        h.store(keys([i]), blocks([i]))
    h.close(timeout=10)
    assert low.held(range(20)) == [True] * 20
    assert h.stats()["low"].skipped_writes == 0


def test_close_gives_up_at_its_deadline_and_counts_what_it_dropped():
    gate = threading.Event()
    slow = DictTier("slow", gate=gate)
    h = TierHierarchy([cpu(64), slow])
    try:
        h.store(keys([0]), blocks([0]))
        assert slow.entered.wait(5)
        h.store(keys([1, 2]), blocks([1, 2]))
        h.store(keys([3]), blocks([3]))
        start = time.monotonic()
        h.close(timeout=0.2)
        assert time.monotonic() - start < 2
        assert h.stats()["slow"].skipped_writes == 3  # the blocks still queued at the deadline
    finally:
        gate.set()


class HookedDictTier(DictTier):
    """A byte store that declares evict hooks (CpuTier is not the only one that may)."""

    supports_evict_hook = True
    hook = "unset"

    def set_evict_hook(self, hook):
        self.hook = hook


def test_write_back_asks_tiers_for_the_evict_hook_capability():
    top, low = HookedDictTier("top"), DictTier("low")
    h = TierHierarchy([top, low], write_policy="write-back")
    assert callable(top.hook)
    top.hook(keys([5]), blocks([5]))  # what the top tier evicts goes to the next one down
    assert h.flush(timeout=5) and low.held([5]) == [True]
    h.close()
    assert top.hook is None
    with pytest.raises(TypeError, match="evictions"):
        DictTier().set_evict_hook(lambda k, b: None)


def test_tier_faults_are_counted_by_kind_logged_once_and_the_rest_keeps_working(caplog):
    low = DictTier("low")
    low.put(keys([0, 1]), blocks([0, 1]))
    h = TierHierarchy([cpu(8), FaultyTier(), low])
    with caplog.at_level(logging.WARNING, logger="kvtier"):
        for _ in range(5):
            assert h.lookup(keys([0, 1])) == [2, 2]  # contains raises on the faulty tier
        for _ in range(5):
            ok, into = load_ids(h, [0, 1], [1, 1])  # get raises: falls back to the tier below
            assert ok == [True, True] and torch.equal(into[1], block(1))
            assert h.flush(timeout=5)  # the promotion's put on the faulty tier raised
        h.store(keys([7]), blocks([7]))  # put raises on the faulty tier's writer
        assert h.flush(timeout=5)
    faults = h.fault_counts()["faulty"]
    assert faults == {"faulty.contains: RuntimeError": 5, "faulty.get: RuntimeError": 5,
                      "faulty.put: RuntimeError": 6}
    s = h.stats()["faulty"]
    assert s.errors == 16 and s.skipped_writes == 5 * 2 + 1 and s.faults == faults
    assert json.loads(json.dumps(s.as_dict()))["faults"] == faults  # kv_stats() stays JSON
    logged = [r.getMessage() for r in caplog.records if "faulty." in r.getMessage()]
    assert len(logged) == 3 and all("boom" in m for m in logged)  # once per kind
    assert low.held([7]) == [True]  # the healthy tiers were written all the same
    h.close()


def test_a_store_fault_inside_a_tier_is_counted_by_kind_too(tmp_path):
    from kvtier.kvstore.tiers.lmdb_tier import LmdbTier

    disk = LmdbTier(str(tmp_path / "kv"), 1 << 20)
    disk.close()  # every call now meets a closed store
    h = TierHierarchy([cpu(4), disk])
    assert h.lookup(keys([0])) == []
    assert h.stats()["lmdb"].faults == {"lmdb.contains: StoreUnavailable": 1}
    h.close()
