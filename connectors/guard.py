"""The engine's side of the connector contract (docs/connectors.md): every call into a
connector goes through a ConnectorGuard, so a faulty plugin costs a recompute, never a
request, a batch, a device block or a spinning engine loop.

- lookup: an exception, or an answer that is not a non-negative int, counts as no hit. An
  offer is clamped to whole blocks that stop before the block holding the request's last
  token (that token is always computed, so the step has logits); on hybrid models an offer
  that needs clamping is dropped instead, since a shorter resume point needs other blocks.
- on_allocated, build_metadata, start_load: an exception fails the loads it concerns; their
  requests recompute from their device resume point. get_finished: an exception counts as
  nothing finished (loads it never reports then time out).
- request_blocks_saved, blocks_evicted, save: an exception is counted and logged
  (rate-limited per kind), and the step goes on.
- on_request_finished: an exception means "do not hold the blocks"; close: counted.
- A load not reported within `load_timeout_s` fails: its request recomputes in other blocks
  and asks the connector nothing more. The connector may still be writing into the load's
  blocks, so they stay out of use until it reports the load; that late report frees them.
- get_finished(wait=True) never returns at once with nothing to report: a connector that
  ignores `wait` is paced by a short sleep, so an idle engine loop does not spin.
A finished load that names no `sources` is credited to `name` (engine/kv_loads.py).
"""
from __future__ import annotations

import logging
import numbers
import time
from collections.abc import Callable

from kvtier.connectors.base import ConnectorMetadata, ConnectorOutput, KVConnector, LoadResult, Request
from kvtier.kvstore.faults import FaultLog

log = logging.getLogger(__name__)
# get_finished(wait=True) that returned faster than this with nothing to report is
# topped up with a sleep of IDLE_PACE_S: long enough that an idle loop costs no CPU,
# short enough that a lookup answered meanwhile is picked up promptly.
_INSTANT_S = 0.001
IDLE_PACE_S = 0.005


class ConnectorGuard:
    """Wraps one connector for the engine; `connector` stays reachable for its own API."""

    def __init__(self, connector: KVConnector, name: str, load_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.connector = connector
        self.name = name  # credited in kv_sources for loads that name no source
        self.load_timeout_s = load_timeout_s
        self._clock = clock
        self.faults = FaultLog(log)
        self.block_size = connector.context.block_size
        self.dense = connector.context.dense
        # request id -> (deadline, blocks): loads announced and not reported yet
        self._pending: dict[str, tuple[float, int]] = {}
        self._unbuilt: list[str] = []  # loads announced since the last build_metadata
        self._last_built: list[str] = []  # loads the last built metadata carries
        self._failed: dict[str, LoadResult] = {}  # loads failed here, reported next get_finished
        self._unsettled: set[str] = set()  # timed out here; the connector may still write their blocks
        self._settled_late: list[str] = []  # unsettled loads the connector has reported since
        self.num_clamped_lookups = 0
        self.num_load_timeouts = 0
        self.num_failed_loads = 0

    def _fault(self, where: str, error: BaseException) -> None:
        self.faults.record(f"connector.{where}", error)

    def _fail(self, request_ids) -> None:
        for rid in request_ids:
            entry = self._pending.pop(rid, None)
            if entry is not None:
                self._failed[rid] = LoadResult(0, entry[1])
                self.num_failed_loads += 1

    # ---- scheduler side ------------------------------------------------------------
    def lookup(self, request: Request, num_device_tokens: int) -> int | None:
        try:
            offer = self.connector.lookup(request, num_device_tokens)
        except Exception as e:
            self._fault("lookup", e)
            return 0
        if offer is None:
            return None
        if isinstance(offer, bool) or not isinstance(offer, numbers.Integral) or offer < 0:
            self._fault("lookup", TypeError(f"lookup returned {offer!r}, not a token count"))
            return 0
        offer = int(offer)
        if offer == 0:
            return 0
        bs = self.block_size
        usable = (request.num_tokens - 1) // bs * bs - num_device_tokens
        clamped = min(offer // bs * bs, max(usable, 0))
        if clamped != offer:
            if not self.dense:
                clamped = 0
            self.num_clamped_lookups += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("kvtier: connector %s offered %d tokens for %s beyond %d device tokens; using %d "
                          "(whole blocks, before the last token's block)", self.name, offer,
                          request.request_id, num_device_tokens, clamped)
        return clamped

    def on_allocated(self, request: Request, block_ids: tuple[list[int], ...], num_external_tokens: int) -> None:
        rid = request.request_id
        self._pending[rid] = (self._clock() + self.load_timeout_s, sum(len(ids) for ids in block_ids))
        self._unbuilt.append(rid)
        try:
            self.connector.on_allocated(request, block_ids, num_external_tokens)
        except Exception as e:
            self._fault("on_allocated", e)
            self._fail([rid])

    def request_blocks_saved(self, block_ids: list[int], block_hashes: list[bytes], group: int = 0) -> None:
        try:
            self.connector.request_blocks_saved(block_ids, block_hashes, group)
        except Exception as e:
            self._fault("request_blocks_saved", e)

    def blocks_evicted(self, block_ids: list[int], block_hashes: list[bytes], group: int = 0) -> None:
        try:
            self.connector.blocks_evicted(block_ids, block_hashes, group)
        except Exception as e:
            self._fault("blocks_evicted", e)

    def build_metadata(self) -> ConnectorMetadata | None:
        """The step's metadata, or None when building it failed (its loads are failed)."""
        announced, self._unbuilt = self._unbuilt, []
        try:
            meta = self.connector.build_metadata()
        except Exception as e:
            self._fault("build_metadata", e)
            self._fail(announced)
            return None
        self._last_built = announced
        return meta

    def on_request_finished(self, request: Request, block_ids: tuple[list[int], ...]) -> bool:
        try:
            return bool(self.connector.on_request_finished(request, block_ids))
        except Exception as e:
            self._fault("on_request_finished", e)
            return False

    # ---- worker side ---------------------------------------------------------------
    def start_load(self, meta: ConnectorMetadata | None) -> None:
        if meta is None:
            return
        try:
            self.connector.start_load(meta)
        except Exception as e:
            self._fault("start_load", e)
            self._fail(self._last_built)

    def save(self, meta: ConnectorMetadata | None) -> None:
        if meta is None:
            return
        try:
            self.connector.save(meta)
        except Exception as e:
            self._fault("save", e)

    def get_finished(self, wait: bool | float = False) -> ConnectorOutput:
        start = self._clock()
        try:
            got = self.connector.get_finished(wait=wait)
        except Exception as e:
            self._fault("get_finished", e)
            got = ConnectorOutput()
        out = ConnectorOutput(finished_saves=set(got.finished_saves))
        for rid, result in got.finished_loads.items():
            if self._pending.pop(rid, None) is None:  # failed or timed out here already
                if rid in self._unsettled:  # done writing: its blocks can be reused
                    self._unsettled.remove(rid)
                    self._settled_late.append(rid)
                continue
            out.finished_loads[rid] = result
        now = self._clock()
        late = [rid for rid, (deadline, _) in self._pending.items() if now >= deadline]
        if late:
            self.num_load_timeouts += len(late)
            self._fault("load_timeout", TimeoutError(
                f"{len(late)} load(s) not reported within kv_load_timeout_s={self.load_timeout_s}"))
            self._unsettled.update(late)
            self._fail(late)
        out.finished_loads.update(self._failed)
        self._failed = {}
        if wait is True and not (out.finished_loads or out.finished_saves) and now - start < _INSTANT_S:
            time.sleep(IDLE_PACE_S)  # the connector ignored `wait`: do not let the loop spin
        return out

    def timed_out(self, request_id: str) -> bool:
        """Whether this failed load timed out: the connector may still write into its blocks."""
        return request_id in self._unsettled

    def take_settled_late(self) -> list[str]:
        """Timed-out loads the connector has reported since the last call: their blocks are free to reuse."""
        settled, self._settled_late = self._settled_late, []
        return settled

    def stats(self) -> dict:
        faults = self.faults.counts()
        return {"errors": sum(faults.values()), "faults": faults, "failed_loads": self.num_failed_loads,
                "load_timeouts": self.num_load_timeouts, "unsettled_loads": len(self._unsettled),
                "clamped_lookups": self.num_clamped_lookups}

    def close(self) -> None:
        try:
            self.connector.close()
        except Exception as e:
            self._fault("close", e)
