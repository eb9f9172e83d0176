"""Tool calls in model output, Hermes / Qwen style:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A block whose JSON does not parse stays in the content: the client sees what the model wrote.
"""
from __future__ import annotations

import json
import re
import uuid

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
_BLOCK = re.compile(re.escape(TOOL_CALL_START) + r"\s*(.*?)\s*(?:" + re.escape(TOOL_CALL_END) + r"|$)", re.S)


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """Split output text into (content, OpenAI tool_calls). The content is the text outside
    the parsed blocks (None when nothing is left); an unterminated last block is parsed too,
    since generation may stop at the end marker without emitting it."""
    calls, kept, pos = [], [], 0
    for m in _BLOCK.finditer(text):
        call = _to_call(m.group(1))
        if call is None:
            continue
        kept.append(text[pos:m.start()])
        pos = m.end()
        calls.append(call)
    kept.append(text[pos:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


def _to_call(payload: str) -> dict | None:
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    # OpenAI carries arguments as a JSON string.
    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": args}}


def streamable_prefix(text: str) -> int:
    """How much of `text` can be streamed as plain content: everything before a tool-call
    block, minus a tail that might be the start of one still being generated."""
    start = text.find(TOOL_CALL_START)
    if start >= 0:
        return start
    for k in range(min(len(TOOL_CALL_START) - 1, len(text)), 0, -1):
        if TOOL_CALL_START.startswith(text[-k:]):
            return len(text) - k
    return len(text)
