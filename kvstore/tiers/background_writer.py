"""The one write queue of a slow tier: bounded in bytes, drained by one daemon thread.

Policy (the only one in kvtier; kvstore/hierarchy.py gives each slow tier one of these):
- submit() never blocks. What does not fit in `queue_bytes` is refused, and the caller
  counts it as a skipped write: back-pressure drops work, it never stalls the engine and
  never grows memory without bound.
- The thread takes everything queued so far (up to `batch_bytes`) and applies it as one
  batch: one LMDB write transaction, one Redis pipeline.
- close(timeout) stops taking work, keeps draining until the deadline, then drops what is
  still queued and reports how many items that was (the caller counts them as skipped).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvtier.kvstore.serial_torch import serial_torch_thread

DEFAULT_QUEUE_BYTES = 256 << 20
DEFAULT_BATCH_BYTES = 64 << 20  # one write transaction; bounds the pages a batch can pin


@dataclass(frozen=True)
class WriterLimits:
    queue_bytes: int = DEFAULT_QUEUE_BYTES  # bytes waiting to be written, at most
    batch_bytes: int = DEFAULT_BATCH_BYTES  # bytes handed to the store in one call, at most
    close_timeout_s: float = 10.0  # how long close() keeps draining before it drops

    def __post_init__(self):
        if self.queue_bytes <= 0 or self.batch_bytes <= 0:
            raise ValueError(f"writer: queue_bytes and batch_bytes must be positive, got "
                             f"{self.queue_bytes} and {self.batch_bytes}")
        if self.close_timeout_s < 0:
            raise ValueError(f"writer: close_timeout_s must be >= 0, got {self.close_timeout_s}")


class BackgroundWriter:
    def __init__(
        self,
        apply_batch: Callable[[list[Any]], None],
        on_error: Callable[[list[Any], BaseException], None],
        limits: WriterLimits = WriterLimits(),
        name: str = "kvtier-writer",
    ):
        self._apply = apply_batch
        self.limits = limits
        self._on_error = on_error  # told about a batch whose apply raised: counts and logs it
        self._cond = threading.Condition()
        self._items: deque[tuple[Any, int]] = deque()
        self._queued_bytes = 0
        self._busy = False  # a batch has been taken and is being applied
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def room(self) -> int:
        """Bytes a submit() would accept now (0 once closed)."""
        with self._cond:
            return 0 if self._closed else max(0, self.limits.queue_bytes - self._queued_bytes)

    def submit(self, item: Any, nbytes: int) -> bool:
        """Queue one item; False (and nothing queued) when full or closed."""
        with self._cond:
            if self._closed:
                return False
            # An item bigger than the whole queue is still accepted into an empty queue,
            # so one oversized write is done rather than always dropped.
            if self._items and self._queued_bytes + nbytes > self.limits.queue_bytes:
                return False
            self._items.append((item, nbytes))
            self._queued_bytes += nbytes
            self._cond.notify_all()
            return True

    def queued_bytes(self) -> int:
        with self._cond:
            return self._queued_bytes

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far has been applied; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._items and not self._busy, timeout)

    def close(self, timeout: float | None = None) -> list[Any]:
        """Refuse new items, drain for up to `timeout` seconds (default: the limits'), then
        drop what is left; returns the dropped items. A batch being applied at the deadline
        is left to finish on the daemon thread."""
        timeout = self.limits.close_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._items, max(0.0, deadline - time.monotonic()))
            dropped = [item for item, _ in self._items]
            self._items.clear()
            self._queued_bytes = 0
            self._cond.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return dropped

    def _take_batch(self) -> list[Any] | None:
        with self._cond:
            self._cond.wait_for(lambda: self._items or self._closed)
            if not self._items:
                return None  # closed and drained
            batch, size = [], 0
            while self._items and (not batch or size + self._items[0][1] <= self.limits.batch_bytes):
                item, nbytes = self._items.popleft()
                batch.append(item)
                size += nbytes
            self._queued_bytes -= size
            self._busy = True
            return batch

    def _run(self) -> None:
        serial_torch_thread()  # an fp8 encode here must not start an OpenMP team
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                self._apply(batch)
            except Exception as e:  # the thread must outlive any store fault or tier bug
                self._on_error(batch, e)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
