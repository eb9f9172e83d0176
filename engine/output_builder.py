"""Detokenization, stop strings and logprobs: everything between sampled ids and RequestOutput."""
from __future__ import annotations

from kvtier.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from kvtier.engine.request import Request
from kvtier.engine.tokenizer import IncrementalDetokenizer, Tokenizer


class OutputBuilder:
    def __init__(self, tokenizer: Tokenizer | None):
        self.tokenizer = tokenizer
        # request id -> [its output text so far, output tokens already in it], for requests
        # with stop strings: each step decodes a few tokens, not the whole output again
        self._texts: dict[str, list] = {}

    def _decode(self, token_ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(token_ids)

    def hit_stop_string(self, req: Request) -> bool:
        """True once the output text contains one of the request's stop strings."""
        stops = req.sampling_params.stop
        if not stops or self.tokenizer is None:
            return False
        state = self._texts.get(req.request_id)
        if state is None:
            state = self._texts[req.request_id] = [self.tokenizer.detokenizer(req.prompt_token_ids), 0]
        text: IncrementalDetokenizer = state[0]
        before = len(text.text)
        text.add(req.output_token_ids[state[1] :])
        state[1] = len(req.output_token_ids)
        # A stop string found now ends inside the newly added text.
        start = max(0, before - max(len(s) for s in stops) + 1)
        for stop in stops:
            if text.text.find(stop, start) >= 0:
                req.stop_reason = stop
                return True
        return False

    def record_logprobs(self, req: Request, step_logprobs: dict[int, tuple[float, int]]) -> None:
        """step_logprobs: {token_id: (logprob, rank)} for the top-k plus the sampled token."""
        entry = {tid: Logprob(lp, rank) for tid, (lp, rank) in step_logprobs.items()}
        req.logprobs.append(entry)

    def build(self, req: Request) -> RequestOutput:
        self._texts.pop(req.request_id, None)
        text = self._decode(req.output_token_ids)
        stop = req.stop_reason
        if isinstance(stop, str):
            cut = text.find(stop)
            if cut >= 0:
                keep = cut + len(stop) if req.sampling_params.include_stop_str_in_output else cut
                text = text[:keep]
        cumulative = None
        if req.logprobs is not None:
            cumulative = 0.0
            for tid, entry in zip(req.output_token_ids, req.logprobs):
                cumulative += entry[tid].logprob
        completion = CompletionOutput(
            index=0,
            text=text,
            token_ids=list(req.output_token_ids),
            cumulative_logprob=cumulative,
            logprobs=req.logprobs,
            finish_reason=req.status.value,
            stop_reason=stop,
        )
        cached = max(req.num_cached_tokens, 0)
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=[completion],
            finished=True,
            num_cached_tokens=cached,
            metrics=RequestMetrics(req.arrival_time, req.first_token_time, req.finished_time),
            error=req.error,
            kv_sources=dict(req.kv_sources) or {"device": 0, "computed": req.num_prompt_tokens},
            parked_id=req.parked_id,
        )
