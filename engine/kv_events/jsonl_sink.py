"""KV events as JSON lines: one object per event, with the batch's timestamp and sequence
number, appended to a file (docs/kv_events.md lists the fields)."""
from __future__ import annotations

import json
import os

from kvtier.engine.kv_events.consumer import SubscriptionThread
from kvtier.kvstore.events import KVEventBatch, KVEventSubscription


class JsonlSink(SubscriptionThread):
    thread_name = "kvtier-kv-events-file"

    def __init__(self, subscription: KVEventSubscription, path: str):
        super().__init__(subscription)
        self.path = os.path.abspath(os.path.expanduser(path))
        # Opened here, so a bad path fails at engine start rather than on the thread.
        self._file = open(self.path, "a", encoding="utf-8")
        self._seq = 0
        self.start()

    def handle(self, batch: KVEventBatch) -> None:
        lines = [json.dumps({"ts": batch.ts, "seq": self._seq, **e.as_dict()}) for e in batch.events]
        self._seq += 1
        self._file.write("\n".join(lines) + "\n")
        self._file.flush()

    def finish(self) -> None:
        self._file.close()
