"""The kv-server's bulk-stream listener (protocol: service/bulk_protocol.py).

One thread per connection, each receiving every value straight into the buffer the store
then keeps (recv_into, no intermediate copies), verifying it with the same checks as the
gRPC Put, and handing verified blocks to the store in batches; a GET's values go out by
scatter-gather sendmsg straight from the stored buffers. Connections come in through
tickets that OpenBulk issued after authenticating the gRPC call, so this file knows nothing
about tokens: a ticket stands for one namespace, once.
"""
from __future__ import annotations

import logging
import secrets
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
HANDSHAKE_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 256


class BulkTickets:
    """One-time tickets: OpenBulk issues one per connection; the connection redeems it."""

    def __init__(self, ttl_s: float = 30.0, limit: int = 10_000):
        self.ttl_s = ttl_s
        self._limit = limit
        self._lock = threading.Lock()
        self._open: dict[bytes, tuple[bytes, float]] = {}  # ticket -> (namespace tag, expiry)

    def issue(self, tag: bytes) -> bytes | None:
        """A new ticket for namespace `tag`, or None when too many are outstanding."""
        now = time.monotonic()
        with self._lock:
            if len(self._open) >= self._limit:
                self._open = {t: v for t, v in self._open.items() if v[1] > now}
                if len(self._open) >= self._limit:
                    return None
            ticket = secrets.token_bytes(32)
            self._open[ticket] = (tag, now + self.ttl_s)
        return ticket

    def redeem(self, ticket: bytes) -> bytes | None:
        """The ticket's namespace tag, once; None for an unknown, used or expired ticket."""
        with self._lock:
            entry = self._open.pop(ticket, None)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]


class _FatalFrame(Exception):
    """A frame that leaves the stream untrustworthy: reply with this status and close."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class BulkListener:
    def __init__(self, host: str, port: int, store: BlockStore, *, advertised_host: str = "",
                 ssl_context: ssl.SSLContext | None = None, tickets: BulkTickets | None = None):
        self._store, self._ssl = store, ssl_context
        self.tickets = tickets or BulkTickets()
        self.advertised_host = advertised_host  # empty: clients use the host they reached gRPC on
        self._sock = socket.create_server((host, port), backlog=64)
        self.port = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, bool] = {}  # -> busy (inside a batch)
        self._closing = False
        self._accepter = threading.Thread(target=self._accept_loop, name="kvtier-bulk-accept", daemon=True)

    @property
    def tls(self) -> bool:
        return self._ssl is not None

    def start(self) -> None:
        self._accepter.start()

    def stop(self, grace: float) -> None:
        """Stop accepting; close idle connections now and busy ones once their batch is
        answered, or after `grace` seconds."""
        with self._lock:
            self._closing = True
        self._sock.close()
        deadline = time.monotonic() + grace
        while True:
            with self._lock:
                idle = [c for c, busy in self._connections.items() if not busy]
                left = len(self._connections)
            for conn in idle:
                _shutdown(conn)
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        with self._lock:
            for conn in self._connections:
                _shutdown(conn)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # the listening socket was closed: stop()
            with self._lock:
                if self._closing or len(self._connections) >= MAX_CONNECTIONS:
                    conn.close()
                    continue
                self._connections[conn] = False
            threading.Thread(target=self._serve, args=(conn,), name="kvtier-bulk", daemon=True).start()

    def _set_busy(self, conn: socket.socket, busy: bool) -> bool:
        """Mark the connection; False when the server is closing and it is idle now."""
        with self._lock:
            self._connections[conn] = busy
            return busy or not self._closing

    def _serve(self, conn: socket.socket) -> None:
        sock = conn
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(conn, server_side=True)
            tag = self._handshake(sock)
            if tag is not None:
                set_kernel_timeouts(sock, IDLE_TIMEOUT_S)
                _BulkSession(self, conn, sock, tag).run()
        except (OSError, StoreUnavailable):  # ssl.SSLError is an OSError
            pass  # the client went away, or the disk failed a GET: the client sees the close
        finally:
            with self._lock:
                self._connections.pop(conn, None)
            sock.close()

    def _handshake(self, sock) -> bytes | None:
        hello = bytearray(HELLO_BYTES)
        recv_exact_into(sock, memoryview(hello))
        tag = self.tickets.redeem(bytes(hello[len(MAGIC):])) if hello.startswith(MAGIC) else None
        if tag is None:
            sock.sendall(encode_reply(UNAUTHENTICATED, message="unknown, used or expired bulk ticket"))
            return None
        sock.sendall(encode_reply(OK))
        return tag


class _BulkSession:
    """The frames of one authenticated connection."""

    def __init__(self, listener: BulkListener, conn: socket.socket, sock, tag: bytes):
        self._listener, self._conn, self._sock, self._tag = listener, conn, sock, tag
        self._store = listener._store
        self._batch = PutBatch(self._store)
        self._rejected = 0
        self._problem: tuple[int, str] | None = None  # the first rejection since the last SYNC

    def run(self) -> None:
        head = memoryview(bytearray(FRAME.size))
        while True:
            recv_exact_into(self._sock, head)
            op, key_len, value_len = FRAME.unpack(head)
            try:
                if op not in (OP_PUT, OP_SYNC, OP_GET):
                    raise _FatalFrame(INVALID_ARGUMENT, f"unknown frame op {op}")
                self._listener._set_busy(self._conn, True)
                if op == OP_PUT:
                    self._receive_block(key_len, value_len)
                    continue  # still inside the batch: busy until its SYNC
                if op == OP_SYNC:
                    self._sync()
                else:
                    self._answer_get(value_len)
                if not self._listener._set_busy(self._conn, False):
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
        key = bytearray(key_len)
        recv_exact_into(self._sock, memoryview(key))
        # np.empty: the buffer the store keeps, filled by the kernel with no zeroing pass first
        value = memoryview(np.empty(value_len, dtype=np.uint8)).cast("B")
        recv_exact_into(self._sock, value)
        key = bytes(key)
        problem = value_problem(key, value)
        if problem is not None:
            self._reject(INVALID_ARGUMENT, f"block {index}: {problem}")
            return
        try:
            self._batch.add(self._tag + key, value)
        except StoreUnavailable as e:
            raise _FatalFrame(UNAVAILABLE, f"persistent store failed: {e}")

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
        for value in self._store.get_many(keys):
            if value is None:
                out.add(VALUE_LENGTH.pack(0))  # absent
            else:
                out.add(VALUE_LENGTH.pack(len(value)), value)
        out.flush()

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
