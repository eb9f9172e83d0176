"""OpenAI request bodies -> engine arguments, and OpenAI-style error objects.

Bodies are plain dicts (parsed JSON) checked field by field, so every rejection names the
offending field in `param`, as the OpenAI API does.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

from kvtier import ParkParams
from kvtier.engine.sampling_params import SamplingParams

MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.headers = message, status, param, code, headers
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error",
                              404: "not_found_error", 429: "rate_limit_error"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class GenerationRequest:
    """What the endpoints need beyond SamplingParams."""

    params: SamplingParams
    stream: bool
    include_usage: bool
    cache_salt: str | None
    logprobs: int | None  # completions: top-n per token; chat: top_logprobs when logprobs=true


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    ok = _is_int(value) if integer else (isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise ApiError(f"{name}: must be {kind} in [{lo}, {hi}], got {value!r}", param=name)
    return value


def _flag(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(f"{name}: must be true or false, got {value!r}", param=name)
    return value


def check_model(body: dict, served: str) -> None:
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError("model: required, a string", param="model")
    if model != served:
        raise ApiError(f"The model `{model}` does not exist (this server has `{served}`)", param="model",
                       code="model_not_found")


def parse_generation(body: dict, chat: bool) -> GenerationRequest:
    """Sampling fields shared by /v1/completions and /v1/chat/completions."""
    if _number(body, "n", 1, 1, 1, integer=True) != 1:  # pragma: no cover - range check raises first
        raise ApiError("n: only 1 is supported", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0, -2, 2) != 0:
            raise ApiError(f"{name}: not supported by this server (only 0)", param=name)
    if chat:
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if _flag(body, "logprobs"):
            logprobs = _number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
        else:
            logprobs = None
            if body.get("top_logprobs") is not None:
                raise ApiError("top_logprobs: needs logprobs=true", param="top_logprobs")
        default_max = None  # until the context is full, as the OpenAI chat API does
    else:
        max_tokens = body.get("max_tokens")
        logprobs = _number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
        default_max = 16
        if _flag(body, "echo"):
            raise ApiError("echo: not supported by this server", param="echo")
    name = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({name: max_tokens}, name, default_max, 1, 1 << 31, integer=True)
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list)
                                                           and all(isinstance(s, str) and s for s in stop))):
        raise ApiError("stop: must be a string or a list of non-empty strings", param="stop")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError("stream_options: must be an object", param="stream_options")
    stream = _flag(body, "stream")
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ApiError("cache_salt: must be a non-empty string", param="cache_salt")
    try:
        params = SamplingParams(
            temperature=_number(body, "temperature", 1.0, 0, 2),
            top_p=_number(body, "top_p", 1.0, 0, 1),
            top_k=_number(body, "top_k", 0, -1, 1 << 31, integer=True),
            min_p=_number(body, "min_p", 0.0, 0, 1),
            seed=body.get("seed"),
            max_tokens=max_tokens,
            stop=stop,
            ignore_eos=_flag(body, "ignore_eos"),
            logprobs=logprobs,
            deterministic=body.get("deterministic"),  # docs/determinism.md; extra_body on OpenAI clients
        )
    except ValueError as e:  # SamplingParams names the field first: "top_p: must be ..."
        raise ApiError(str(e), param=str(e).split(":")[0]) from None
    return GenerationRequest(params, stream, stream and _flag(options, "include_usage"), salt, logprobs)


def park_params(body: dict, tool: str) -> ParkParams:
    """Parking for a request that may end in a tool call; `ttl_s` and `expected_pause_s`
    come from the body (the OpenAI client's extra_body)."""
    kwargs = {k: body[k] for k in ("ttl_s", "expected_pause_s") if body.get(k) is not None}
    try:
        return ParkParams(tool=tool, **kwargs)
    except ValueError as e:
        raise ApiError(str(e), param=str(e).split(":")[0].removeprefix("park.")) from None


def completion_prompt(body: dict) -> str | list[int]:
    """One prompt: a string, a list of token ids, or a one-element list of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        return [int(t) for t in prompt]
    raise ApiError("prompt: must be one non-empty string or list of token ids (batches are not supported)",
                   param="prompt")


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages: must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise ApiError(f"messages[{i}]: needs a role of system, developer, user, assistant or tool",
                           param="messages")
        m = dict(m)
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            m["content"] = "".join(parts)
        elif content is not None and not isinstance(content, str):
            raise ApiError(f"messages[{i}].content: must be a string or a list of text parts", param="messages")
        out.append(m)
    return out


def chat_tools(body: dict) -> list[dict] | None:
    tools = body.get("tools")
    if tools is None or body.get("tool_choice") == "none":
        return None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
            for t in tools):
        raise ApiError("tools: must be a list of {\"type\": \"function\", \"function\": {\"name\": ...}}",
                       param="tools")
    return tools or None


def usage(out, num_prompt: int) -> dict:
    """OpenAI usage plus kvtier's `kv_sources`: prompt tokens by where their KV came from."""
    completion = len(out.outputs[0].token_ids)
    return {"prompt_tokens": num_prompt, "completion_tokens": completion, "total_tokens": num_prompt + completion,
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}, "kv_sources": out.kv_sources}
