"""Token ids of parked turns, found again from the next turn's text.

Implicit resume needs the next turn's token ids to extend the parked sequence exactly, but a
client resends text: re-encoding the model's own output need not give back the tokens it
sampled (BPE has several spellings of one string). So for every turn that parked we keep
text -> ids (prompt text + output text -> prompt ids + output ids); a new chat prompt that
starts with a kept text reuses those ids and encodes only the rest.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict

MAX_TURNS = 256


class TurnTokens:
    def __init__(self, max_turns: int = MAX_TURNS):
        self._turns: OrderedDict[tuple, tuple[list[int], float]] = OrderedDict()
        self._max = max_turns
        self._lock = threading.Lock()

    def remember(self, salt: str | None, text: str, token_ids: list[int], ttl_s: float) -> None:
        with self._lock:
            self._turns[(salt, text)] = (list(token_ids), time.monotonic() + ttl_s)
            self._turns.move_to_end((salt, text))
            while len(self._turns) > self._max:
                self._turns.popitem(last=False)

    def encode(self, salt: str | None, text: str, encode, encode_more) -> list[int]:
        """Ids for `text`: the longest kept turn it extends plus encode_more(rest) (which adds
        no BOS), else encode(text)."""
        now, best = time.monotonic(), None
        with self._lock:
            for (s, kept), (ids, expires) in list(self._turns.items()):
                if expires < now:
                    del self._turns[(s, kept)]
                elif s == salt and len(kept) < len(text) and text.startswith(kept):
                    if best is None or len(kept) > len(best[0]):
                        best = (kept, ids)
        if best is None:
            return encode(text)
        return best[1] + encode_more(text[len(best[0]):])
