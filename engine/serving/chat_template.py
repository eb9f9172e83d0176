"""Chat templates: the model's own (tokenizer_config.json `chat_template` or chat_template.jinja),
rendered with jinja2 the way transformers' apply_chat_template does, else a default.

The default is ChatML with Hermes/Qwen-style tools (tools listed in the system turn inside
<tools></tools>; the model answers a call as <tool_call>{"name", "arguments"}</tool_call>;
tool results come back as a user turn in <tool_response></tool_response>). The generation
prompt is `<|im_start|>assistant\n`.
"""
from __future__ import annotations

import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role in ('system', 'developer') %}{{ messages[0].content }}

{% endif %}# Tools

You may call one or more functions. Function signatures are within <tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

For each call, return a JSON object with the function name and arguments within <tool_call></tool_call>:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role in ('system', 'developer') %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role in ('system', 'developer') and loop.first %}
{%- elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{% if m.content %}{{ m.content }}{% endif %}
{%- for call in m.tool_calls or [] %}{% if m.content or not loop.first %}
{% endif %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments if call.function.arguments is string else call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: no HTML escaping (jinja's default escapes < > &), unicode kept.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _token(value):
    return value.get("content") if isinstance(value, dict) else value


class ChatTemplate:
    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source
        self._template = env.from_string(source)
        self._specials = {"bos_token": bos_token or "", "eos_token": eos_token or ""}

    @classmethod
    def for_model(cls, model_dir: str) -> "ChatTemplate":
        """The model's template, else DEFAULT_TEMPLATE."""
        config = {}
        path = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default" | "tool_use", "template"}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("tool_use") or named.get("default")
        jinja_file = os.path.join(model_dir, "chat_template.jinja")
        if not isinstance(source, str) and os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                source = f.read()
        if not isinstance(source, str) or not source:
            source = DEFAULT_TEMPLATE
        return cls(source, _token(config.get("bos_token")), _token(config.get("eos_token")))

    def render(self, messages: list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = True, **extra) -> str:
        """ValueError when the template rejects the conversation (raise_exception, bad fields)."""
        try:
            return self._template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                         **self._specials, **extra)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat template: {e}") from None
