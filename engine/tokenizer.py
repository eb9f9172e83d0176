"""Text <-> token ids through the `tokenizers` library (no transformers at runtime).

`encode` adds what the tokenizer itself is configured to add: the post-processor in
tokenizer.json (Llama 3 adds <|begin_of_text|> there) and `add_bos_token` from
tokenizer_config.json, as `AutoTokenizer(text)` would; nothing else.
"""
from __future__ import annotations

import json
import os

from tokenizers import Tokenizer as _HFTokenizer


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _ids(value) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _token_str(value) -> str | None:
    """tokenizer_config stores special tokens as a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(
        self,
        tokenizer: _HFTokenizer,
        bos_token_id: int | None = None,
        eos_token_ids: tuple[int, ...] = (),
        add_bos_token: bool | None = None,
    ):
        self._tok = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        # None: trust the post-processor; True/False: force BOS on/off as tokenizer_config says.
        self.add_bos_token = add_bos_token

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # add_bos_token=False turns the post-processor's specials off, as transformers does.
        ids = self._tok.encode(text, add_special_tokens=self.add_bos_token is not False).ids
        bos = self.bos_token_id
        if self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def detokenizer(self, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a stream of generated ids into text deltas (vLLM's prefix/read offset scheme).

    Decoding a token alone is wrong for byte-level BPE (a UTF-8 character can span tokens,
    and some tokenizers change a token's text by its left neighbour), so each step decodes a
    short window `ids[prefix:]` and emits what it adds beyond `ids[prefix:read]`; a trailing
    U+FFFD means an incomplete character, which is held back until the next token completes it.
    """

    _CONTEXT = 5  # prompt tokens kept as left context for the first decode

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids or [])[-self._CONTEXT :]
        self._prefix = 0
        self._read = len(self._ids)
        self.text = ""  # all text emitted so far

    def add(self, new_ids: list[int]) -> str:
        """Append generated ids; return the newly completed text (may be empty)."""
        self._ids.extend(new_ids)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        full_text = self._tok.decode(self._ids[self._prefix :], self._skip)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        delta = full_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At the end of generation, emit whatever is held back (replacement chars included)."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        full_text = self._tok.decode(self._ids[self._prefix :], self._skip)
        delta = full_text[len(prefix_text) :]
        self._prefix = self._read = len(self._ids)
        self.text += delta
        return delta


def load_tokenizer(path: str) -> Tokenizer | None:
    """The tokenizer in `path`, or None when it has no tokenizer.json (token-id prompts only)."""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        return None
    try:
        tok = _HFTokenizer.from_file(file)
    except Exception as e:  # the Rust side raises a bare Exception on malformed files
        raise ValueError(f"{file}: cannot load tokenizer ({e})") from None

    tcfg = _read_json(os.path.join(path, "tokenizer_config.json"))
    cfg = _read_json(os.path.join(path, "config.json"))
    gen = _read_json(os.path.join(path, "generation_config.json"))
    eos = _ids(gen.get("eos_token_id")) + _ids(cfg.get("eos_token_id"))
    bos = (_ids(gen.get("bos_token_id")) + _ids(cfg.get("bos_token_id")))[:1]
    for key, out in (("eos_token", eos), ("bos_token", bos)):
        name = _token_str(tcfg.get(key))
        tid = tok.token_to_id(name) if name else None
        if tid is not None and tid not in out:
            out.append(tid)
    add_bos = tcfg.get("add_bos_token")
    return Tokenizer(
        tok,
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=tuple(dict.fromkeys(eos)),
        add_bos_token=add_bos if isinstance(add_bos, bool) else None,
    )
