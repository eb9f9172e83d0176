"""The standard gRPC health service (grpc.health.v1.Health: Check and Watch) for the kv-server.

The messages come from proto/kvtier/v1/health.proto, wire-compatible with the standard
ones, so health probes (grpc_health_probe, Kubernetes) work without an extra package.
SIGTERM turns the status to NOT_SERVING before the drain, so balancers stop sending calls.
"""
from __future__ import annotations

import threading

import grpc

from kvtier.proto.kvtier.v1 import health_pb2


class HealthService:
    """grpc.health.v1.Health (Check and Watch) for the server as a whole and for KVStore."""

    SERVICE_NAME = "grpc.health.v1.Health"
    _KNOWN = ("", "kvtier.v1.KVStore")
    _Status = health_pb2.HealthCheckResponse

    def __init__(self):
        self._serving = True
        self._changed = threading.Condition()

    def set_serving(self, serving: bool) -> None:
        with self._changed:
            self._serving = serving
            self._changed.notify_all()

    def _status(self, service: str) -> int:
        if service not in self._KNOWN:
            return self._Status.SERVICE_UNKNOWN
        return self._Status.SERVING if self._serving else self._Status.NOT_SERVING

    def Check(self, request, context):
        if request.service not in self._KNOWN:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return self._Status(status=self._status(request.service))

    def Watch(self, request, context):
        last = None
        while context.is_active():
            with self._changed:
                status = self._status(request.service)
                if status == last:
                    self._changed.wait(timeout=1.0)
                    continue
            last = status
            yield self._Status(status=status)
            if status == self._Status.NOT_SERVING:
                return  # draining: let the stream end so it does not hold up shutdown

    def generic_handler(self) -> grpc.GenericRpcHandler:
        kwargs = dict(
            request_deserializer=health_pb2.HealthCheckRequest.FromString,
            response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(
            self.SERVICE_NAME,
            {
                "Check": grpc.unary_unary_rpc_method_handler(self.Check, **kwargs),
                "Watch": grpc.unary_stream_rpc_method_handler(self.Watch, **kwargs),
            },
        )
