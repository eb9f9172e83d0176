"""The kv-server's bulk stream: block values over a plain TCP (or TLS) connection.

Why a second transport: Python's gRPC moves about 1.2 GB/s on loopback even when the server
does nothing with the bytes (HTTP/2 framing and several copies per message inside grpcio),
while a socket written with sendmsg and read with recv_into into the final buffer moves
2-3 GB/s. So blocks travel here both ways (a GET's values go straight into the client's
destination tensors) and gRPC keeps the calls where the bytes are few (Lookup, Delete,
Stats); gRPC's Put and Get stay for clients and servers without a bulk stream.

    client                                   server
    HELLO  b"KVTBULK1" + ticket (32 B)  ->
                                        <-   REPLY (OK, or an error and close)
    PUT    frame + key + value          ->   (any number; no reply each)
    SYNC   frame                        ->
                                        <-   REPLY: stored / rejected since the last SYNC
    GET    frame + n x (u16 length, key)->
                                        <-   n x (u64 length, value); length 0: absent

The ticket comes from the OpenBulk gRPC call, so authentication and the namespace are
decided once, by the same code as every gRPC call. A value that fails its checks is
rejected alone (the stream continues: its length was known); a frame that cannot be
trusted (unknown op, bad key length, a value larger than the store) ends the connection
after an error reply. Status numbers are gRPC's, so both transports report alike.
"""
from __future__ import annotations

import socket
import struct

from kvtier.kvstore.socket_io import recv_exact_into

MAGIC = b"KVTBULK1"
TICKET_BYTES = 32
HELLO_BYTES = len(MAGIC) + TICKET_BYTES

OP_PUT, OP_SYNC, OP_GET = 1, 2, 3
FRAME = struct.Struct("<BxHQ")  # op, key length, value length (GET: 0, number of keys)
KEY_LENGTH = struct.Struct("<H")  # before each key of a GET
VALUE_LENGTH = struct.Struct("<Q")  # before each value a GET answers
MAX_GET_KEYS = 65536
REPLY = struct.Struct("<BIIH")  # status, stored, rejected, message length (then the message)

# gRPC status numbers
OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE, UNAUTHENTICATED = 0, 3, 8, 14, 16
STATUS_NAMES = {OK: "OK", INVALID_ARGUMENT: "INVALID_ARGUMENT", RESOURCE_EXHAUSTED: "RESOURCE_EXHAUSTED",
                UNAVAILABLE: "UNAVAILABLE", UNAUTHENTICATED: "UNAUTHENTICATED"}
MAX_MESSAGE_CHARS = 1000


class BulkError(OSError):
    """The bulk stream failed: the connection broke, or the server refused something."""

    def __init__(self, message: str, status: int = UNAVAILABLE, stored: int = 0, dropped: bool = False):
        super().__init__(message)
        self.status = status
        self.stored = stored  # blocks the server did store before the failure was reported
        self.dropped = dropped  # the server closed the connection without a reply (a limit, a restart)

    @property
    def status_name(self) -> str:
        return STATUS_NAMES.get(self.status, str(self.status))


def put_frame(key: bytes, value_bytes: int) -> bytes:
    return FRAME.pack(OP_PUT, len(key), value_bytes) + key


SYNC_FRAME = FRAME.pack(OP_SYNC, 0, 0)


def get_request(keys: list[bytes]) -> bytes:
    return FRAME.pack(OP_GET, 0, len(keys)) + b"".join(KEY_LENGTH.pack(len(k)) + k for k in keys)


def encode_reply(status: int, stored: int = 0, rejected: int = 0, message: str = "") -> bytes:
    text = message[:MAX_MESSAGE_CHARS].encode("utf-8", "replace")
    return REPLY.pack(status, stored, rejected, len(text)) + text


def read_reply(sock: socket.socket) -> tuple[int, int, int, str]:
    """(status, stored, rejected, message); PeerClosed if the connection ends first."""
    head = bytearray(REPLY.size)
    recv_exact_into(sock, memoryview(head))
    status, stored, rejected, length = REPLY.unpack(head)
    text = bytearray(length)
    recv_exact_into(sock, memoryview(text))
    return status, stored, rejected, text.decode("utf-8", "replace")
