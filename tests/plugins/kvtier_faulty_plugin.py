"""Deliberately broken connectors, for the engine's guard (connectors/guard.py).

BrokenConnector: a DictConnector whose method config["break"] raises RuntimeError when it
matters: the load-side methods only while a load is involved (so the first run still
stores blocks), the others on every call. NeverReports: loads are accepted and never
reported. CountingConnector: counts the blocks it loads per key and the get_finished calls.
LateWriter: holds its loads until the test calls write_late(), then writes junk into
their blocks and reports them (a transfer that ends after the engine gave up on it).
Offering: lookup offers config["offer"] ("all": every token beyond the device hit, the
last one included; "ragged": three tokens short of whole blocks; "junk": not a number).
"""
from __future__ import annotations

from collections import Counter

from kvtier.connectors.base import ConnectorOutput, LoadResult
from kvtier_test_plugin import DictConnector


class BrokenConnector(DictConnector):
    def __init__(self, config, context):
        super().__init__(config, context)
        self.broken = self.config["break"]
        self.raised = 0

    def _raise_if(self, method, matters=True):
        if method == self.broken and matters:
            self.raised += 1
            raise RuntimeError(f"injected fault in {method}")

    def lookup(self, request, num_device_tokens):
        offer = super().lookup(request, num_device_tokens)
        self._raise_if("lookup", offer > 0)
        return offer

    def on_allocated(self, request, block_ids, num_external_tokens):
        super().on_allocated(request, block_ids, num_external_tokens)
        self._raise_if("on_allocated")

    def request_blocks_saved(self, block_ids, block_hashes, group=0):
        self._raise_if("request_blocks_saved")
        super().request_blocks_saved(block_ids, block_hashes, group)

    def build_metadata(self):
        self._raise_if("build_metadata", bool(self.meta.loads))
        return super().build_metadata()

    def start_load(self, meta):
        self._raise_if("start_load", bool(meta.loads))
        super().start_load(meta)

    def save(self, meta):
        self._raise_if("save", bool(meta.saves))
        super().save(meta)

    def get_finished(self, wait=False):
        self._raise_if("get_finished", bool(self.finished))
        return super().get_finished(wait)

    def on_request_finished(self, request, block_ids):
        self._raise_if("on_request_finished")
        return super().on_request_finished(request, block_ids)


class NeverReports(DictConnector):
    """Takes loads and never reports them; counts how often the engine asks."""

    def __init__(self, config, context):
        super().__init__(config, context)
        self.get_finished_calls = 0

    def start_load(self, meta):
        self.num_loaded_blocks += sum(len(spec.keys) for spec in meta.loads)

    def get_finished(self, wait=False):
        self.get_finished_calls += 1
        return ConnectorOutput()


class CountingConnector(DictConnector):
    """Counts loads per stored block; its LoadResults name no sources."""

    def __init__(self, config, context):
        super().__init__(config, context)
        self.loads_per_key: Counter = Counter()

    def start_load(self, meta):
        for spec in meta.loads:
            self.loads_per_key.update(spec.keys)
        super().start_load(meta)
        for spec in meta.loads:
            self.finished[spec.request_id].sources = {}


class Offering(DictConnector):
    """Offers more than it should: the engine must cut the offer to what it can use."""

    def lookup(self, request, num_device_tokens):
        if super().lookup(request, num_device_tokens) == 0:
            return 0
        beyond = request.num_tokens - num_device_tokens
        if self.config["offer"] == "junk":
            return "all of it"
        return beyond if self.config["offer"] == "all" else beyond - beyond % self.context.block_size - 3


class LateWriter(NeverReports):
    """Holds every load; write_late() fills its blocks with junk and reports it done."""

    def __init__(self, config, context):
        super().__init__(config, context)
        self.held_loads = []

    def start_load(self, meta):
        super().start_load(meta)
        self.held_loads += meta.loads

    def write_late(self) -> int:
        for spec in self.held_loads:
            for b, key in zip(spec.block_ids, spec.keys):
                self.kv_pools[key.group][b].fill_(1e4)
            self.finished[spec.request_id] = LoadResult(len(spec.keys), len(spec.keys))
        written, self.held_loads = len(self.held_loads), []
        return written

    def get_finished(self, wait=False):
        out = ConnectorOutput(finished_loads=self.finished)
        self.finished = {}
        return out
