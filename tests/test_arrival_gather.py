"""An idle engine gathers requests that arrive together into one first step."""
from __future__ import annotations

import asyncio

import pytest

from kvtier import SamplingParams
from kvtier.engine.config import EngineConfig
from kvtier.engine.engine_core import Engine
from kvtier.engine.make_model import make_model
from kvtier.engine.serving.arrival_gather import LONE_S, MAX_S, ArrivalGather, gather
from kvtier.engine.serving.async_engine import AsyncEngine


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_lone_requests_wait_only_briefly():
    gate = ArrivalGather()
    for at in (0.0, 1.0, 2.0):  # one request a second: never together
        gate.arrived(at)
        assert gate.deadline() == pytest.approx(at + LONE_S)


def test_a_burst_is_awaited_until_it_is_as_large_as_the_last_one():
    gate = ArrivalGather(window=1.5)
    for i in range(4):  # 4 requests over 30 ms
        gate.arrived(10.0 + 0.01 * i)
    gate.arrived(20.0)  # the next burst starts: wait up to 1.5 x 30 ms (+ the lone wait) for 3 more
    assert gate.deadline() == pytest.approx(20.0 + 1.5 * 0.03 + LONE_S)
    for i in range(1, 4):
        gate.arrived(20.0 + 0.001 * i)
    assert gate.deadline() == float("-inf")  # all 4 are here: no more waiting


def test_the_quiet_time_counts_from_the_latest_arrival():
    """A first burst trickling in faster than the lone wait is waited for as a whole, and a
    burst spreading wider than the last span is too, while requests keep coming."""
    first = ArrivalGather()
    for i in range(5):
        first.arrived(0.002 * i)  # 2 ms apart: each arrival extends the wait
    assert first.deadline() == pytest.approx(0.008 + LONE_S)
    gate = ArrivalGather(window=1.5)
    for i in range(4):  # one burst of 4 over 12 ms
        gate.arrived(10.0 + 0.004 * i)
    for i in range(3):  # the next arrives 15 ms apart: 30 ms in, still inside the quiet time
        gate.arrived(20.0 + 0.015 * i)
    assert gate.deadline() == pytest.approx(20.03 + 1.5 * 0.012 + LONE_S)
    assert gate.deadline() > 20.0 + 1.5 * 0.012 + LONE_S  # later than a wait counted from the first


def test_the_wait_is_bounded_and_can_be_switched_off():
    gate = ArrivalGather(window=10)
    for i in range(3):
        gate.arrived(0.09 * i / 2)  # a wide burst of 3 within MAX_S
    gate.arrived(5.0)
    assert gate.deadline() == pytest.approx(5.0 + MAX_S)
    off = ArrivalGather(window=0)
    off.arrived(0.0)
    assert off.deadline() == float("-inf")
    with pytest.raises(ValueError, match="gather_window"):
        ArrivalGather(window=-1)


def test_gather_waits_for_arrivals_then_stops():
    clock, gate = FakeClock(), ArrivalGather()
    for i in range(3):
        gate.arrived(50.0 + 0.02 * i)
    gate.arrived(clock.t)
    waits = []

    def wait(timeout):  # another request arrives 5 ms into each wait
        waits.append(timeout)
        clock.t += 0.005
        gate.arrived(clock.t)

    gather(gate, wait, clock)
    assert len(waits) == 2  # the burst reached 3 again after two more arrivals


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("gather") / "model"), "llama", "tiny")


def _steps_per_turn(model_dir, window: float, users=4, turns=3, stagger_s=0.01) -> list[int]:
    """Each turn: `users` requests submitted stagger_s apart to an idle engine, turns
    further apart than one burst lasts."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def run():
        engine = AsyncEngine(Engine(EngineConfig(model=model_dir, kv_tiers=[])), gather_window=window)
        engine.start()
        steps = []
        try:
            for turn in range(turns):
                await asyncio.sleep(2 * MAX_S)
                before = engine.engine.num_steps

                async def one(u):
                    await asyncio.sleep(stagger_s * u)
                    async for _ in engine.generate(f"turn {turn} user {u} " * 8, params, f"{turn}-{u}"):
                        pass

                await asyncio.gather(*(one(u) for u in range(users)))
                steps.append(engine.engine.num_steps - before)
        finally:
            await engine.shutdown(1.0)
        return steps

    return asyncio.run(run())


def test_requests_of_one_turn_share_their_first_step(model_dir):
    gathered = _steps_per_turn(model_dir, window=1.5)
    # Turn 1 teaches the engine that requests come in fours; later turns then run as one
    # batch: one step that prefills all four, three decode steps.
    assert gathered[1:] == [4, 4]
    assert min(_steps_per_turn(model_dir, window=0)) > 4  # starting at once splits the batch
