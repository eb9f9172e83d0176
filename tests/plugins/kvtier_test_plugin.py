"""A third-party connector, as a plugin author would write one: KV blocks kept in a dict.

Installed by tests through an entry point (group `kvtier.connectors`) or imported by path.
It serves every KV group (dense and hybrid models): a stored block is keyed by (group,
prefix hash) (one engine, one namespace), and a lookup offers the longest resume point
every group can serve. Its two halves talk only through the metadata object's `loads`
(LoadSpec) and `saves` (SaveSpec), as docs/connectors.md prescribes.
"""
from __future__ import annotations

from kvtier.connectors.base import ConnectorMetadata, ConnectorOutput, KVConnector, LoadResult, LoadSpec, SaveSpec


class DictConnector(KVConnector):
    def __init__(self, config, context):
        super().__init__(config, context)
        self.store: dict[tuple[int, bytes], object] = {}  # (group, hash) -> block tensor (a copy)
        self.meta = ConnectorMetadata()
        self.finished: dict[str, LoadResult] = {}
        self.num_loaded_blocks = 0

    def _needed(self, request, device_tokens, resume_tokens):
        """Keys of every block a resume at resume_tokens takes from here, group by group."""
        bs = self.context.block_size
        return [self.context.key(request.block_hashes[i], g) for g, info in enumerate(self.context.groups)
                for i in info.blocks_to_load(device_tokens, resume_tokens, bs)]

    def lookup(self, request, num_device_tokens):
        bs = self.context.block_size
        first, last = num_device_tokens // bs, (request.num_tokens - 1) // bs
        for n in range(last, first, -1):  # the longest resume point every group can serve
            if all((k.group, k.block_hash) in self.store for k in self._needed(request, num_device_tokens, n * bs)):
                return (n - first) * bs
        return 0

    def on_allocated(self, request, block_ids, num_external_tokens):
        device = request.num_computed_tokens
        keys = self._needed(request, device, device + num_external_tokens)
        flat = [b for ids in block_ids for b in ids]
        self.meta.loads.append(LoadSpec(request.request_id, flat, keys, num_tokens=num_external_tokens))

    def request_blocks_saved(self, block_ids, block_hashes, group=0):
        keys = [self.context.key(h, group) for h in block_hashes]
        self.meta.saves.append(SaveSpec(list(block_ids), keys))

    def build_metadata(self):
        meta, self.meta = self.meta, ConnectorMetadata()
        return meta

    def start_load(self, meta):
        for spec in meta.loads:
            for b, key in zip(spec.block_ids, spec.keys):
                self.kv_pools[key.group][b].copy_(self.store[(key.group, key.block_hash)])
            self.num_loaded_blocks += len(spec.keys)
            n = len(spec.keys)
            self.finished[spec.request_id] = LoadResult(n, n, {"dict": spec.num_tokens})

    def save(self, meta):
        for spec in meta.saves:
            for b, key in zip(spec.block_ids, spec.keys):
                self.store[(key.group, key.block_hash)] = self.kv_pools[key.group][b].clone()

    def get_finished(self, wait=False):
        out = ConnectorOutput(finished_loads=self.finished)
        self.finished = {}
        return out


def _seq(request_id: str) -> str:
    """An engine's own request ids are "<engine prefix>-<n>"; tests name requests by n."""
    return request_id.rpartition("-")[2]


class SlowLookupConnector(DictConnector):
    """A DictConnector whose lookups for the requests in config["slow"] (by their number n,
    see _seq) answer "not known yet" (None) the first config["defer"] times, as a
    connector waiting on a slow remote store would (the lookup contract in docs/connectors.md)."""

    def __init__(self, config, context):
        super().__init__(config, context)
        self.slow = set(self.config.get("slow", ()))
        self.defer = int(self.config.get("defer", 2))
        self.asked: dict[str, int] = {}
        self.answers: list[tuple[str, int | None]] = []  # (request number, answer) in order

    def lookup(self, request, num_device_tokens):
        rid = _seq(request.request_id)
        n = self.asked[rid] = self.asked.get(rid, 0) + 1
        if rid in self.slow and n <= self.defer:
            answer = None
        else:
            answer = super().lookup(request, num_device_tokens)
        self.answers.append((rid, answer))
        return answer
