"""KV events on a ZMQ PUB socket in vLLM's wire schema (vllm_wire.py): frames (topic,
8-byte big-endian sequence number, msgpack batch), the sequence counting batches from 0.

pyzmq and msgpack are the optional `events` extra: imported only when an endpoint is
configured. The socket lives on the publisher's own thread (ZMQ sockets are not thread
safe); bind errors surface in the constructor. `endpoint` is the bound address, so
"tcp://127.0.0.1:*" (an ephemeral port) can be looked up after start.
"""
from __future__ import annotations

import threading

from kvtier.engine.kv_events.consumer import SubscriptionThread
from kvtier.engine.kv_events.vllm_wire import encode_batch
from kvtier.kvstore.events import KVEventBatch, KVEventSubscription

BIND_TIMEOUT_S = 10.0
SEND_HWM = 100_000  # messages ZMQ itself buffers per subscriber before dropping


def require_zmq():
    """Import pyzmq and msgpack, or fail naming the extra that provides them."""
    try:
        import msgpack  # noqa: F401
        import zmq
    except ImportError as e:
        raise ImportError(
            f"kv_events_endpoint needs pyzmq and msgpack ({e.name} is missing); "
            "install them with: pip install 'kvtier[events]'"
        ) from e
    return zmq


class ZmqPublisher(SubscriptionThread):
    thread_name = "kvtier-kv-events-zmq"

    def __init__(self, subscription: KVEventSubscription, endpoint: str, topic: str = "",
                 data_parallel_rank: int | None = None):
        self._zmq = require_zmq()
        super().__init__(subscription)
        self.requested_endpoint = endpoint
        self.topic = topic.encode("utf-8")
        self.data_parallel_rank = data_parallel_rank
        self.endpoint: str | None = None
        self.sent = 0  # batches sent
        self._bound = threading.Event()
        self._bind_error: BaseException | None = None
        self._ctx = self._zmq.Context()
        self._socket = None
        self.start()
        if not self._bound.wait(BIND_TIMEOUT_S) or self._bind_error is not None:
            self.close(0.5)
            raise ValueError(f"kv_events_endpoint: cannot bind {endpoint!r}: {self._bind_error}")

    def _run(self) -> None:
        zmq = self._zmq
        try:
            sock = self._ctx.socket(zmq.PUB)
            sock.setsockopt(zmq.SNDHWM, SEND_HWM)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(self.requested_endpoint)
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._socket = sock
        except Exception as e:
            self._bind_error = e
            self._bound.set()
            self._ctx.term()
            return
        self._bound.set()
        super()._run()

    def handle(self, batch: KVEventBatch) -> None:
        payload = encode_batch(batch, self.data_parallel_rank)
        seq = self.sent.to_bytes(8, "big")
        self._socket.send_multipart((self.topic, seq, payload), flags=self._zmq.NOBLOCK)
        self.sent += 1

    def finish(self) -> None:
        self._socket.close(linger=0)
        self._ctx.term()
