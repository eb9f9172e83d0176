"""The auto parking policy's cost comparison."""
from __future__ import annotations

from kvtier.engine.parking.policy import CostInputs, choose, costs

BUSY = dict(share=0.2, pressure=0.7, recompute_s=2.0)  # a busy pool, a context of 2 s to recompute


def test_with_a_tier_keeping_never_costs_more_than_offloading():
    # The tier holds the blocks already; a kept request gives them up when memory runs short.
    for pause in (0.01, 1.0, 600.0):
        table = costs(CostInputs(pause_s=pause, transfer_s=0.01, **BUSY))
        assert table["keep"] <= table["offload"]
        assert choose(CostInputs(pause_s=pause, transfer_s=0.01, **BUSY)) == "keep"


def test_without_a_tier_a_long_pause_under_pressure_is_discarded():
    assert choose(CostInputs(pause_s=600, transfer_s=None, **BUSY)) == "discard"
    assert choose(CostInputs(pause_s=0.01, transfer_s=None, **BUSY)) == "keep"
    idle = dict(BUSY, pressure=0.0)  # nobody else wants the memory: keeping is free
    assert choose(CostInputs(pause_s=600, transfer_s=None, **idle)) == "keep"
