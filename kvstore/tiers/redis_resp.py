"""A minimal RESP2 client side for the Redis tier's block transfers.

redis-py turns every MGET value into a Python `bytes` that the tier then copies again into
the destination block; here each bulk string's header line is read, then its payload is
received straight into the block's memory (or, for codecs and CUDA blocks, into one staging
buffer) and verified in place, as the kv-server's bulk-stream client does.

Reply errors:
- `$-1` (absent key) is a miss; a value failing its header or checksum, or too short to
  hold a header, is a corrupt miss (its bytes are consumed, the stream stays usable).
- A torn, malformed or late reply raises RespBroken (an OSError): the caller closes that
  connection and the values not yet read become misses. Values already verified stay hits.
- An error reply (`-ERR ...`) for the whole command raises RespError.
"""
from __future__ import annotations

import socket
import time
from collections.abc import Sequence

import torch

from kvtier.kvstore.format.codec import HEADER_BYTES, CorruptBlock
from kvtier.kvstore.socket_io import discard_exact, recv_exact_into
from kvtier.kvstore.value_receive import receive_value

_MAX_LINE = 512  # any reply line we expect is far shorter; longer means a broken stream
_READ_AHEAD = 256  # a header line, the value header and a little payload per small recv
_CRLF = b"\r\n"


class RespBroken(ConnectionError):
    """The reply stream is torn, malformed or late: the connection must not be reused."""


class RespError(Exception):
    """The server answered a command with an error reply (it is reachable)."""


def command(*args: bytes) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class RespReader:
    """Reads one socket's replies. recv_into() looks like a socket's, so the shared helpers
    (recv_exact_into, the bulk client's value receiver) read through it: bytes already
    buffered are served first, the rest comes from the socket straight into the caller's
    memory. Every socket read checks the batch deadline, so a slow trickle cannot stretch
    a batch past it (each single read is bounded by the socket's own timeout)."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock = sock
        self.deadline = deadline
        self._buf = bytearray(_MAX_LINE + _READ_AHEAD)
        self._view = memoryview(self._buf)
        self._start = self._end = 0

    def recv_into(self, view: memoryview, n: int = 0) -> int:
        n = n or len(view)
        buffered = self._end - self._start
        if buffered:
            k = min(n, buffered)
            view[:k] = self._view[self._start : self._start + k]
            self._start += k
            return k
        return self._sock_recv(view, n)

    def _sock_recv(self, view, n: int) -> int:
        if time.monotonic() > self.deadline:
            raise RespBroken("batch deadline passed")
        try:
            return self._sock.recv_into(view, n)
        except BlockingIOError:  # SO_RCVTIMEO expired
            raise TimeoutError("redis reply timed out")

    def _fill(self) -> None:
        """One socket read into the buffer, after the bytes it still holds."""
        if self._start:  # keep the unread bytes at the front of the buffer
            rest = self._end - self._start
            self._view[:rest] = self._view[self._start : self._end]
            self._start, self._end = 0, rest
        got = self._sock_recv(self._view[self._end :], len(self._buf) - self._end)
        if got == 0:
            raise RespBroken("connection closed mid-reply")
        self._end += got

    def readline(self) -> bytes:
        """One reply line, without its CRLF."""
        while True:
            at = self._buf.find(_CRLF, self._start, self._end)
            if at >= 0:
                line = bytes(self._view[self._start : at])
                self._start = at + 2
                return line
            if self._end - self._start >= _MAX_LINE:
                raise RespBroken("reply line too long")
            self._fill()

    def expect_crlf(self) -> None:
        """The CRLF after a bulk string. Read through the buffer, so the one read that brings
        it also brings the next element's length line and value header (a value received
        straight into its block leaves the buffer empty: a bare 2-byte read here cost one
        more syscall per value)."""
        while self._end - self._start < 2:
            self._fill()
        if self._view[self._start : self._start + 2] != _CRLF:
            raise RespBroken("bulk string not followed by CRLF")
        self._start += 2

    def simple_reply(self) -> bytes:
        """A status or integer reply's text; RespError for an error reply."""
        line = self.readline()
        kind = line[:1]
        if kind in (b"+", b":"):
            return line[1:]
        if kind == b"-":
            raise RespError(line[1:].decode(errors="replace"))
        raise RespBroken(f"unexpected reply {line[:32]!r}")


def _int(line: bytes) -> int:
    try:
        return int(line[1:])
    except ValueError:
        raise RespBroken(f"malformed length {line[:32]!r}")


def read_mget_into(reader: RespReader, digests: Sequence[bytes], into: Sequence[torch.Tensor],
                   ok: list[bool], corrupt: list[int], offset: int = 0) -> int:
    """Read one MGET reply for len(digests) keys into the tensors; marks ok[offset + i] and
    appends corrupt positions as it goes (so a caller that catches RespBroken keeps what was
    verified). Returns the value bytes read."""
    head = reader.readline()
    if head[:1] == b"-":
        raise RespError(head[1:].decode(errors="replace"))
    if head[:1] != b"*" or _int(head) != len(digests):
        raise RespBroken(f"unexpected MGET reply {head[:32]!r}")
    value_head = memoryview(bytearray(HEADER_BYTES))
    nbytes = 0
    for i, (digest, dst) in enumerate(zip(digests, into)):
        line = reader.readline()
        if line[:1] != b"$":
            raise RespBroken(f"unexpected MGET element {line[:32]!r}")
        size = _int(line)
        if size < 0:
            continue  # absent
        if size < HEADER_BYTES:
            if size:
                discard_exact(reader, size)
            reader.expect_crlf()
            corrupt.append(offset + i)
            continue
        recv_exact_into(reader, value_head)
        try:
            receive_value(reader, value_head, size, digest, dst)
        except CorruptBlock:  # its bytes were consumed: the stream is still in step
            reader.expect_crlf()
            corrupt.append(offset + i)
            continue
        reader.expect_crlf()
        ok[offset + i] = True
        nbytes += size
    return nbytes
