"""The kv-server's bulk-stream listener (protocol: service/bulk_protocol.py).

One thread per connection, each receiving every value straight into the buffer the store
then keeps (recv_into, no intermediate copies), verifying it with the same checks as the
gRPC Put, and handing verified blocks to the store in batches; a GET's values go out by
scatter-gather sendmsg straight from the stored buffers. Connections come in through
tickets that OpenBulk issued after authenticating the gRPC call, so this file knows nothing
about tokens: a ticket stands for one namespace and one tenant, once. Who may connect, and
for how long before the ticket arrives, is admission.py; per-tenant limits are limits.py.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

import numpy as np
from kvtier.kvstore.tiers.byte_store import StoreUnavailable
from kvtier.kvstore.format.codec import HEADER_BYTES
from kvtier.kvstore.service.bulk_protocol import (
    FRAME,
    HELLO_BYTES,
    INVALID_ARGUMENT,
    KEY_LENGTH,
    MAGIC,
    MAX_GET_KEYS,
    OK,
    OP_GET,
    OP_PUT,
    OP_SYNC,
    RESOURCE_EXHAUSTED,
    UNAUTHENTICATED,
    UNAVAILABLE,
    VALUE_LENGTH,
    encode_reply,
)
from kvtier.kvstore.service.server.admission import ConnectionTable
from kvtier.kvstore.service.server.limits import BulkLimits, TenantQuota
from kvtier.kvstore.service.server.metrics import KVServerMetrics
from kvtier.kvstore.service.server.tickets import BulkTickets
from kvtier.kvstore.service.server.store import (
    MAX_KEY_BYTES,
    BlockStore,
    PutBatch,
    value_problem,
)
from kvtier.kvstore.socket_io import (
    BatchedSender,
    recv_exact_into,
    set_kernel_timeouts,
)

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 600.0  # a pooled client connection unused this long is closed


class _FatalFrame(Exception):
    """A frame that leaves the stream untrustworthy: reply with this status and close."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class BulkListener:
    def __init__(self, host: str, port: int, store: BlockStore, *, advertised_host: str = "",
                 ssl_context: ssl.SSLContext | None = None, limits: BulkLimits | None = None,
                 tickets: BulkTickets | None = None, metrics: KVServerMetrics | None = None):
        self._store, self._ssl = store, ssl_context
        self.metrics = metrics if metrics is not None else KVServerMetrics()
        self.limits = limits = limits or BulkLimits()
        self.tickets = tickets or BulkTickets(limits.ticket_ttl_s, limits.max_tickets, limits.max_tickets_per_tenant)
        self.inflight = TenantQuota(limits.max_inflight_bytes_per_tenant, limits.max_inflight_bytes)
        self.advertised_host = advertised_host  # empty: clients use the host they reached gRPC on
        self._sock = socket.create_server((host, port), backlog=64)
        self.port = self._sock.getsockname()[1]
        self.table = ConnectionTable(limits)
        self._accepter = threading.Thread(target=self._accept_loop, name="kvtier-bulk-accept", daemon=True)

    @property
    def tls(self) -> bool:
        return self._ssl is not None

    def start(self) -> None:
        self._accepter.start()

    def stop(self, grace: float) -> None:
        """Stop accepting; close idle connections now and busy ones once their batch is
        answered, or after `grace` seconds."""
        self.table.close()
        self._sock.close()
        deadline = time.monotonic() + grace
        while True:
            idle, every = self.table.snapshot()
            for conn in idle:
                _shutdown(conn)
            if not every or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        for conn in self.table.snapshot()[1]:
            _shutdown(conn)

    def _accept_loop(self) -> None:
        # accept() wakes at least this often to end handshakes past their deadline
        self._sock.settimeout(min(0.25, self.limits.handshake_timeout_s / 4))
        while True:
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                conn = None
            except OSError:
                return  # the listening socket was closed: stop()
            for late in self.table.expired():
                _shutdown(late)
            if conn is None:
                continue
            drop = self.table.admit(conn, peer[0])
            for victim in drop:
                _shutdown(victim)  # its thread sees the close and cleans up
            if conn in drop:
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="kvtier-bulk", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        sock = conn
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # bounds each recv; the table's deadline (enforced by the accept loop) bounds the whole
            conn.settimeout(self.limits.handshake_timeout_s)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(conn, server_side=True)
            grant = self._handshake(conn, sock)
            if grant is not None:
                set_kernel_timeouts(sock, IDLE_TIMEOUT_S)
                _BulkSession(self, conn, sock, *grant).run()
        except (OSError, StoreUnavailable):  # ssl.SSLError is an OSError
            pass  # the client went away, or the disk failed a GET: the client sees the close
        finally:
            self.table.remove(conn)
            sock.close()

    def _handshake(self, conn: socket.socket, sock) -> tuple[bytes, bytes] | None:
        """(namespace tag, tenant) of a connection that redeemed a ticket and fits its
        tenant's share; None after a refusal."""
        hello = bytearray(HELLO_BYTES)
        recv_exact_into(sock, memoryview(hello))
        grant = self.tickets.redeem(bytes(hello[len(MAGIC):])) if hello.startswith(MAGIC) else None
        if grant is None:
            self.metrics.auth_failure("bulk")
            sock.sendall(encode_reply(UNAUTHENTICATED, message="unknown, used or expired bulk ticket"))
            return None
        refused = self.table.authenticated(conn, grant[1])
        if refused is not None:
            sock.sendall(encode_reply(RESOURCE_EXHAUSTED, message=refused))
            return None
        sock.sendall(encode_reply(OK))
        return grant


class _BulkSession:
    """The frames of one authenticated connection."""

    def __init__(self, listener: BulkListener, conn: socket.socket, sock, tag: bytes, tenant: bytes):
        self._listener, self._conn, self._sock, self._tag = listener, conn, sock, tag
        self._tenant, self._inflight = tenant, listener.inflight
        self._held = 0  # in-flight bytes reserved: values received or being received, not yet stored
        self._store = listener._store
        self._batch = PutBatch(self._store)
        self._rejected = 0
        self._problem: tuple[int, str] | None = None  # the first rejection since the last SYNC

    def run(self) -> None:
        try:
            self._frames()
        finally:
            self._inflight.release(self._tenant, self._held)

    def _frames(self) -> None:
        head = memoryview(bytearray(FRAME.size))
        table = self._listener.table
        while True:
            recv_exact_into(self._sock, head)
            op, key_len, value_len = FRAME.unpack(head)
            try:
                if op not in (OP_PUT, OP_SYNC, OP_GET):
                    raise _FatalFrame(INVALID_ARGUMENT, f"unknown frame op {op}")
                table.set_busy(self._conn, True)
                if op == OP_PUT:
                    self._receive_block(key_len, value_len)
                    continue  # still inside the batch: busy until its SYNC
                if op == OP_SYNC:
                    self._sync()
                else:
                    self._answer_get(value_len)
                if not table.set_busy(self._conn, False):
                    return  # the server is closing and this connection's work is answered
            except _FatalFrame as e:
                self._flush()  # blocks that arrived whole and verified are kept
                self._sock.sendall(encode_reply(e.status, self._batch.take_stored(), self._rejected + 1, str(e)))
                return

    def _receive_block(self, key_len: int, value_len: int) -> None:
        index = self._batch.stored + self._batch.pending + self._rejected
        if not 0 < key_len <= MAX_KEY_BYTES:
            raise _FatalFrame(INVALID_ARGUMENT, f"block {index}: key of {key_len} bytes (1 to {MAX_KEY_BYTES} allowed)")
        capacity = self._store.capacity_bytes
        if value_len > capacity:
            raise _FatalFrame(RESOURCE_EXHAUSTED,
                              f"block {index}: {value_len} bytes exceed the store's capacity of {capacity}")
        if value_len < HEADER_BYTES:
            raise _FatalFrame(INVALID_ARGUMENT, f"block {index}: {value_len} bytes is shorter than a block header")
        self._reserve(value_len, index)
        key = bytearray(key_len)
        recv_exact_into(self._sock, memoryview(key))
        # np.empty: the buffer the store keeps, filled by the kernel with no zeroing pass first
        value = memoryview(np.empty(value_len, dtype=np.uint8)).cast("B")
        recv_exact_into(self._sock, value)
        self._listener.metrics.bulk_received(key_len + value_len)
        key = bytes(key)
        problem = value_problem(key, value)
        if problem is not None:
            self._release(value_len)
            self._reject(INVALID_ARGUMENT, f"block {index}: {problem}")
            return
        try:
            self._batch.add(self._tag + key, value)
        except StoreUnavailable as e:
            raise _FatalFrame(UNAVAILABLE, f"persistent store failed: {e}")
        if not self._batch.pending:  # add() flushed: the store holds (and counts) those bytes now
            self._release(self._held)

    def _reserve(self, n: int, index: int) -> None:
        """Count a value against its tenant's in-flight bytes before its buffer exists: one
        tenant's slow or huge puts cannot take the memory another's need."""
        if self._inflight.acquire(self._tenant, n):
            self._held += n
            return
        self._flush()  # this connection's own queued blocks count too: store them first
        if not self._inflight.acquire(self._tenant, n):
            limits = self._listener.limits
            raise _FatalFrame(RESOURCE_EXHAUSTED, f"block {index}: {n} more bytes in flight exceed this "
                              f"tenant's limit of {limits.max_inflight_bytes_per_tenant} or the server's of "
                              f"{limits.max_inflight_bytes}")
        self._held += n

    def _release(self, n: int) -> None:
        self._inflight.release(self._tenant, n)
        self._held -= n

    def _answer_get(self, count: int) -> None:
        if count > MAX_GET_KEYS:
            raise _FatalFrame(INVALID_ARGUMENT, f"GET of {count} keys; at most {MAX_GET_KEYS} per call")
        keys = []
        size = memoryview(bytearray(KEY_LENGTH.size))
        for i in range(count):
            recv_exact_into(self._sock, size)
            key_len = KEY_LENGTH.unpack(size)[0]
            if not 0 < key_len <= MAX_KEY_BYTES:
                raise _FatalFrame(INVALID_ARGUMENT, f"GET key {i}: {key_len} bytes (1 to {MAX_KEY_BYTES} allowed)")
            key = bytearray(key_len)
            recv_exact_into(self._sock, memoryview(key))
            keys.append(self._tag + key)
        out = BatchedSender(self._sock)
        sent = 0
        for value in self._store.get_many(keys):
            if value is None:
                out.add(VALUE_LENGTH.pack(0))  # absent
            else:
                out.add(VALUE_LENGTH.pack(len(value)), value)
                sent += len(value)
        out.flush()
        self._listener.metrics.bulk_sent(sent)

    def _reject(self, status: int, message: str) -> None:
        self._store.reject()
        self._rejected += 1
        if self._problem is None:
            self._problem = (status, message)

    def _flush(self) -> None:
        try:
            self._batch.flush()
        except StoreUnavailable as e:
            self._reject(UNAVAILABLE, f"persistent store failed: {e}")
        finally:
            self._release(self._held)  # stored or dropped: no longer in flight

    def _sync(self) -> None:
        self._flush()
        status, message = self._problem or (OK, "")
        self._sock.sendall(encode_reply(status, self._batch.take_stored(), self._rejected, message))
        self._rejected, self._problem = 0, None


def _shutdown(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
