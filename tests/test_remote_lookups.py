"""Remote tiers off the engine loop: lookups that wait only briefly on a frozen store and
give up after their budget, and loads stuck on one that hold up no other load. In-process
tiers whose calls hang on demand stand in for a SIGSTOPped server (tests/test_frozen_store.py
does it with real ones)."""
import logging
import threading
import time

import torch

from kvtier.connectors.remote_lookup import LookupBudget, RemoteLookups
from kvtier.kvstore.faults import FaultLog
from kvtier.kvstore.keys import BlockKey
from kvtier.kvstore.tiers.byte_store import ByteStoreTier
from kvtier.kvstore.tiers.cpu_tier import CpuTier
from kvtier.kvstore.tiers.spec import BlockLayout

LAYOUT = BlockLayout((2, 2, 16, 2, 8), torch.float32, torch.device("cpu"))


class GateTier(ByteStoreTier):
    """An in-memory store whose presence probe hangs while `open` is clear, as a frozen
    (SIGSTOPped) server's would; `missed_deadline` counts what a circuit breaker would."""

    name = "gate"
    remote = True

    def __init__(self):
        super().__init__(1 << 30)
        self.values: dict[bytes, bytes] = {}
        self.open = threading.Event()
        self.open.set()
        self.probes = self.missed = 0

    def _exists(self, keys):
        self.probes += 1
        self.open.wait(30)
        return [k in self.values for k in keys]

    def _read(self, keys):
        return [self.values.get(k) for k in keys]

    def _write(self, keys, values):
        self.values.update(zip(keys, values))

    def _remove(self, keys):
        for k in keys:
            self.values.pop(k, None)

    def missed_deadline(self):
        self.missed += 1


def _answer(lookups, rid, keys, timeout=10.0):
    """Ask as the scheduler does, once per step, until the answer is known."""
    deadline = time.monotonic() + timeout
    while (where := lookups.lookup(rid, keys)) is None:
        assert time.monotonic() < deadline
        lookups.new_step()
        time.sleep(0.002)
    return where


def test_remote_lookups_wait_on_the_loop_only_briefly_and_give_up_after_their_budget():
    layout = LAYOUT
    cpu, gate = CpuTier(1 << 20, layout), GateTier()
    keys = [BlockKey(b"ns", bytes([i]) * 32) for i in range(5)]
    cpu.put(keys[:2], [torch.full(layout.shape, float(i)) for i in range(2)])
    gate.put(keys, [torch.full(layout.shape, float(i)) for i in range(5)])
    faults = FaultLog(logging.getLogger("test"))
    lookups = RemoteLookups([cpu, gate], ["cpu", "gate"], LookupBudget(budget_s=0.2, wait_s=0.01), faults)
    try:
        assert _answer(lookups, "healthy", keys) == [0, 0, 1, 1, 1]  # local first, then the remote tier

        gate.open.clear()  # frozen
        lookups.new_step()
        t0 = time.monotonic()
        assert lookups.lookup("frozen", keys) is None  # not yet: ask again next step
        assert time.monotonic() - t0 < 0.1  # waited its step's allowance (10 ms), no more
        assert _answer(lookups, "frozen", keys) == [0, 0]  # after the budget: what the local tier holds
        assert 0.2 <= time.monotonic() - t0 < 2
        assert gate.missed == 1 and lookups.missed == [0, 1]
        assert faults.counts() == {"lookup gate: TimeoutError": 1}

        probes = gate.probes
        t0 = time.monotonic()
        assert lookups.lookup("while-stuck", keys) == [0, 0]  # the stuck tier is skipped at once
        assert time.monotonic() - t0 < 0.1 and gate.probes == probes

        gate.open.set()  # resumed: once the stuck probe returns, the tier is asked again
        deadline = time.monotonic() + 10
        while _answer(lookups, f"resumed-{gate.probes}", keys) != [0, 0, 1, 1, 1]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        gate.open.set()
        lookups.close()


class StuckReadTier(GateTier):
    """GateTier whose reads, not its lookups, hang while `open` is clear."""

    def _exists(self, keys):
        return [k in self.values for k in keys]

    def _read(self, keys):
        self.open.wait(30)
        return super()._read(keys)


def test_a_load_stuck_on_a_frozen_store_does_not_hold_up_other_loads():
    from kvtier.connectors.base import ConnectorContext, ConnectorMetadata, LoadSpec
    from kvtier.connectors.tiered import TieredConnector

    layout = LAYOUT
    cpu, stuck = CpuTier(1 << 20, layout), StuckReadTier()
    keys = [BlockKey(b"ns", bytes([i]) * 32) for i in range(4)]
    data = [torch.full(layout.shape, float(i)) for i in range(4)]
    cpu.put(keys[:2], data[:2])
    stuck.put(keys[2:], data[2:])
    connector = TieredConnector({"tiers": [cpu, stuck]}, ConnectorContext(b"ns", layout, 16))
    connector.register_kv_caches(torch.zeros((4, *layout.shape)))
    stuck.open.clear()
    try:
        meta = ConnectorMetadata(loads=[LoadSpec("frozen", [2, 3], keys[2:], [1, 1]),
                                        LoadSpec("healthy", [0, 1], keys[:2], [0, 0])])
        connector.start_load(meta)
        finished = {}
        deadline = time.monotonic() + 5
        while "healthy" not in finished:
            assert time.monotonic() < deadline, "the healthy load waited behind the frozen one"
            finished.update(connector.get_finished(wait=True).finished_loads)
        assert "frozen" not in finished and finished["healthy"].num_blocks_ok == 2
        assert all(torch.equal(connector.kv_pool[i], data[i]) for i in range(2))
        stuck.open.set()
        while "frozen" not in finished:
            assert time.monotonic() < deadline + 5
            finished.update(connector.get_finished(wait=True).finished_loads)
        assert finished["frozen"].num_blocks_ok == 2
    finally:
        stuck.open.set()
        connector.close()
