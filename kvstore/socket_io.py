"""Socket helpers shared by the Redis writer and the kv-server's bulk stream."""
from __future__ import annotations

import select
import socket
import ssl
import struct


class PeerClosed(ConnectionError):
    """The peer closed the connection before everything expected arrived."""


def set_kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Bound every send and receive by `seconds` in the kernel (SO_SNDTIMEO / SO_RCVTIMEO)
    and leave the socket in blocking mode. A Python-level timeout would do the same with a
    poll() before every send and recv: twice the syscalls on a path that makes one per
    block. A timed-out call raises TimeoutError here (BlockingIOError from the kernel)."""
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from the socket, straight into its memory (no intermediate bytes)."""
    got, n = 0, len(view)
    while got < n:
        try:
            r = sock.recv_into(view[got:], n - got)
        except BlockingIOError:  # SO_RCVTIMEO expired
            raise TimeoutError(f"timed out after {got} of {n} bytes")
        if r == 0:
            raise PeerClosed(f"connection closed after {got} of {n} bytes")
        got += r


# Senders of many blocks pass about this many bytes per send_buffers call: one syscall and
# one wake-up of the receiver per batch instead of per block.
SEND_BATCH_BYTES = 1 << 20


class BatchedSender:
    """Buffers queued for one socket, sent by send_buffers about SEND_BATCH_BYTES at a time.
    Queued buffers must stay valid until flush() (they are sent as they are, not copied)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._buffers: list = []
        self._bytes = 0

    def add(self, *buffers) -> None:
        self._buffers += buffers
        self._bytes += sum(len(b) for b in buffers)
        if self._bytes >= SEND_BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._buffers:
            send_buffers(self._sock, self._buffers)
        self._buffers, self._bytes = [], 0


def send_buffers(sock: socket.socket, buffers: list) -> None:
    """Send the buffers in order with scatter-gather sendmsg calls, looping over partial
    sends, so large payloads are never joined to their small headers and a batch of blocks
    costs one syscall (and one wake-up of the receiver) rather than one per piece. TLS
    sockets have no sendmsg and get one sendall per buffer. Buffers must be byte-formatted
    (bytes, or memoryviews of format "B")."""
    if isinstance(sock, ssl.SSLSocket):
        for buffer in buffers:
            sock.sendall(buffer)
        return
    views = [memoryview(b) for b in buffers]
    i = 0
    while i < len(views):
        sent = sock.sendmsg(views[i : i + _IOV_MAX])
        while i < len(views) and sent >= len(views[i]):
            sent -= len(views[i])
            i += 1
        if sent:
            views[i] = views[i][sent:]


_IOV_MAX = 1024  # Linux's limit on buffers per sendmsg


def discard_exact(sock: socket.socket, n: int) -> None:
    """Read and drop exactly n bytes (a value that failed its checks, to stay in sync)."""
    scratch = memoryview(bytearray(min(n, 1 << 20)))
    while n:
        step = min(n, len(scratch))
        recv_exact_into(sock, scratch[:step])
        n -= step


def idle_and_open(sock: socket.socket) -> bool:
    """An idle connection is readable only when the peer closed it (or broke protocol).
    poll, not select: select fails on descriptors above 1023, common in a busy engine."""
    poller = select.poll()
    try:
        poller.register(sock, select.POLLIN)
        return not poller.poll(0)
    except (OSError, ValueError):
        return False
