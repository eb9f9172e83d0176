"""The kv-server's Prometheus metrics: calls by method and status, bytes in and out (gRPC
messages and the bulk stream), authentication failures, and what the store holds.

Calls and gRPC bytes are counted by a server interceptor that wraps every handler (its
(de)serializers see each message's bytes; its behavior sees the final status), so the
handlers themselves stay unaware of metrics. The bulk stream counts its bytes and refused
tickets through `bulk_received` / `bulk_sent` / `auth_failure`. Stored bytes and blocks are
read from the store at scrape time. Imports nothing of kvtier.engine.
"""
from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily

# Statuses that mean the caller was not allowed in (an unknown token, a namespace not granted).
_AUTH_CODES = ("UNAUTHENTICATED", "PERMISSION_DENIED")


class KVServerMetrics:
    def __init__(self, store=None):
        self.registry = CollectorRegistry()
        self._requests = Counter("kvtier_kv_server_requests", "calls answered, by gRPC method and status code",
                                 ["method", "code"], registry=self.registry)
        received = Counter("kvtier_kv_server_received_bytes", "bytes received from clients, by transport",
                           ["transport"], registry=self.registry)
        sent = Counter("kvtier_kv_server_sent_bytes", "bytes sent to clients, by transport",
                       ["transport"], registry=self.registry)
        auth = Counter("kvtier_kv_server_auth_failures", "calls or bulk connections refused for their "
                       "credentials (unknown token, namespace not granted, bad bulk ticket)",
                       ["transport"], registry=self.registry)
        # Bound children: the per-message paths do one increment, no label lookup.
        self._grpc_in, self._grpc_out = received.labels("grpc"), sent.labels("grpc")
        self._bulk_in, self._bulk_out = received.labels("bulk"), sent.labels("bulk")
        self._auth = {"grpc": auth.labels("grpc"), "bulk": auth.labels("bulk")}
        if store is not None:
            self.registry.register(_StoreCollector(store))
        self._http = None

    # --- counting -------------------------------------------------------------------------
    def call_ended(self, method: str, code: str) -> None:
        self._requests.labels(method, code).inc()
        if code in _AUTH_CODES:
            self._auth["grpc"].inc()

    def bulk_received(self, nbytes: int) -> None:
        self._bulk_in.inc(nbytes)

    def bulk_sent(self, nbytes: int) -> None:
        self._bulk_out.inc(nbytes)

    def auth_failure(self, transport: str) -> None:
        self._auth[transport].inc()

    def interceptor(self) -> grpc.ServerInterceptor:
        return _MetricsInterceptor(self)

    # --- exposition -----------------------------------------------------------------------
    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve /metrics over HTTP on `port` (0: any free port); returns the bound port."""
        self._http, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _StoreCollector:
    def __init__(self, store):
        self._store = store

    def collect(self):
        snap = self._store.snapshot()
        yield GaugeMetricFamily("kvtier_kv_server_stored_bytes", "bytes of blocks held in memory",
                                value=snap.get("used_bytes", 0))
        yield GaugeMetricFamily("kvtier_kv_server_stored_blocks", "blocks held in memory",
                                value=snap.get("blocks", 0))
        yield GaugeMetricFamily("kvtier_kv_server_capacity_bytes", "memory budget of the store",
                                value=self._store.capacity_bytes)
        if "disk_bytes" in snap:  # only with --persist
            yield GaugeMetricFamily("kvtier_kv_server_persisted_bytes", "bytes of blocks in the LMDB store",
                                    value=snap["disk_bytes"])
            yield GaugeMetricFamily("kvtier_kv_server_persisted_blocks", "blocks in the LMDB store",
                                    value=snap["disk_blocks"])


def _code(context, error: BaseException | None) -> str:
    if isinstance(error, GeneratorExit):
        return "CANCELLED"  # the client went away in the middle of a streamed answer
    code = context.code()
    if code is None:
        return "OK" if error is None else "UNKNOWN"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class _MetricsInterceptor(grpc.ServerInterceptor):
    """Outermost interceptor: wraps the handler the rest of the chain (auth included) picked."""

    def __init__(self, metrics: KVServerMetrics):
        self._m = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        return _wrap(handler, method, self._m)


def _wrap(handler, method: str, m: KVServerMetrics):
    des, ser = handler.request_deserializer, handler.response_serializer

    def deserialize(raw: bytes):
        m._grpc_in.inc(len(raw))
        return des(raw) if des is not None else raw

    def serialize(message) -> bytes:
        raw = ser(message) if ser is not None else message
        m._grpc_out.inc(len(raw))
        return raw

    def unary(inner):
        def behavior(request, context):
            try:
                response = inner(request, context)
            except BaseException as e:
                m.call_ended(method, _code(context, e))
                raise
            m.call_ended(method, _code(context, None))
            return response
        return behavior

    def streaming(inner):
        if getattr(inner, "experimental_non_blocking", False):
            # Health Watch: pushes from its own thread and returns at once, so there is no
            # end to observe here; its messages are still counted by the serializer.
            return inner

        def behavior(request, context):
            try:
                yield from inner(request, context)
            except BaseException as e:
                m.call_ended(method, _code(context, e))
                raise
            m.call_ended(method, _code(context, None))
        return behavior

    kwargs = dict(request_deserializer=deserialize, response_serializer=serialize)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)
