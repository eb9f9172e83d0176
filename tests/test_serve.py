"""`kvtier serve`: a real server process on port 0, driven by the official openai client."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

import httpx
import openai

from kvtier.engine.llm import LLM
from kvtier.engine.make_model import make_model
from kvtier.engine.serving.chat_template import DEFAULT_TEMPLATE, ChatTemplate
from kvtier.engine.serving.tool_calls import parse_tool_calls, streamable_prefix

KEY = "test-key"
MODEL = "tiny"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("serve") / "model"), "llama", "tiny")


@pytest.fixture(scope="module")
def server(model_dir):
    """A server with a 128-block device pool, a CPU tier, 2 running + 1 waiting request at most,
    streams sending tokens in pairs after the first."""
    cmd = [sys.executable, "-m", "kvtier.engine.cli", "serve", "--model", model_dir, "--port", "0",
           "--served-model-name", MODEL, "--api-key", KEY, "--max-queue", "1", "--max-num-seqs", "2",
           "--kv-tier", "cpu:64MiB", "--kv-cache-memory", "1MiB", "--max-model-len", "1024",
           "--shutdown-grace", "2", "--stream-interval", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    line = proc.stdout.readline()
    match = re.search(r"listening on (http://\S+)", line)
    if match is None:
        proc.kill()
        pytest.fail(f"server did not start: {line!r} {proc.stderr.read()[-2000:]}")
    url = match.group(1)
    yield url
    # SIGTERM with a request in flight: it finishes or is aborted within --shutdown-grace,
    # the engine closes (tiers flushed), the process exits 0.
    in_flight = _open_long_stream(url, 99)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()[-2000:]
    assert "kvtier serve: stopped" in proc.stderr.read()
    in_flight.__exit__(None, None, None)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


def _metrics(server) -> dict[str, float]:
    text = httpx.get(server + "/metrics").text
    return {name: float(v) for name, v in re.findall(r"^(kvtier_\w+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


def _post(server, path, body, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server + path, content=body if isinstance(body, str) else json.dumps(body),
                      headers=headers, timeout=30)


def test_completions_and_chat_streaming_equals_whole(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    whole = client.completions.create(model=MODEL, prompt="hello world", max_tokens=8, temperature=0)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 8
    streamed = client.completions.create(model=MODEL, prompt="hello world", max_tokens=8, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text

    msgs = [{"role": "user", "content": "say something"}]
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_completion_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2)
    assert chat.choices[0].message.role == "assistant"
    assert len(chat.choices[0].logprobs.content) == 6
    assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == chat.usage.prompt_tokens


def test_stream_interval_sends_the_first_token_alone_then_pairs(client):
    chunks = list(client.completions.create(model=MODEL, prompt="hello world", max_tokens=9, temperature=0,
                                            stream=True, logprobs=1))
    assert [len(c.choices[0].logprobs.tokens) for c in chunks] == [1, 2, 2, 2, 2]


def test_stop_string_cuts_whole_and_streamed_text_alike(client):
    full = client.completions.create(model=MODEL, prompt="once upon", max_tokens=12, temperature=0).choices[0].text
    stop = full[4:7]  # a piece of the greedy output, reached after a few tokens
    whole = client.completions.create(model=MODEL, prompt="once upon", max_tokens=12, temperature=0, stop=stop)
    streamed = client.completions.create(model=MODEL, prompt="once upon", max_tokens=12, temperature=0, stop=stop,
                                         stream=True)
    assert whole.choices[0].finish_reason == "stop" and whole.choices[0].text == full[:full.index(stop)]
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_concurrent_clients_match_offline_generate(client, model_dir):
    prompts = [[5 + i, 40 + 3 * i, 77, 100 + i, 9] * (2 + i) for i in range(3)]
    results = [None] * len(prompts)

    def ask(i):
        results[i] = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=12, temperature=0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with LLM(model_dir, kv_tiers=None) as llm:
        from kvtier import SamplingParams
        offline = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert [r.choices[0].text for r in results] == [o.outputs[0].text for o in offline]


def test_repeat_request_reports_cached_tokens(client):
    prompt = "a prompt long enough to fill a few blocks of sixteen tokens each, and then some more words"
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens >= 32
    assert second.usage.prompt_tokens_details.cached_tokens >= 16
    assert second.usage.model_extra["kv_sources"]["device"] >= 16
    # extra_body cache_salt: another tenant's KV is never reused
    salted = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0,
                                       extra_body={"cache_salt": "tenant-b"})
    assert salted.usage.prompt_tokens_details.cached_tokens == 0


def _open_long_stream(server, tag: int):
    body = {"model": MODEL, "prompt": f"long {tag}", "max_tokens": 900, "ignore_eos": True, "stream": True}
    ctx = httpx.stream("POST", server + "/v1/completions", json=body,
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    resp = ctx.__enter__()
    assert resp.status_code == 200
    lines = resp.iter_lines()
    while not next(lines).startswith("data: "):
        pass
    ctx.lines = lines  # keep the line iterator alive: collecting it would close the response
    return ctx


def _wait_idle(server, blocks_free: float):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = _metrics(server)
        if m["kvtier_engine_requests"] == 0 and m["kvtier_kv_free_blocks"] == blocks_free:
            return m
        time.sleep(0.05)
    pytest.fail(f"request not aborted: {m}")


def test_disconnect_mid_stream_frees_blocks(server):
    before = _metrics(server)
    total = before["kvtier_kv_blocks"]
    stream = _open_long_stream(server, 1)
    busy = _metrics(server)
    assert busy["kvtier_engine_requests"] == 1 and busy["kvtier_kv_free_blocks"] < total
    stream.__exit__(None, None, None)  # the client goes away after one chunk
    after = _wait_idle(server, total)
    assert after["kvtier_requests_aborted_total"] == before["kvtier_requests_aborted_total"] + 1


def test_disconnect_while_waiting_for_a_whole_response_aborts(server):
    before = _metrics(server)
    body = {"model": MODEL, "prompt": "long wait", "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(5, read=0.3))
    after = _wait_idle(server, before["kvtier_kv_blocks"])
    assert after["kvtier_requests_aborted_total"] == before["kvtier_requests_aborted_total"] + 1


def test_queue_full_answers_429(server, client):
    total = _metrics(server)["kvtier_kv_blocks"]
    running = [_open_long_stream(server, i) for i in (2, 3)]  # --max-num-seqs 2: both run
    waiting = threading.Thread(target=lambda: _post(server, "/v1/completions",
                                                    {"model": MODEL, "prompt": "wait", "max_tokens": 2}))
    waiting.start()  # --max-queue 1: this one waits
    deadline = time.monotonic() + 10
    while _metrics(server)["kvtier_requests_in_flight"] < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": "one too many", "max_tokens": 2})
    assert r.status_code == 429 and r.headers["retry-after"] and r.json()["error"]["type"] == "rate_limit_error"
    for s in running:
        s.__exit__(None, None, None)
    waiting.join(timeout=20)
    _wait_idle(server, total)


@pytest.mark.parametrize("body, param", [
    ({"model": "nope", "prompt": "x"}, "model"),
    ({"model": MODEL, "prompt": "x", "temperature": 5}, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "prompt": list(range(3, 1100))}, "prompt"),  # longer than --max-model-len
    ({"model": MODEL, "messages": "hi"}, "messages"),
    ({"model": MODEL, "prompt": [1, 2, 99999]}, None),  # out of vocabulary: the engine refuses it
    ({"model": MODEL, "prompt": "x", "deterministic": "yes"}, "deterministic"),
    ({"model": MODEL, "prompt": "x", "deterministic": True}, None),  # the server runs without --deterministic
])
def test_bad_requests_answer_400(server, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = _post(server, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_invalid_json_and_auth(server):
    r = _post(server, "/v1/completions", "{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert _post(server, "/v1/completions", {"model": MODEL, "prompt": "x"}, key=None).status_code == 401
    assert _post(server, "/v1/completions", {"model": MODEL, "prompt": "x"}, key="wrong").status_code == 401
    assert httpx.get(server + "/health").status_code == 200  # open: load balancers probe it
    ids = _post(server, "/tokenize", {"prompt": "hello"}).json()["tokens"]
    assert _post(server, "/detokenize", {"tokens": ids}).json()["prompt"] == "hello"


def test_tool_turn_parks_and_next_turn_resumes_it(client, server):
    """With random weights the model never writes a real tool call, so this proves the
    parking path, not the model: a request with `tools` parks at its end, and the follow-up
    (the conversation with the assistant turn as returned plus a tool result) resumes it, its
    cached tokens covering the whole first turn, prompt and output, including the partial
    last block that plain prefix caching would have to recompute."""
    msgs = [{"role": "user", "content": "what is the weather in Paris?"}]
    first = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=7,
                                           temperature=0, extra_body={"expected_pause_s": 5})
    turn = first.usage.prompt_tokens + first.usage.completion_tokens
    assert turn % 16 != 0  # a partial block: only parking keeps it
    assert _metrics(server)["kvtier_parked_requests"] == 1
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    second = client.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, max_tokens=3, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # The last sampled token was never fed to the model, so it has no KV: turn - 1 is all
    # there is; prefix caching alone would stop at the last full block.
    assert cached >= turn - 1 and cached > turn // 16 * 16


def test_tool_call_parsing_and_template():
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert parse_tool_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert streamable_prefix("hello <tool") == len("hello ")
    rendered = ChatTemplate(DEFAULT_TEMPLATE).render(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
         {"role": "tool", "content": "sunny"}], TOOLS)
    assert '"name": "get_weather"' in rendered and "<tool_call>" in rendered
    assert "<tool_response>\nsunny\n</tool_response>" in rendered and rendered.endswith("<|im_start|>assistant\n")


def test_cpu_tier_serves_a_prompt_evicted_from_the_device(client):
    """--kv-tier cpu:64MiB: after other prompts push the first out of the 128-block device
    pool, repeating it loads its KV from the CPU tier."""

    first = [7, 8, 9] + [30 + (i % 200) for i in range(400)]
    client.completions.create(model=MODEL, prompt=first, max_tokens=1)
    for k in range(6):
        client.completions.create(model=MODEL, prompt=[11 + k] + [250 + ((i * (k + 3)) % 200) for i in range(400)],
                                  max_tokens=1)
    again = client.completions.create(model=MODEL, prompt=first, max_tokens=1)
    assert again.usage.model_extra["kv_sources"].get("cpu", 0) >= 256, again.usage


def test_tool_call_output_becomes_tool_calls_whole_and_streamed():
    """The response shaping for a model that does write a tool call (fed text directly,
    since the random-weight model cannot): finish_reason "tool_calls", arguments as a JSON
    string, and in a stream no tool-call markup leaks into the content deltas."""
    from kvtier.engine.outputs import CompletionOutput, RequestOutput
    from kvtier.engine.serving.async_engine import StreamChunk
    from kvtier.engine.serving.responses import ResponseBuilder

    pieces = ["Checking", " now.<tool", '_call>\n{"name": "get_weather", ', '"arguments": {"city": "Paris"}}\n',
              "</tool_call>"]
    text = "".join(pieces)
    out = RequestOutput("r", None, [1], [CompletionOutput(0, text, [5] * 5, None, None, "stop", "</tool_call>")],
                        True, kv_sources={"device": 0, "computed": 1})
    whole = ResponseBuilder("chatcmpl", MODEL, chat=True, tokenizer=None, logprobs=None, tools=True)
    choice = whole.full_response(out, 1)["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Checking now."
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}

    streaming = ResponseBuilder("chatcmpl", MODEL, chat=True, tokenizer=None, logprobs=None, tools=True)
    events = []
    for i, piece in enumerate(pieces):
        events += streaming.stream_pieces(StreamChunk(piece, [5], output=out if i == len(pieces) - 1 else None))
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("content", "") for d in deltas) == "Checking now."
    assert [d["tool_calls"][0]["function"]["name"] for d in deltas if "tool_calls" in d] == ["get_weather"]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_make_model_writes_a_chat_template_with_tools(model_dir):
    template = ChatTemplate.for_model(model_dir)
    text = template.render([{"role": "user", "content": "weather?"}], tools=TOOLS, add_generation_prompt=True)
    assert "get_weather" in text and "<tool_call>" in text and text.endswith("<|im_start|>assistant\n")


def test_api_key_from_the_environment(model_dir):
    import os

    env = {**os.environ, "KVTIER_API_KEY": "from-env"}
    proc = subprocess.Popen([sys.executable, "-m", "kvtier.engine.cli", "serve", "--model", model_dir, "--port", "0",
                             "--no-kv-tiers"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = re.search(r"listening on (http://\S+)", proc.stdout.readline()).group(1)
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer from-env"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
