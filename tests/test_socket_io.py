"""The socket helpers under the Redis writer and the kv-server's bulk stream."""
import socket
import threading

import pytest
from kvtier.kvstore.socket_io import PeerClosed, recv_exact_into, send_buffers


def test_scatter_gather_send_survives_partial_sends():
    """send_buffers over a socket whose buffer is far smaller than the data: sendmsg
    returns in the middle of buffers and the rest must still arrive, in order, byte for
    byte (an empty buffer and a byte-formatted view included)."""
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    payload = memoryview(bytes(range(256)) * 8192)  # 2 MiB
    buffers = [b"header:" * 100, payload, b"", b"next", payload[:100_001], b"end"]
    expected = b"".join(bytes(x) for x in buffers)
    received = bytearray()

    def drain():
        while len(received) < len(expected):
            received.extend(b.recv(65536))

    reader = threading.Thread(target=drain)
    reader.start()
    send_buffers(a, buffers)
    reader.join(10)
    a.close()
    b.close()
    assert bytes(received) == expected


def test_recv_exact_fills_the_view_across_many_reads_and_reports_an_early_close():
    a, b = socket.socketpair()
    data = bytes(range(256)) * 4096  # 1 MiB, more than one read
    sender = threading.Thread(target=a.sendall, args=(data,))
    sender.start()
    out = bytearray(len(data))
    recv_exact_into(b, memoryview(out))
    sender.join(10)
    assert out == data
    a.sendall(b"abc")
    a.close()
    with pytest.raises(PeerClosed, match="after 3 of 10 bytes"):
        recv_exact_into(b, memoryview(bytearray(10)))
    b.close()
