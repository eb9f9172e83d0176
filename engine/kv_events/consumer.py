"""A background thread that feeds one bus subscription to a sink (file, socket).

The engine never waits on it: the subscription's bounded queue drops (and counts) what the
thread cannot keep up with. close() lets it drain what is queued, within a deadline.
"""
from __future__ import annotations

import logging
import threading

from kvtier.kvstore.events import KVEventBatch, KVEventSubscription

log = logging.getLogger(__name__)
POLL_S = 0.1  # how often an idle consumer checks whether it should stop


class SubscriptionThread:
    """Subclasses implement handle(batch) and may override finish() (runs on the thread)."""

    thread_name = "kvtier-kv-events"

    def __init__(self, subscription: KVEventSubscription):
        self.subscription = subscription
        self.errors = 0  # batches a sink failed to write (logged once, then counted)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def dropped(self) -> int:
        return self.subscription.dropped

    def handle(self, batch: KVEventBatch) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Release what the thread owns (files, sockets), after the last batch."""

    def tick(self) -> None:
        """Runs on the thread after every batch and every idle poll (at least every POLL_S)."""

    def _run(self) -> None:
        try:
            while True:
                batch = self.subscription.get(POLL_S)
                if batch is None and self._stop.is_set():
                    return
                try:
                    if batch is not None:
                        self.handle(batch)
                    self.tick()
                except Exception as e:  # a sink's fault must not end the stream for good
                    if self.errors == 0:
                        log.warning("%s: writing KV events failed (%s); counting further failures",
                                    self.thread_name, e)
                    self.errors += 1
        finally:
            self.finish()

    def close(self, timeout: float = 2.0) -> None:
        """Stop after what is queued now has been handled (or after `timeout` seconds)."""
        self.subscription.close()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
