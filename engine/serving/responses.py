"""OpenAI response objects (whole and streamed) for /v1/completions and /v1/chat/completions."""
from __future__ import annotations

import time

from kvtier.engine.serving.openai_protocol import usage
from kvtier.engine.serving.tool_calls import parse_tool_calls, streamable_prefix


class ResponseBuilder:
    """Accumulates one request's chunks and shapes what the client gets."""

    def __init__(self, kind: str, model: str, chat: bool, tokenizer, logprobs: int | None, tools: bool = False):
        self.prefix, self.model, self.chat, self.tools = kind, model, chat, tools
        self.id = f"{kind}-{time.time_ns():x}"
        self.created = int(time.time())
        self._tok, self._top = tokenizer, logprobs
        self.text = ""
        self._streamed = 0  # chars of self.text already streamed
        self._token_ids: list[int] = []
        self._logprobs: list[dict] = []

    def add(self, chunk) -> None:
        self.text += chunk.text
        self._token_ids += chunk.token_ids
        if chunk.logprobs:
            self._logprobs += chunk.logprobs

    # ---- whole responses ----------------------------------------------------------------
    def full_response(self, out, num_prompt: int) -> dict:
        completion = out.outputs[0]
        lp = self._format_logprobs(completion.token_ids, completion.logprobs)
        if self.chat:
            message, finish = self._message(completion.text, completion.finish_reason)
            choice = {"index": 0, "message": message, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": completion.text, "logprobs": lp,
                      "finish_reason": completion.finish_reason, "stop_reason": completion.stop_reason}
        return {**self._head(False), "choices": [choice], "usage": usage(out, num_prompt)}

    def _message(self, text: str, finish: str):
        if self.tools:
            content, calls = parse_tool_calls(text)
            if calls:
                return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
        return {"role": "assistant", "content": text}, finish

    # ---- streaming --------------------------------------------------------------------
    def role_chunk(self) -> dict:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def stream_pieces(self, chunk) -> list[dict]:
        """The SSE objects for one StreamChunk (the last one carries finish_reason)."""
        self.add(chunk)
        final = chunk.output is not None
        lp = self._format_logprobs(chunk.token_ids, chunk.logprobs) if chunk.logprobs else None
        if not self.chat:
            if not chunk.text and not final and lp is None:
                return []
            finish = chunk.output.outputs[0].finish_reason if final else None
            return [{**self._head(True), "choices": [{"index": 0, "text": chunk.text, "logprobs": lp,
                                                     "finish_reason": finish}]}]
        # With tools, content stops streaming where a tool call begins; calls go out at the end.
        upto = streamable_prefix(self.text) if self.tools and not final else len(self.text)
        pieces = []
        if final and self.tools:
            content, calls = parse_tool_calls(self.text)
            if calls:
                content, sent = content or "", self.text[:self._streamed]
                text = content[len(sent):] if content.startswith(sent) else ""
                delta = {"content": text} if text else {}
                delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
                return [self._chunk(delta, None, lp), self._chunk({}, "tool_calls")]
        new = self.text[self._streamed:upto]
        self._streamed = max(self._streamed, upto)
        if new or lp:
            pieces.append(self._chunk({"content": new}, None, lp))
        if final:
            pieces.append(self._chunk({}, chunk.output.outputs[0].finish_reason))
        return pieces

    def usage_chunk(self, out, num_prompt: int) -> dict:
        return {**self._head(True), "choices": [], "usage": usage(out, num_prompt)}

    def _chunk(self, delta: dict, finish, lp=None) -> dict:
        return {**self._head(True), "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

    def _head(self, streaming: bool) -> dict:
        obj = ("chat.completion.chunk" if streaming else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # ---- logprobs -----------------------------------------------------------------------
    def _format_logprobs(self, token_ids, logprobs):
        if self._top is None or logprobs is None:
            return None
        rows = []
        for tid, entry in zip(token_ids, logprobs):
            top = sorted(entry.items(), key=lambda kv: kv[1].rank)[:self._top] if self._top else []
            rows.append((tid, entry[tid].logprob, [(self._decode(t), lp.logprob) for t, lp in top]))
        if self.chat:
            return {"content": [{"token": self._decode(tid), "logprob": lp, "bytes": list(self._decode(tid).encode()),
                                 "top_logprobs": [_chat_top(t, v) for t, v in top]}
                                for tid, lp, top in rows]}
        return {"tokens": [self._decode(tid) for tid, _, _ in rows], "token_logprobs": [lp for _, lp, _ in rows],
                "top_logprobs": [dict(top) for _, _, top in rows], "text_offset": None}

    def _decode(self, tid: int) -> str:
        return self._tok.decode([tid], skip_special_tokens=False) if self._tok is not None else str(tid)


def _chat_top(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
