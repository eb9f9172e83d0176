"""KV events out of the engine: the hub that switches recording on and publishes each
step's batch, and the consumers (JSON-lines file, ZMQ in vLLM's wire schema). The event
types and the bus live in kvtier.kvstore.events, where the tiers can reach them too."""
from kvtier.engine.kv_events.hub import KVEventHub

__all__ = ["KVEventHub"]
