"""The expected remaining pause of a tool, against a plain reading of its definition."""
from __future__ import annotations

import random

import pytest

from kvtier.engine.parking.pause_stats import DEFAULT_PAUSE_S, PauseStats


def _reference(pauses: list[float], elapsed: float) -> float:
    longer = [d - elapsed for d in pauses if d > elapsed]
    return sum(longer) / len(longer) if longer else elapsed


@pytest.mark.parametrize("seed", range(5))
def test_expected_remaining_matches_the_mean_excess_over_the_window(seed):
    rng = random.Random(seed)
    stats, window = PauseStats(window=16), []
    for _ in range(200):
        d = rng.choice([rng.uniform(0.01, 0.5), rng.uniform(2, 30), 1.0])  # ties included
        stats.observe("test", d)
        window = (window + [d])[-16:]
        for elapsed in (0.0, rng.uniform(0, 1), rng.uniform(1, 40), d):
            assert stats.expected_remaining("test", None, elapsed) == pytest.approx(_reference(window, elapsed))


def test_caller_expectation_and_unknown_tools():
    stats = PauseStats()
    assert stats.expected_remaining("t", 5.0, 2.0) == 3.0
    assert stats.expected_remaining("t", 5.0, 7.0) == 7.0  # outstayed: as long again
    assert stats.expected_remaining("never seen", None, 0.0) == DEFAULT_PAUSE_S
    stats.observe("t", 2.0)
    assert stats.expected_remaining("t", None, 0.5) == 1.5
    assert stats.summary() == {"t": {"pauses": 1, "median_s": 2.0}}
