"""Receiving one stored value from a socket straight into its destination tensor: the
bulk stream's gets and the Redis tier's RESP reader share it."""
from __future__ import annotations

import socket

import torch
from kvtier.kvstore.format.codec import HEADER_BYTES, CorruptBlock, decode_into, payload_destination, verify_payload
from kvtier.kvstore.socket_io import discard_exact, recv_exact_into


def receive_value(sock: socket.socket, head: memoryview, size: int, digest: bytes, dst: torch.Tensor) -> None:
    """The rest of one value (its header already read) into dst; CorruptBlock, with the
    value's bytes consumed all the same, when it fails its checks."""
    try:
        target = payload_destination(head, size, digest, dst)
    except CorruptBlock:
        discard_exact(sock, size - HEADER_BYTES)
        raise
    if target is not None:
        recv_exact_into(sock, target)
        verify_payload(head, target)
        return
    value = bytearray(size)
    value[:HEADER_BYTES] = head
    recv_exact_into(sock, memoryview(value)[HEADER_BYTES:])
    decode_into(value, digest, dst)
