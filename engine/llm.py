"""`LLM`: the offline batch API, shaped like vLLM's."""
from __future__ import annotations

import os
import weakref
from collections.abc import Sequence

from tqdm import tqdm

from kvtier.engine.config import EngineConfig
from kvtier.engine.config_sources import llm_engine_config
from kvtier.engine.engine_core import Engine
from kvtier.engine.outputs import RequestOutput
from kvtier.engine.sampling_params import SamplingParams


class LLM:
    """`LLM(model=PATH, **engine_args)`; see EngineConfig for the arguments."""

    def __init__(self, model: str, **engine_args):
        # Through the config tree: keyword arguments > KVTIER_* variables > defaults.
        self.engine = Engine(llm_engine_config(model, engine_args, os.environ))
        # Drain tier writers and close stores when the LLM is collected or the interpreter
        # exits without close(): queued writes to disk or Redis are not silently dropped.
        self._finalizer = weakref.finalize(self, self.engine.close)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def kv_stats(self) -> dict[str, dict]:
        """Per-tier stats: hits, misses, bytes read/written, used bytes, evictions, errors, seconds."""
        return self.engine.kv_stats()

    def metrics_text(self) -> str:
        """This engine's Prometheus metrics as text (docs/metrics.md); EngineConfig.metrics_port
        also serves them over HTTP."""
        return self.engine.metrics.text()

    def kv_events(self, max_events: int | None = None):
        """Subscribe to KV events (docs/kv_events.md): blocks stored, removed, promoted or
        demoted on the device and in every tier, from now on. Iterating the returned
        subscription yields the events queued so far without waiting; `get(timeout)` waits
        for the next batch; `dropped` counts events lost because the queue (`max_events`,
        default kv_events_queue) was full; `close()` unsubscribes."""
        return self.engine.kv_events.subscribe(max_events)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached device block; False (nothing done) while requests run."""
        return self.engine.reset_prefix_cache()

    def close(self) -> None:
        """Flush and stop tier threads, close stores (also done at exit / collection)."""
        self._finalizer()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Run prompts to completion and return their outputs in input order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(
                    f"sampling_params: got {len(params)} for {len(prompts)} prompts; pass one or one per prompt"
                )
        # Parse every prompt before queueing any, so a bad one leaves the engine untouched.
        parsed = [self.engine.parse_prompt(p) for p in prompts]
        order = {}
        for i, (p, sp) in enumerate(zip(parsed, params)):
            order[self.engine.add_request(p, sp).request_id] = i
        return self._run(order, use_tqdm)

    def resume(self, parked_id: str, prompt, sampling_params: SamplingParams | None = None,
               use_tqdm: bool = False) -> RequestOutput:
        """Continue a parked request (`RequestOutput.parked_id`) with `prompt` appended to its
        sequence (text or {"prompt_token_ids": [...]}, e.g. a tool's result); only that part is
        prefilled when its KV was kept. KeyError for an unknown, expired, released or already
        resumed id."""
        req = self.engine.resume(parked_id, prompt, sampling_params or SamplingParams())
        return self._run({req.request_id: 0}, use_tqdm)[0]

    def release(self, parked_id: str) -> None:
        """Drop a parked request and its KV (KeyError if there is none by that id)."""
        self.engine.release(parked_id)

    def _run(self, order: dict[str, int], use_tqdm: bool) -> list[RequestOutput]:
        """Step the engine until every request in `order` (id -> result index) has finished."""
        results: list[RequestOutput | None] = [None] * len(order)
        progress = _progress(len(order), use_tqdm)
        while order:
            finished = self.engine.step()
            if not finished and not self.engine.has_unfinished():
                raise RuntimeError(f"engine went idle with {len(order)} request(s) unanswered")
            for out in finished:
                if out.request_id in order:
                    results[order.pop(out.request_id)] = out
                    progress.update(1)
        progress.close()
        return results


def _progress(total: int, use_tqdm: bool) -> tqdm:
    """A requests-done bar on stderr; silent when asked or when stderr is not a terminal."""
    return tqdm(total=total, desc="generate", unit="req", dynamic_ncols=True, disable=None if use_tqdm else True)
