"""A tiny TCP proxy for fault tests: passes bytes both ways, and can break the server's
reply stream at an exact byte offset (cut it, flip a byte, stall, or run a callback such as
killing the server). Binds 127.0.0.1 on a free port; one fault armed at a time, counted
from the bytes the server sends after arm()."""
from __future__ import annotations

import socket
import threading


class FaultProxy:
    def __init__(self, upstream_port: int):
        self.upstream = ("127.0.0.1", upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._fault: tuple | None = None
        self._seen = 0  # server->client bytes since arm()
        self._closed = threading.Event()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, scheme: str = "redis") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def arm(self, kind: str, after: int, callback=None) -> None:
        """kind: cut (close both sides), flip (xor one byte), stall (stop forwarding),
        call (run callback, e.g. kill the server, then close both sides as the dead
        server's reset would: what it had sent but we had not forwarded is lost); at
        server byte `after`."""
        with self._lock:
            self._fault, self._seen = (kind, after, callback), 0

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for s in list(self._socks):
            _close(s)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=2)
                server.settimeout(None)
            except OSError:
                _close(client)
                continue
            self._socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_server: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_server:
                    data = self._apply_fault(bytearray(data), src, dst)
                    if data is None:
                        return
                dst.sendall(data)
        except OSError:
            pass
        _close(src)
        _close(dst)

    def _apply_fault(self, data: bytearray, src, dst):
        """The bytes to forward, or None when the stream was ended or stalled here."""
        with self._lock:
            start, self._seen = self._seen, self._seen + len(data)
            fault = self._fault
            if fault is None or not start <= fault[1] < start + len(data):
                return data
            self._fault = None
        kind, after, callback = fault
        at = after - start
        if kind == "flip":
            data[at] ^= 0xFF
            return data
        dst.sendall(data[:at])
        if kind == "stall":
            self._closed.wait()
            return None
        if kind == "call":
            callback()
        _close(src)
        _close(dst)
        return None


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
