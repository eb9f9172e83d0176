"""A third-party connector, as a plugin author would write one: KV blocks kept in a dict.

Installed by tests through an entry point (group `kvtier.connectors`) or imported by path.
It serves every KV group (dense and hybrid models): a stored block is keyed by (group,
prefix hash), and a lookup offers the longest resume point every group can serve.
"""
from __future__ import annotations

from kvtier.connectors.base import ConnectorMetadata, ConnectorOutput, KVConnector, LoadResult


class DictConnector(KVConnector):
    def __init__(self, config, context):
        super().__init__(config, context)
        self.store: dict[tuple[int, bytes], object] = {}
        # (request, [(group, block, hash)], tokens loaded)
        self.loads: list[tuple[str, list[tuple[int, int, bytes]], int]] = []
        self.saves: list[tuple[int, list[int], list[bytes]]] = []
        self.finished: dict[str, LoadResult] = {}
        self.num_loaded_blocks = 0

    def _needed(self, request, device_tokens, resume_tokens):
        """(group, hash index) of every block a resume at resume_tokens takes from here."""
        bs = self.context.block_size
        return [(g, i) for g, info in enumerate(self.context.groups)
                for i in info.blocks_to_load(device_tokens, resume_tokens, bs)]

    def lookup(self, request, num_device_tokens):
        bs = self.context.block_size
        first, last = num_device_tokens // bs, (request.num_tokens - 1) // bs
        for n in range(last, first, -1):  # the longest resume point every group can serve
            needed = self._needed(request, num_device_tokens, n * bs)
            if all((g, request.block_hashes[i]) in self.store for g, i in needed):
                return (n - first) * bs
        return 0

    def on_allocated(self, request, block_ids, num_external_tokens):
        device = request.num_computed_tokens
        needed = self._needed(request, device, device + num_external_tokens)
        flat = [b for ids in block_ids for b in ids]
        blocks = [(g, b, request.block_hashes[i]) for (g, i), b in zip(needed, flat)]
        self.loads.append((request.request_id, blocks, num_external_tokens))

    def request_blocks_saved(self, block_ids, block_hashes, group=0):
        self.saves.append((group, list(block_ids), list(block_hashes)))

    def build_metadata(self):
        meta = ConnectorMetadata()
        meta.plugin = (self.loads, self.saves)
        self.loads, self.saves = [], []
        return meta

    def start_load(self, meta):
        loads, _ = meta.plugin
        for rid, blocks, tokens in loads:
            for g, b, h in blocks:
                self.kv_pools[g][b].copy_(self.store[(g, h)])
            self.num_loaded_blocks += len(blocks)
            self.finished[rid] = LoadResult(len(blocks), len(blocks), {"dict": tokens})

    def save(self, meta):
        _, saves = meta.plugin
        for g, block_ids, hashes in saves:
            for b, h in zip(block_ids, hashes):
                self.store[(g, h)] = self.kv_pools[g][b].clone()

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
