"""How often a request's tokens leave the engine loop: the first at once, then every
`stream_interval` tokens, the end always; a whole (non-streamed) response gets its end only.
Fewer deltas mean fewer event-loop wake-ups and SSE events per token."""
from __future__ import annotations

import asyncio

import pytest

from kvtier import SamplingParams
from kvtier.engine.config import EngineConfig
from kvtier.engine.engine_core import Engine
from kvtier.engine.make_model import make_model
from kvtier.engine.serving.async_engine import AsyncEngine
from kvtier.engine.serving.serve_config import ServeConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("interval") / "model"), "llama", "tiny")


def _chunks(model_dir, intervals: list[int], max_tokens: int = 10) -> list[list]:
    """The chunks of one request per interval, all running together."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    async def run():
        engine = AsyncEngine(Engine(EngineConfig(model=model_dir, kv_tiers=[])))
        engine.start()
        try:
            async def one(i, interval):
                return [c async for c in engine.generate("a tale of two tiers " * 4, params, f"r{i}", interval)]

            return await asyncio.gather(*(one(i, n) for i, n in enumerate(intervals)))
        finally:
            await engine.shutdown(1.0)

    return asyncio.run(run())


def test_deltas_come_every_interval_after_the_first_token(model_dir):
    every, by_four, whole = _chunks(model_dir, [1, 4, 0])
    assert [len(c.token_ids) for c in every] == [1] * 10
    assert [len(c.token_ids) for c in by_four] == [1, 4, 4, 1]  # first at once, then fours, then the end
    assert [len(c.token_ids) for c in whole] == [10] and whole[0].output is not None
    final = every[-1].output.outputs[0]
    for chunks in (every, by_four, whole):  # however grouped, the same tokens and text
        assert [t for c in chunks for t in c.token_ids] == final.token_ids
        assert "".join(c.text for c in chunks) == final.text
        assert chunks[-1].output is not None and all(c.output is None for c in chunks[:-1])


def test_bad_intervals_are_refused(model_dir):
    with pytest.raises(ValueError, match="stream_interval"):
        ServeConfig(stream_interval=0)
    with pytest.raises(ValueError, match="stream_interval"):
        _chunks(model_dir, [-1])
