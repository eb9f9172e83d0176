"""The FastAPI app: OpenAI-compatible endpoints over an AsyncEngine.

Every error is answered as an OpenAI error object; an exception in a handler becomes a 500
for that request only. A client that goes away (streaming or not) aborts its request.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from kvtier.engine.serving import openai_protocol as proto
from kvtier.engine.serving.async_engine import AsyncEngine
from kvtier.engine.serving.chat_template import ChatTemplate
from kvtier.engine.serving.metrics import CONTENT_TYPE, ServerMetrics
from kvtier.engine.serving.openai_protocol import ApiError
from kvtier.engine.serving.responses import ResponseBuilder
from kvtier.engine.serving.tool_calls import TOOL_CALL_END
from kvtier.engine.serving.turn_tokens import TurnTokens

DISCONNECT_POLL_S = 0.1
_OPEN_PATHS = ("/health", "/metrics")


def create_app(engine: AsyncEngine, model_name: str, template: ChatTemplate, api_key: str | None = None,
               max_queue: int = 256, lifespan=None, stream_interval: int = 1) -> FastAPI:
    app = FastAPI(title="kvtier", lifespan=lifespan)
    turns = TurnTokens()
    created = int(time.time())
    server_metrics = ServerMetrics(engine)

    if api_key:
        app.add_middleware(_BearerAuth, api_key=api_key)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return _error(e)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        return _error(ApiError(f"internal error: {type(e).__name__}: {e}", 500))

    @app.get("/health")
    async def health():
        return PlainTextResponse("ok")

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(await server_metrics.render(engine), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "kvtier", "max_model_len": engine.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _json(request)
        _check_model_if_given(body, model_name)
        if isinstance(body.get("messages"), list):
            text = template.render(proto.chat_messages(body), proto.chat_tools(body),
                                   add_generation_prompt=body.get("add_generation_prompt", True) is True)
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            raise ApiError("prompt: a string (or messages: a list) is required", param="prompt")
        ids = _tokenizer(engine).encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _json(request)
        _check_model_if_given(body, model_name)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                for t in ids):
            raise ApiError("tokens: must be a list of token ids", param="tokens")
        return {"prompt": _tokenizer(engine).decode(ids)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json(request)
        proto.check_model(body, model_name)
        gen = proto.parse_generation(body, chat=False)
        prompt = proto.completion_prompt(body)
        ids = prompt if isinstance(prompt, list) else _tokenizer(engine).encode(prompt)
        builder = ResponseBuilder("cmpl", model_name, chat=False, tokenizer=engine.tokenizer, logprobs=gen.logprobs)
        return await _generate(request, ids, gen, builder)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json(request)
        proto.check_model(body, model_name)
        gen = proto.parse_generation(body, chat=True)
        tools = proto.chat_tools(body)
        try:
            text = template.render(proto.chat_messages(body), tools, add_generation_prompt=True)
        except ValueError as e:
            raise ApiError(str(e), param="messages") from None
        ids = turns.encode(gen.cache_salt, text, _tokenizer(engine).encode, lambda t: _encode_more(engine, t))
        if tools:
            # A tool call ends the turn: stop after its end marker (kept, for parsing) and park,
            # so the follow-up carrying the tool's result resumes from this turn's KV.
            gen.params.stop = list(gen.params.stop) + [TOOL_CALL_END]
            gen.params.include_stop_str_in_output = True
            gen.params.park = proto.park_params(body, tools[0]["function"]["name"])
        builder = ResponseBuilder("chatcmpl", model_name, chat=True, tokenizer=engine.tokenizer,
                                  logprobs=gen.logprobs, tools=bool(tools))

        def on_finish(out):
            if out.parked_id is not None:
                turns.remember(gen.cache_salt, text + out.outputs[0].text,
                               list(ids) + list(out.outputs[0].token_ids), gen.params.park.ttl_s)

        return await _generate(request, ids, gen, builder, on_finish)

    async def _generate(request: Request, ids: list[int], gen, builder: ResponseBuilder, on_finish=None):
        if len(ids) >= engine.max_model_len:
            raise ApiError(f"the prompt has {len(ids)} tokens; this model's context is {engine.max_model_len} "
                           "(prompt plus at least one generated token)", param="messages" if builder.chat
                           else "prompt", code="context_length_exceeded")
        if engine.num_unfinished >= engine.max_num_seqs + max_queue:
            raise ApiError(f"server busy: more than {max_queue} requests waiting", 429,
                           headers={"Retry-After": "1"})
        rid = f"{builder.prefix}-{uuid.uuid4().hex}"
        prompt = {"prompt_token_ids": ids, "cache_salt": gen.cache_salt}
        # A whole response is built from the final output: no per-step deltas for it.
        chunks = engine.generate(prompt, gen.params, rid, stream_interval if gen.stream else 0)
        if not gen.stream:
            return await _collect(request, builder, chunks, len(ids), on_finish)
        first = await _admitted(chunks)
        return StreamingResponse(_sse(builder, first, chunks, len(ids), gen.include_usage, on_finish),
                                 media_type="text/event-stream")

    return app


async def _admitted(chunks):
    """The first chunk; a request the engine refuses (bad input) fails here, as a 400."""
    try:
        return await chunks.__anext__()
    except ValueError as e:
        raise ApiError(str(e)) from None


async def _collect(request: Request, builder, chunks, num_prompt: int, on_finish):
    """Non-streaming: wait for the end, aborting if the client disconnects meanwhile."""
    # The end is the only chunk (no per-step deltas were asked for); the response is built
    # from its output.
    task = asyncio.ensure_future(_admitted(chunks))
    try:
        while not task.done():
            await asyncio.wait([task], timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await chunks.aclose()  # aborts the request in the engine
                return JSONResponse({}, status_code=499)
        last = task.result()
    finally:
        if not task.done():
            task.cancel()
        await chunks.aclose()
    if last.error is not None:
        raise ApiError(last.error, 500)
    out = last.output
    if out.outputs[0].finish_reason == "error":
        raise ApiError(out.error or "the request failed", 400)
    if on_finish:
        on_finish(out)
    return builder.full_response(out, num_prompt)


async def _sse(builder, first, chunks, num_prompt: int, include_usage: bool, on_finish):
    """Server-sent events; when the client goes away Starlette cancels this generator, and
    closing `chunks` aborts the request."""
    try:
        yield _event(builder.role_chunk()) if builder.chat else ""
        chunk = first
        while True:
            failed = chunk.output is not None and chunk.output.outputs[0].finish_reason == "error"
            if chunk.error is not None or failed:
                message = chunk.error or chunk.output.error or "the request failed"
                yield _event(ApiError(message, 500 if chunk.error else 400).body())
                break
            for piece in builder.stream_pieces(chunk):
                yield _event(piece)
            if chunk.output is not None:
                if on_finish:
                    on_finish(chunk.output)
                if include_usage:
                    yield _event(builder.usage_chunk(chunk.output, num_prompt))
                break
            chunk = await chunks.__anext__()
        yield "data: [DONE]\n\n"
    finally:
        await chunks.aclose()


class _BearerAuth:
    """Plain ASGI middleware (Starlette's BaseHTTPMiddleware would hide client disconnects
    from the endpoints): every path but /health and /metrics needs the API key."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in _OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = _error(ApiError("invalid or missing API key", 401, code="invalid_api_key"))
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _json(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(f"invalid JSON body: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError("the body must be a JSON object", code="invalid_json")
    return body


def _check_model_if_given(body: dict, served: str) -> None:
    if "model" in body:
        proto.check_model(body, served)


def _tokenizer(engine: AsyncEngine):
    # The tokenizers library is thread-safe for encoding; the loop thread's Engine is not touched.
    if engine.tokenizer is None:
        raise ApiError("this model has no tokenizer.json: send token ids")
    return engine.tokenizer


def _encode_more(engine: AsyncEngine, text: str) -> list[int]:
    """Encode text that continues earlier tokens: no BOS in the middle of a conversation."""
    tok = _tokenizer(engine)
    ids = tok.encode(text)
    return ids[1:] if ids and tok.bos_token_id is not None and ids[0] == tok.bos_token_id else ids
