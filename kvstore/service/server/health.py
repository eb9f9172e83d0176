"""The standard gRPC health service (grpc.health.v1.Health: Check and Watch) for the kv-server.

The messages come from proto/kvtier/v1/health.proto, wire-compatible with the standard
ones, so health probes (grpc_health_probe, Kubernetes) work without an extra package.
SIGTERM turns the status to NOT_SERVING before the drain, so balancers stop sending calls.

Watch needs no token (probes carry no secrets), so it must not cost a handler thread: a
generator-style Watch holds one of --workers for the whole stream, and a few idle watchers
would starve every authenticated call. Watch is therefore a non-blocking handler (gRPC's
`experimental_non_blocking`, as grpcio-health-checking's own servicer uses): it registers a
callback and returns, and status changes are pushed from a thread of our own. At most
`max_watches` streams are open at once; more are RESOURCE_EXHAUSTED.
"""
from __future__ import annotations

import itertools
import threading

import grpc

from kvtier.proto.kvtier.v1 import health_pb2


class HealthService:
    """grpc.health.v1.Health (Check and Watch) for the server as a whole and for KVStore."""

    SERVICE_NAME = "grpc.health.v1.Health"
    _KNOWN = ("", "kvtier.v1.KVStore")
    _Status = health_pb2.HealthCheckResponse

    def __init__(self, max_watches: int = 64):
        if max_watches < 1:
            raise ValueError(f"--max-health-watches must be >= 1, got {max_watches}")
        self._serving = True
        self._max_watches = max_watches
        self._lock = threading.Lock()
        self._watchers: dict[int, list] = {}  # id -> [service, send callback, last status sent]
        self._ids = itertools.count()
        self._pushing = threading.Lock()  # one broadcast at a time, in set_serving order

    def set_serving(self, serving: bool) -> None:
        with self._lock:
            self._serving = serving
            watchers = list(self._watchers.items())
        # Pushed from a thread of its own: a send waits on the client's transport, and
        # set_serving runs on the way to shutdown, which must not wait on any client.
        threading.Thread(target=self._push, args=(watchers,), name="kvtier-health-watch", daemon=True).start()

    def watching(self) -> int:
        with self._lock:
            return len(self._watchers)

    def _status(self, service: str) -> int:
        if service not in self._KNOWN:
            return self._Status.SERVICE_UNKNOWN
        return self._Status.SERVING if self._serving else self._Status.NOT_SERVING

    def Check(self, request, context):
        if request.service not in self._KNOWN:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return self._Status(status=self._status(request.service))

    def Watch(self, request, context, send):
        """Non-blocking: `send(message)` streams a status, `send(None)` ends the stream."""
        with self._pushing:  # the first status goes out before any later change is pushed
            with self._lock:
                full = len(self._watchers) >= self._max_watches
                if not full:
                    wid, status = next(self._ids), self._status(request.service)
                    self._watchers[wid] = [request.service, send, status]
            if full:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{self._max_watches} health watches are open; use Check, or retry later")
            if not context.add_callback(lambda: self._forget(wid)):
                self._forget(wid)  # the call already ended
                return
            send(self._Status(status=status))
            if status == self._Status.NOT_SERVING:
                self._end(wid)  # draining: the stream ends so it does not hold up shutdown

    def _push(self, watchers) -> None:
        with self._pushing:
            for wid, entry in watchers:
                service, send, last = entry
                status = self._status(service)
                if status == last:
                    continue
                entry[2] = status
                send(self._Status(status=status))
                if status == self._Status.NOT_SERVING:
                    self._end(wid)

    def _end(self, wid: int) -> None:
        with self._lock:
            entry = self._watchers.pop(wid, None)
        if entry is not None:
            entry[1](None)  # OK status: the stream ends

    def _forget(self, wid: int) -> None:
        with self._lock:
            self._watchers.pop(wid, None)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        kwargs = dict(
            request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(
            self.SERVICE_NAME,
            {
                "Check": grpc.unary_unary_rpc_method_handler(self.Check, **kwargs),
                "Watch": grpc.unary_stream_rpc_method_handler(_non_blocking(self.Watch), **kwargs),
            },
        )


def _non_blocking(method):
    """gRPC calls a handler marked so with a send callback and frees the worker when it
    returns (grpc/_server.py, _stream_response_in_pool)."""

    def handler(request, context, send_response_callback):
        return method(request, context, send_response_callback)

    handler.experimental_non_blocking = True
    return handler
