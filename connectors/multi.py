"""MultiConnector: loads from the child with the longest prefix (the first on ties), saves to all.

A child's load that names no sources is credited to that child's name (its `name`, else the
name it was configured by), as the engine does for a connector on its own.

Config: {"connectors": [{"name": "tiered", "config": {...}}, {"name": "pkg.mod:Cls"}, ...]}
"""
from __future__ import annotations

from dataclasses import dataclass, field

from kvtier.connectors.base import (
    ConnectorContext,
    ConnectorMetadata,
    ConnectorOutput,
    KVConnector,
    LoadResult,
    Request,
)


@dataclass
class MultiMetadata(ConnectorMetadata):
    per_child: list[ConnectorMetadata] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return all(m.empty for m in self.per_child)


class MultiConnector(KVConnector):
    def __init__(self, config: dict, context: ConnectorContext):
        super().__init__(config, context)
        from kvtier.connectors.registry import build_connector

        entries = self.config.get("connectors")
        if not entries or not isinstance(entries, list):
            raise ValueError("kv_connector_config: 'connectors' must be a non-empty list of {name, config}")
        self.children: list[KVConnector] = []
        self.names: list[str] = []
        for entry in entries:
            if not isinstance(entry, dict) or "name" not in entry:
                raise ValueError(f"kv_connector_config: each connector needs a 'name', got {entry!r}")
            child = build_connector(entry["name"], entry.get("config"), context)
            self.children.append(child)
            self.names.append(child.name or str(entry["name"]).rpartition(":")[2])
        self._chosen: dict[str, int] = {}
        self._loading: dict[str, tuple[int, int]] = {}  # request id -> (child, tokens it loads)
        self._holding: dict[str, set[int]] = {}

    def lookup(self, request: Request, num_device_tokens: int) -> int | None:
        # Every child is asked (their remote probes run side by side); the answer waits
        # for the slowest, which each child bounds by its own lookup budget.
        answers = [child.lookup(request, num_device_tokens) for child in self.children]
        if any(n is None for n in answers):
            return None
        best, best_child = 0, None
        for i, n in enumerate(answers):
            if n > best:
                best, best_child = n, i
        if best_child is not None:
            self._chosen[request.request_id] = best_child
        return best

    def on_allocated(self, request: Request, block_ids: tuple[list[int], ...], num_external_tokens: int) -> None:
        child = self._chosen.pop(request.request_id)
        self._loading[request.request_id] = (child, num_external_tokens)
        self.children[child].on_allocated(request, block_ids, num_external_tokens)

    def request_blocks_saved(self, block_ids: list[int], block_hashes: list[bytes], group: int = 0) -> None:
        for child in self.children:
            child.request_blocks_saved(block_ids, block_hashes, group)

    def blocks_evicted(self, block_ids: list[int], block_hashes: list[bytes], group: int = 0) -> None:
        for child in self.children:
            child.blocks_evicted(block_ids, block_hashes, group)

    def build_metadata(self) -> ConnectorMetadata:
        self._chosen.clear()
        return MultiMetadata(per_child=[c.build_metadata() for c in self.children])

    def on_request_finished(self, request: Request, block_ids: tuple[list[int], ...]) -> bool:
        holders = {i for i, c in enumerate(self.children) if c.on_request_finished(request, block_ids)}
        if holders:
            self._holding[request.request_id] = holders
        return bool(holders)

    def register_kv_caches(self, kv_pools) -> None:
        super().register_kv_caches(kv_pools)
        for child in self.children:
            child.register_kv_caches(kv_pools)

    def start_load(self, meta: MultiMetadata) -> None:
        for child, m in zip(self.children, meta.per_child):
            child.start_load(m)

    def save(self, meta: MultiMetadata) -> None:
        for child, m in zip(self.children, meta.per_child):
            child.save(m)

    def get_finished(self, wait: bool | float = False) -> ConnectorOutput:
        merged = ConnectorOutput()
        # Only one child loads any given request, so waiting on each in turn is bounded.
        for child in self.children:
            out = child.get_finished(wait=wait and not merged.finished_loads)
            for rid, result in out.finished_loads.items():
                merged.finished_loads[rid] = self._credited(rid, result)
            for rid in out.finished_saves:
                self._release(rid, child, merged)
        return merged

    def _credited(self, rid: str, result: LoadResult) -> LoadResult:
        """The result, with its tokens credited to the child that loaded them if it named none."""
        child, tokens = self._loading.pop(rid, (None, 0))
        if child is None or result.sources or result.num_blocks_ok == 0:
            return result
        if result.num_blocks_ok < result.num_blocks:  # only a dense model uses a partial load
            tokens = result.num_blocks_ok * self.context.block_size if self.context.dense else 0
        if tokens:
            result.sources = {self.names[child]: tokens}
        return result

    def _release(self, rid: str, child: KVConnector, merged: ConnectorOutput) -> None:
        holders = self._holding.get(rid)
        if holders is None:
            return
        holders.discard(self.children.index(child))
        if not holders:
            del self._holding[rid]
            merged.finished_saves.add(rid)

    def stats(self) -> dict[str, dict]:
        out = {}
        for i, child in enumerate(self.children):
            for name, s in child.stats().items():
                out[f"{i}:{name}"] = s
        return out

    def close(self) -> None:
        for child in self.children:
            child.close()
