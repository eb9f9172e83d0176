"""Which way a parked request keeps its KV: pinned on the device, offloaded to the tiers, or
left to ordinary prefix caching; chosen per request by expected cost.

Costs are in pool-seconds, the device KV memory a choice keeps from other requests times
how long (InferCept compares the waste of its options the same way):
- keep: the request's share of the pool, held idle for the expected pause, weighted by
  pressure (the share of the pool the other requests use: an idle pool costs nothing).
- offload: its share of the pool, busy while its blocks move to the first tier and back.
- discard: recomputing its context stalls the whole running batch: recompute seconds
  times the share of the pool the batch uses (at least the request's own share).
Offload needs a tier; without one the choice is between keep and discard.

With a tier, keeping never costs more than offloading: the first tier already holds the
blocks (they are saved as they fill), and a kept request gives its blocks up the moment
memory runs short (the one with the largest share x expected remaining pause first, see
ParkingLot.demote_one), which then costs exactly what offloading at once would have. Until
then its next turn loads nothing. So keep's cost is capped at offload's.
"""
from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("keep", "offload", "discard", "auto")


@dataclass
class CostInputs:
    share: float  # the parked request's share of the device pool
    pressure: float  # share of the pool used by other (running) requests
    pause_s: float  # expected remaining pause
    transfer_s: float | None  # one way to the first tier; None: no tier
    recompute_s: float  # prefilling its context again


def costs(c: CostInputs) -> dict[str, float]:
    out = {"keep": c.share * c.pause_s * c.pressure,
           "discard": c.recompute_s * max(c.pressure, c.share)}
    if c.transfer_s is not None:
        out["offload"] = c.share * 2 * c.transfer_s
        out["keep"] = min(out["keep"], out["offload"])
    return out


def choose(c: CostInputs) -> str:
    """The cheapest choice; ties go to keep, then offload (they lose nothing)."""
    table = costs(c)
    return min(("keep", "offload", "discard"), key=lambda name: table.get(name, float("inf")))
