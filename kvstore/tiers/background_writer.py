"""A bounded queue drained by one daemon thread, for tiers whose writes are slow I/O.

Tier.put() must return at once (DESIGN.md §5: the engine loop never waits on a disk or a
socket for a write). put() encodes its blocks and submits them here; the thread takes
everything queued so far (up to `max_batch_bytes`) and applies it as one batch — one LMDB
write transaction, one Redis pipeline. When the queue already holds `max_queued_bytes`,
submit() refuses and the tier counts a skipped write: back-pressure drops work, it never
blocks the caller and never grows memory without bound.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any


class BackgroundWriter:
    def __init__(
        self,
        apply_batch: Callable[[list[Any]], None],
        max_queued_bytes: int,
        max_batch_bytes: int,
        name: str = "kvtier-writer",
    ):
        if max_queued_bytes <= 0 or max_batch_bytes <= 0:
            raise ValueError("background writer: queue and batch limits must be positive")
        self._apply = apply_batch
        self._max_queued = max_queued_bytes
        self._max_batch = max_batch_bytes
        self._cond = threading.Condition()
        self._items: deque[tuple[Any, int]] = deque()
        self._queued_bytes = 0
        self._busy = False  # a batch has been taken and is being applied
        self._closed = False
        self.failures = 0  # batches whose apply raised (the tier counts details itself)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Any, nbytes: int) -> bool:
        """Queue one item; False (and nothing queued) when full or closed."""
        with self._cond:
            if self._closed:
                return False
            # An item bigger than the whole queue is still accepted into an empty queue,
            # so one oversized put is written rather than always dropped.
            if self._items and self._queued_bytes + nbytes > self._max_queued:
                return False
            self._items.append((item, nbytes))
            self._queued_bytes += nbytes
            self._cond.notify_all()
            return True

    def pending(self) -> int:
        with self._cond:
            return len(self._items) + (1 if self._busy else 0)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far has been applied; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._items or self._busy:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self, timeout: float | None = 10.0) -> None:
        """Apply what is queued, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _take_batch(self) -> list[Any] | None:
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if not self._items:
                return None  # closed and drained
            batch, size = [], 0
            while self._items and (not batch or size + self._items[0][1] <= self._max_batch):
                item, nbytes = self._items.popleft()
                batch.append(item)
                size += nbytes
            self._queued_bytes -= size
            self._busy = True
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                self._apply(batch)
            except Exception:  # the thread must outlive any store fault
                self.failures += 1
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
