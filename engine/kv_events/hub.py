"""The engine's end of KV events: switches recording on (device pool and tiers), publishes
the device pool's events once per engine step, and owns the configured consumers.

Recording starts with the first consumer (a configured file or endpoint, or the first
`LLM.kv_events()` call); until then the only cost on the hot path is a None check in the
block pool. A consumer sees what happens from its subscription on, not what was already
stored (a router that starts late learns the rest as blocks are stored or removed).
"""
from __future__ import annotations

from kvtier.kvstore.events import KVEventBus, KVEventSubscription

GPU_MEDIUM = "GPU"  # vLLM's name for the device pool on a GPU
CPU_DEVICE_MEDIUM = "device"  # a device pool in host memory (CPU runs); "cpu" is the tier


def device_medium(device_type: str) -> str:
    return GPU_MEDIUM if device_type == "cuda" else CPU_DEVICE_MEDIUM


class KVEventHub:
    def __init__(self, coordinator, connector, device_type: str, block_size: int, queue_events: int):
        """coordinator: the engine's KVCacheCoordinator; connector: its connector or None
        (tier events need one with `set_kv_event_bus`, e.g. the tiered connector)."""
        self.bus = KVEventBus(queue_events)
        self.medium = device_medium(device_type)
        self.block_size = block_size
        self._coordinator = coordinator
        self._connector = connector
        self._on = False
        self.sinks: list = []

    @property
    def enabled(self) -> bool:
        return self._on

    def enable(self) -> None:
        """Start recording on the device pool and every tier (idempotent)."""
        if self._on:
            return
        self._coordinator.enable_events(self.medium)
        attach = getattr(self._connector, "set_kv_event_bus", None)
        if attach is not None:
            attach(self.bus)
        self._on = True

    def subscribe(self, max_events: int | None = None) -> KVEventSubscription:
        """A new consumer queue (bounded by `max_events`, default kv_events_queue)."""
        self.enable()
        return self.bus.subscribe(max_events)

    def add_file(self, path: str) -> None:
        from kvtier.engine.kv_events.jsonl_sink import JsonlSink

        self.sinks.append(JsonlSink(self.subscribe(), path))

    def add_zmq(self, endpoint: str, topic: str = "", replay_endpoint: str | None = None,
                replay_batches: int = 10_000) -> None:
        from kvtier.engine.kv_events.zmq_publisher import ZmqPublisher, require_zmq

        require_zmq()  # before subscribing: a missing extra leaves nothing half set up
        self.sinks.append(ZmqPublisher(self.subscribe(), endpoint, topic, replay_endpoint=replay_endpoint,
                                       replay_batches=replay_batches))

    def end_step(self) -> None:
        """Publish what the device pool recorded this step, as one batch."""
        if self._on:
            events = self._coordinator.take_events()
            if events:
                self.bus.publish(events)

    def stats(self) -> dict:
        return {"published": self.bus.published, "dropped": self.bus.dropped(),
                "sinks": [{"kind": type(s).__name__, "dropped": s.dropped, "errors": s.errors} for s in self.sinks]}

    def close(self) -> None:
        """Publish what is left, then let each consumer drain and stop."""
        self.end_step()
        for sink in self.sinks:
            sink.close()
        self.sinks = []
