"""The engine behind an asyncio server: one thread owns the Engine and runs its step loop.

The Engine is not thread-safe, so nothing else touches it: the event loop hands work to the
loop thread as commands (add, abort, run a function) and gets results back through futures
and per-request asyncio queues. After every step the loop thread publishes, for each live
request, the tokens it gained since the last step and the text they complete.

Given a factory, the loop thread also builds the Engine. Each thread that runs a parallel
torch op gets its own OpenMP team, and once a process holds more OpenMP threads than cores
libgomp cuts every team's spin at barriers from GOMP_SPINCOUNT to 100: a model loaded on the
main thread and run on the loop thread made the server's forward passes 5-15% slower than
the same passes offline (README, "kvtier serve under load").
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from kvtier.engine.engine_core import Engine
from kvtier.engine.outputs import RequestOutput
from kvtier.engine.sampling_params import SamplingParams
from kvtier.engine.serving.arrival_gather import ArrivalGather, gather
from kvtier.kvstore.faults import FaultLog

log = logging.getLogger("kvtier.serve")

IDLE_WAIT_S = 0.05  # idle loop period: parked requests still need their TTL ticks


@dataclass
class StreamChunk:
    """What one request gained in one step. `output` is set on the last chunk only."""

    text: str
    token_ids: list[int]
    logprobs: list[dict] | None = None  # one {token_id: Logprob} per new token
    output: RequestOutput | None = None
    error: str | None = None  # the engine failed (not the request's fault)


@dataclass
class _Tracked:
    """Loop-thread state of one streamed request."""

    stream: asyncio.Queue
    detok: object
    holdback: int  # chars withheld: a stop string may still complete and cut them
    interval: int = 1  # tokens per delta after the first; 0: the final chunk only
    sent_tokens: int = 0
    sent_text: str = ""
    pending_text: str = ""  # decoded but withheld
    lp: list = field(default_factory=list)


class AsyncEngine:
    def __init__(self, engine: Engine | Callable[[], Engine], gather_window: float = 1.5):
        """engine: an Engine, or a function that builds one, called on the loop thread (the
        better choice: the process then keeps one OpenMP team, see above); its exception is
        raised here. gather_window: how long an idle engine waits for requests arriving
        together (arrival_gather.py); 0 starts every step at once. The loop runs from here
        on; start() attaches it to the event loop, shutdown() or close() ends it."""
        self.gather = ArrivalGather(gather_window)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._tracked: dict[str, _Tracked] = {}
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = threading.Event()
        self.num_unfinished = 0  # event-loop side: requests submitted and not yet ended
        self.num_aborted = 0  # loop-thread side: requests that ended aborted (client gone, shutdown)
        self.faults = FaultLog(log)  # engine steps that raised: counted by kind, logged rate-limited
        self.engine = engine if isinstance(engine, Engine) else None
        failed: list[BaseException] = []
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(engine, failed, ready), name="kvtier-engine-loop",
                                        daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            raise failed[0]
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.max_num_seqs = self.engine.config.max_num_seqs

    # ---- event-loop side --------------------------------------------------------------
    def start(self) -> None:
        """Attach to the running event loop: requests can come from here on."""
        self._loop = asyncio.get_running_loop()

    async def call(self, fn):
        """Run fn(engine) on the loop thread and return its result (or raise its exception)."""
        fut = self._loop.create_future()
        self._commands.put((fn, fut))
        self._wake.set()
        return await fut

    async def generate(self, prompt, params: SamplingParams, request_id: str, stream_interval: int = 1):
        """Submit a request, then yield its StreamChunks: the first token as soon as it is
        made, then every `stream_interval` tokens, and the end (0: the end only, for a
        client that waits for the whole answer). Closing the generator early (the client
        went away) aborts the request, which frees its blocks in the next step."""
        if isinstance(stream_interval, bool) or not isinstance(stream_interval, int) or stream_interval < 0:
            raise ValueError(f"stream_interval: must be an integer >= 0, got {stream_interval!r}")
        stream: asyncio.Queue = asyncio.Queue()
        self.num_unfinished += 1
        finished = False
        at = time.monotonic()
        try:
            await self.call(lambda eng: self._add(eng, prompt, params, request_id, stream, at, stream_interval))
            while True:
                chunk = await stream.get()
                yield chunk
                if chunk.output is not None or chunk.error is not None:
                    finished = True
                    return
        finally:
            self.num_unfinished -= 1
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Thread-safe, fire and forget."""
        self._commands.put((lambda eng: self._abort(eng, request_id), None))
        self._wake.set()

    async def shutdown(self, grace_s: float) -> None:
        """Let running requests finish for up to grace_s, abort the rest, close the engine."""
        deadline = time.monotonic() + grace_s
        while self.num_unfinished and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.get_running_loop().run_in_executor(None, self.close, grace_s + 30)

    def close(self, timeout_s: float = 30.0) -> None:
        """Abort what is left and close the engine (its tiers flush); for an engine never
        started too. Safe to call twice."""
        self._stopping = True
        self._wake.set()
        self._closed.wait(timeout_s)

    # ---- loop-thread side ---------------------------------------------------------------
    def _add(self, eng: Engine, prompt, params, request_id, stream, at: float, interval: int) -> None:
        req = eng.add_request(prompt, params, request_id)
        self.gather.arrived(at)
        stops = params.stop or []
        holdback = max((len(s) for s in stops), default=1) - 1
        self._tracked[req.request_id] = _Tracked(stream, self.tokenizer.detokenizer(req.prompt_token_ids),
                                                 holdback, interval)

    def _abort(self, eng: Engine, request_id: str) -> None:
        eng.abort(request_id)

    def _send(self, tracked: _Tracked, chunk: StreamChunk) -> None:
        self._loop.call_soon_threadsafe(tracked.stream.put_nowait, chunk)

    def _run(self, make_engine, failed: list, ready: threading.Event) -> None:
        try:
            if self.engine is None:
                self.engine = make_engine()
        except BaseException as e:  # a bad model dir or tier: the constructor raises it
            failed.append(e)
            self._closed.set()
            return
        finally:
            ready.set()
        try:
            while not (self._stopping and not self._tracked):
                if self._stopping:
                    for rid in list(self._tracked):
                        self.engine.abort(rid)
                self._run_commands()
                try:
                    busy = self.engine.has_unfinished() or bool(self._tracked)
                    outputs = self.engine.step()
                    self._publish(outputs)
                except Exception as e:  # a bug in a step must not kill the server: fail the live requests
                    self.faults.record("engine step", e)
                    for rid, tracked in list(self._tracked.items()):
                        self._send(tracked, StreamChunk("", [], error=f"engine error: {e}"))
                        self.engine.requests.pop(rid, None)
                    self._tracked.clear()
                    busy = False
                if not busy:
                    if self._wake.wait(IDLE_WAIT_S):
                        self._run_commands()
                        if self.engine.scheduler.waiting:
                            gather(self.gather, self._wait_for_command, time.monotonic)
                    self._wake.clear()
        finally:
            try:
                self.engine.close()  # drains the tier writers
            finally:
                self._closed.set()

    def _wait_for_command(self, timeout: float) -> None:
        self._wake.clear()
        self._wake.wait(timeout)
        self._run_commands()

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result, error = fn(self.engine), None
            except Exception as e:  # ValueError for bad input; the caller turns it into a 400
                result, error = None, e
            if fut is not None:
                self._loop.call_soon_threadsafe(_settle, fut, result, error)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        # One hand-over to the event loop per step, not one per request: each
        # call_soon_threadsafe wakes the loop through its self-pipe.
        batch = []
        for rid, tracked in self._tracked.items():
            req = self.engine.requests.get(rid)
            if req is not None and _due(tracked, len(req.output_token_ids)):
                batch.append((tracked.stream, self._delta(tracked, req.output_token_ids, req.logprobs)))
        for out in outputs:
            tracked = self._tracked.pop(out.request_id, None)
            if tracked is None:
                continue
            completion = out.outputs[0]
            self.num_aborted += completion.finish_reason == "abort"
            chunk = self._delta(tracked, completion.token_ids, completion.logprobs, final_text=completion.text)
            chunk.output = out
            batch.append((tracked.stream, chunk))
        if batch:
            self._loop.call_soon_threadsafe(_deliver, batch)

    def _delta(self, tracked: _Tracked, token_ids, logprobs, final_text: str | None = None) -> StreamChunk:
        new_ids = list(token_ids[tracked.sent_tokens:])
        new_lp = list(logprobs[tracked.sent_tokens:len(token_ids)]) if logprobs is not None else None
        tracked.sent_tokens = len(token_ids)
        if final_text is not None:
            # The engine's text is cut at the stop string; we never sent past it (holdback).
            text = final_text[len(tracked.sent_text):] if final_text.startswith(tracked.sent_text) else ""
        else:
            tracked.pending_text += tracked.detok.add(new_ids)
            keep = len(tracked.pending_text) - tracked.holdback
            text, tracked.pending_text = tracked.pending_text[:max(keep, 0)], tracked.pending_text[max(keep, 0):]
        tracked.sent_text += text
        return StreamChunk(text, new_ids, new_lp)


def _due(tracked: _Tracked, num_tokens: int) -> bool:
    """Whether a request's unsent tokens go out now (its end always does, separately)."""
    gained = num_tokens - tracked.sent_tokens
    if gained <= 0 or tracked.interval == 0:
        return False
    return tracked.sent_tokens == 0 or gained >= tracked.interval


def _deliver(batch: list[tuple[asyncio.Queue, StreamChunk]]) -> None:
    for stream, chunk in batch:
        stream.put_nowait(chunk)


def _settle(fut: asyncio.Future, result, error) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
