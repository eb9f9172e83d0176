"""Client side of the kv-server's bulk stream (protocol: service/bulk_protocol.py).

One BulkClient per server keeps a few open connections (one per concurrent call). A new
connection costs one OpenBulk gRPC call for its ticket, a TCP (TLS) connect and the HELLO
round trip; after that a put is its frames and one SYNC round trip, a get one round trip
whose values land straight in the destination tensors. When the server has no bulk stream
(OpenBulk answers port 0) or its bulk port cannot be reached, connection() answers None
and the caller uses gRPC's Put and Get instead.

The same when the server refuses or drops us for one of its limits (OpenBulk or the HELLO
answered RESOURCE_EXHAUSTED, the port full, a put over the tenant's in-flight bytes): the
call goes through gRPC and so do calls for RETRY_REFUSED_S after, so blocks stay hits. The
reason is logged rate-limited and counted (`fallbacks`). A timeout is not a refusal: a
frozen server must cost one deadline, not two.
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable

import torch
from kvtier.kvstore.faults import FaultLog
from kvtier.kvstore.format.codec import HEADER_BYTES, CorruptBlock
from kvtier.kvstore.service.bulk_protocol import (
    MAGIC,
    OK,
    RESOURCE_EXHAUSTED,
    STATUS_NAMES,
    SYNC_FRAME,
    VALUE_LENGTH,
    BulkError,
    get_request,
    put_frame,
    read_reply,
)
from kvtier.kvstore.service.tls import certificate_problem
from kvtier.kvstore.socket_io import BatchedSender, idle_and_open, recv_exact_into, set_kernel_timeouts
from kvtier.kvstore.value_receive import receive_value

log = logging.getLogger(__name__)

RETRY_UNREACHABLE_S = 60.0  # after the bulk port could not be reached, use gRPC this long
RETRY_REFUSED_S = 5.0  # after the bulk port refused or dropped us (a server limit), likewise
_MAX_IDLE = 8  # open connections kept per server


class BulkClient:
    def __init__(self, host: str, open_bulk: Callable[[], object], *, timeout_s: float,
                 ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None):
        self._host = host
        self._open_bulk = open_bulk  # the OpenBulk call (raises grpc.RpcError)
        self._timeout = timeout_s
        self._ssl, self._server_hostname = ssl_context, server_hostname or host
        self._lock = threading.Lock()
        self._idle: list[socket.socket] = []
        self._use_grpc_until = 0.0
        self._faults = FaultLog(log)

    @property
    def fallbacks(self) -> int:
        """Calls that went through gRPC because the bulk stream refused, dropped or (TLS) could
        not verify them."""
        return self._faults.total()

    def refused(self, error: OSError) -> bool:
        """Whether `error` (from connection, put or get_into) was the server refusing or
        dropping the connection; if so the caller retries over gRPC, as will calls for
        RETRY_REFUSED_S. A timeout or a refused block is not: the caller sees it."""
        if isinstance(error, BulkError):
            refused = error.dropped or error.status == RESOURCE_EXHAUSTED
        else:
            refused = isinstance(error, (ConnectionError, ssl.SSLEOFError))
        if refused:
            self._use_grpc_until = time.monotonic() + RETRY_REFUSED_S
            self._faults.record(f"kv-server {self._host} bulk stream refused or dropped a call; gRPC instead", str(error))
        return refused

    def connection(self) -> socket.socket | None:
        """An open, authenticated connection; None when calls should go through gRPC."""
        if time.monotonic() < self._use_grpc_until:
            return None
        with self._lock:
            while self._idle:
                sock = self._idle.pop()
                if idle_and_open(sock):
                    return sock
                sock.close()
        try:
            reply = self._open_bulk()  # BulkError(RESOURCE_EXHAUSTED): no ticket for us now
        except BulkError as e:
            if self.refused(e):
                return None
            raise
        if reply.port == 0:
            self._use_grpc_until = float("inf")  # the server has no bulk stream
            return None
        host = reply.host or self._host
        try:
            sock = socket.create_connection((host, reply.port), timeout=self._timeout)
        except OSError as e:
            log.warning("kv-server bulk stream at %s:%d unreachable (%s); using gRPC for %.0f s",
                        host, reply.port, e, RETRY_UNREACHABLE_S)
            self._use_grpc_until = time.monotonic() + RETRY_UNREACHABLE_S
            return None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_kernel_timeouts(sock, self._timeout)
            if reply.tls:
                if self._ssl is None:
                    raise BulkError("the kv-server's bulk stream needs TLS; configure the tier with tls=1")
                sock = self._ssl.wrap_socket(sock, server_hostname=self._server_hostname)
            sock.sendall(MAGIC + reply.ticket)
            status, _, _, message = read_reply(sock)
        except BaseException as e:
            sock.close()
            problem = certificate_problem(e)
            if problem is not None:  # a certificate gRPC's TLS may still accept: use gRPC
                self._faults.record(f"kv-server bulk stream at {host}:{reply.port}: TLS handshake failed; falling "
                                    f"back to gRPC for {RETRY_UNREACHABLE_S:.0f} s (the bulk stream verifies "
                                    "certificates strictly: README, TLS certificates)", problem)
                self._use_grpc_until = time.monotonic() + RETRY_UNREACHABLE_S
                return None
            if isinstance(e, OSError) and self.refused(e):  # dropped before the HELLO was answered
                return None
            raise
        if status != OK:
            sock.close()
            self.refused(BulkError(f"bulk stream refused the connection: {STATUS_NAMES.get(status, status)} "
                                   f"{message}", status, dropped=True))
            return None
        return sock

    def put(self, sock: socket.socket, items: Iterable[tuple[bytes, tuple | bytes]]) -> int:
        """Send (key, value) pairs, a value being bytes or (header, payload) pieces, then SYNC;
        the blocks stored. BulkError (an OSError) when the server refused some or the stream
        broke; the connection is then closed, else it goes back to the pool."""
        try:
            try:
                out = BatchedSender(sock)
                for key, value in items:
                    head, payload = value if isinstance(value, tuple) else (b"", value)
                    out.add(put_frame(key, len(head) + len(payload)) + head, payload)
                out.add(SYNC_FRAME)
                out.flush()
            except OSError as e:
                raise _why_closed(sock, e)
            status, stored, rejected, message = read_reply(sock)
            if status != OK:
                raise BulkError(f"{rejected} block(s) refused: {message}", status, stored)
        except BaseException:
            sock.close()
            raise
        self.release(sock)
        return stored

    def get_into(self, sock: socket.socket, keys: list[bytes], digests: list[bytes], into: list[torch.Tensor]
                 ) -> tuple[list[bool], list[int], int]:
        """GET the keys; each raw value's payload is received straight into its tensor, the
        rest decoded from a buffer; every one verified. (ok flags, positions of corrupt
        values, bytes read). A tensor whose value failed holds unchecked bytes: it is not ok."""
        ok, corrupt, nbytes = [False] * len(keys), [], 0
        length, head = memoryview(bytearray(VALUE_LENGTH.size)), memoryview(bytearray(HEADER_BYTES))
        try:
            sock.sendall(get_request(keys))
            for i, (digest, dst) in enumerate(zip(digests, into)):
                recv_exact_into(sock, length)
                size = VALUE_LENGTH.unpack(length)[0]
                if size == 0:
                    continue  # absent
                if size < HEADER_BYTES:
                    raise BulkError(f"GET answered a {size}-byte value, shorter than a block header")
                recv_exact_into(sock, head)
                try:
                    receive_value(sock, head, size, digest, dst)
                except CorruptBlock:
                    corrupt.append(i)
                    continue
                ok[i] = True
                nbytes += size
        except BaseException:
            sock.close()
            raise
        self.release(sock)
        return ok, corrupt, nbytes

    def release(self, sock: socket.socket) -> None:
        """Back to the pool (for a caller that used the connection directly)."""
        with self._lock:
            if len(self._idle) < _MAX_IDLE:
                self._idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()


def _why_closed(sock: socket.socket, error: OSError) -> BulkError:
    """A send failed: the server may have closed after an error reply; read it if so."""
    try:
        set_kernel_timeouts(sock, 0.5)
        status, stored, rejected, message = read_reply(sock)
        return BulkError(message or str(error), status, stored)
    except OSError:
        return BulkError(f"bulk stream broke: {error}", dropped=isinstance(error, ConnectionError))
