"""KV events on a ZMQ PUB socket in vLLM's wire schema (vllm_wire.py): frames (topic,
8-byte big-endian sequence number, msgpack batch), the sequence counting batches from 0.

With a replay endpoint, the last `replay_batches` batches are kept, and a ROUTER socket
answers vLLM's replay request (one frame: the 8-byte big-endian sequence number to start
from) with every kept batch from there, one message (sequence, payload) each, then an end
marker: sequence -1 and an empty payload. Ask from a DEALER socket (frames: empty, start),
since a REQ socket takes only the first message of an answer; a malformed request gets the
end marker alone.

pyzmq and msgpack are the optional `events` extra: imported only when an endpoint is
configured. The sockets live on the publisher's own thread (ZMQ sockets are not thread
safe); bind errors surface in the constructor. `endpoint` / `replay_endpoint` are the bound
addresses, so "tcp://127.0.0.1:*" (an ephemeral port) can be looked up after start.
"""
from __future__ import annotations

import threading
from collections import deque

from kvtier.engine.kv_events.consumer import SubscriptionThread
from kvtier.engine.kv_events.vllm_wire import encode_batch
from kvtier.kvstore.events import KVEventBatch, KVEventSubscription

BIND_TIMEOUT_S = 10.0
SEND_HWM = 100_000  # messages ZMQ itself buffers per subscriber before dropping
END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)


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
                 data_parallel_rank: int | None = None, replay_endpoint: str | None = None,
                 replay_batches: int = 10_000):
        self._zmq = require_zmq()
        super().__init__(subscription)
        self.requested = {"kv_events_endpoint": endpoint, "kv_events_replay_endpoint": replay_endpoint}
        self.topic = topic.encode("utf-8")
        self.data_parallel_rank = data_parallel_rank
        self.endpoint: str | None = None
        self.replay_endpoint: str | None = None
        self.sent = 0  # batches sent
        self.replays = 0  # replay requests answered
        self._kept: deque[tuple[int, bytes, bytes]] = deque(maxlen=replay_batches)  # (n, sequence, payload)
        self._bound = threading.Event()
        self._bind_error: str | None = None
        self._ctx = self._zmq.Context()
        self._socket = self._replay = None
        self.start()
        if not self._bound.wait(BIND_TIMEOUT_S) or self._bind_error is not None:
            self.close(0.5)
            raise ValueError(self._bind_error or "kv_events_endpoint: binding timed out")

    def _bind(self, kind: int, key: str):
        sock = self._ctx.socket(kind)
        sock.setsockopt(self._zmq.LINGER, 0)
        try:
            sock.bind(self.requested[key])
        except Exception as e:
            sock.close()
            raise ValueError(f"{key}: cannot bind {self.requested[key]!r}: {e}") from e
        return sock, sock.getsockopt_string(self._zmq.LAST_ENDPOINT)

    def _run(self) -> None:
        zmq = self._zmq
        try:
            self._socket, self.endpoint = self._bind(zmq.PUB, "kv_events_endpoint")
            self._socket.setsockopt(zmq.SNDHWM, SEND_HWM)
            if self.requested["kv_events_replay_endpoint"] is not None:
                self._replay, self.replay_endpoint = self._bind(zmq.ROUTER, "kv_events_replay_endpoint")
        except ValueError as e:
            self._bind_error = str(e)
            self._bound.set()
            self.finish()
            return
        self._bound.set()
        super()._run()

    def handle(self, batch: KVEventBatch) -> None:
        payload = encode_batch(batch, self.data_parallel_rank)
        seq = self.sent.to_bytes(8, "big")
        self._socket.send_multipart((self.topic, seq, payload), flags=self._zmq.NOBLOCK)
        self.sent += 1
        if self._replay is not None:
            self._kept.append((self.sent - 1, seq, payload))

    def tick(self) -> None:
        """Answer the replay requests that have arrived (never waits for one)."""
        while self._replay is not None and self._replay.poll(0):
            frames = self._replay.recv_multipart()
            envelope = frames[:-1]  # the client's identity, and REQ's empty delimiter
            start = int.from_bytes(frames[-1], "big") if len(frames[-1]) == 8 and len(frames) > 1 else None
            if start is not None:
                for n, seq, payload in self._kept:
                    if n >= start:
                        self._replay.send_multipart((*envelope, seq, payload))
            self._replay.send_multipart((*envelope, END_OF_REPLAY, b""))
            self.replays += 1

    def finish(self) -> None:
        for sock in (self._socket, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._ctx.term()
