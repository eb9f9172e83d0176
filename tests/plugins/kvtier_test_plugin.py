"""A third-party connector, as a plugin author would write one: KV blocks kept in a dict.

Installed by tests through an entry point (group `kvtier.connectors`) or imported by path.
"""
from __future__ import annotations

from kvtier.connectors.base import ConnectorMetadata, ConnectorOutput, KVConnector, LoadResult


class DictConnector(KVConnector):
    def __init__(self, config, context):
        super().__init__(config, context)
        self.store: dict[bytes, object] = {}
        self.loads: list[tuple[str, list[int], list[bytes]]] = []
        self.saves: list[tuple[list[int], list[bytes]]] = []
        self.finished: dict[str, LoadResult] = {}
        self.num_loaded_blocks = 0

    def lookup(self, request, num_device_tokens):
        bs = self.context.block_size
        n = 0
        for h in request.block_hashes[num_device_tokens // bs : (request.num_tokens - 1) // bs]:
            if h not in self.store:
                break
            n += 1
        return n * bs

    def on_allocated(self, request, block_ids, num_external_tokens):
        bs = self.context.block_size
        first = request.num_computed_tokens // bs
        n = num_external_tokens // bs
        self.loads.append((request.request_id, block_ids[:n], request.block_hashes[first : first + n]))

    def request_blocks_saved(self, block_ids, block_hashes):
        self.saves.append((list(block_ids), list(block_hashes)))

    def build_metadata(self):
        meta = ConnectorMetadata()
        meta.plugin = (self.loads, self.saves)
        self.loads, self.saves = [], []
        return meta

    def start_load(self, meta):
        loads, _ = meta.plugin
        for rid, block_ids, hashes in loads:
            for b, h in zip(block_ids, hashes):
                self.kv_pool[b].copy_(self.store[h])
            self.num_loaded_blocks += len(block_ids)
            self.finished[rid] = LoadResult(len(block_ids), len(block_ids), {"dict": len(block_ids) * self.context.block_size})

    def save(self, meta):
        _, saves = meta.plugin
        for block_ids, hashes in saves:
            for b, h in zip(block_ids, hashes):
                self.store[h] = self.kv_pool[b].clone()

    def get_finished(self, wait=False):
        out = ConnectorOutput(finished_loads=self.finished)
        self.finished = {}
        return out


class SlowLookupConnector(DictConnector):
    """A DictConnector whose lookups for the requests in config["slow"] answer "not known
    yet" (None) the first config["defer"] times, as a connector waiting on a slow remote
    store would (the lookup contract in kvtier/connectors/base.py)."""

    def __init__(self, config, context):
        super().__init__(config, context)
        self.slow = set(self.config.get("slow", ()))
        self.defer = int(self.config.get("defer", 2))
        self.asked: dict[str, int] = {}
        self.answers: list[tuple[str, int | None]] = []  # (request id, answer) in order

    def lookup(self, request, num_device_tokens):
        n = self.asked[request.request_id] = self.asked.get(request.request_id, 0) + 1
        if request.request_id in self.slow and n <= self.defer:
            answer = None
        else:
            answer = super().lookup(request, num_device_tokens)
        self.answers.append((request.request_id, answer))
        return answer
