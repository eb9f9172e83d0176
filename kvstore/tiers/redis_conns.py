"""The Redis tier's own connections for block transfers.

redis-py keeps the control path (DEL, a cluster's EXISTS probes and slot map); MGET, SET
and a single node's EXISTS batches go over these plain sockets, opened with the URL's host, port, database and
credentials and the spec's TLS options, so no redis-py private attribute is ever touched.
Each endpoint keeps a few idle connections; a connection is returned only after a reply was
read whole, so a pooled one is always in step with its server.
"""
from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from kvtier.kvstore.socket_io import idle_and_open, send_buffers, set_kernel_timeouts
from kvtier.kvstore.tiers.redis_resp import RespError, RespReader, command

_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def tls_context(options: dict[str, str]) -> ssl.SSLContext:
    """The TLS context for the spec's ssl_* options (the names redis-py's URL takes)."""
    reqs_name = options.get("ssl_cert_reqs", "required").lower()
    if reqs_name not in _CERT_REQS:
        raise ValueError(f"redis tier: ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, got {reqs_name!r}")
    ctx = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    if options.get("ssl_certfile"):
        ctx.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    ctx.check_hostname = _CERT_REQS[reqs_name] == ssl.CERT_REQUIRED
    ctx.verify_mode = _CERT_REQS[reqs_name]
    return ctx


@dataclass(frozen=True)
class Endpoint:
    """Where and how to open a block-transfer connection."""

    host: str
    port: int
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None
    timeout: float = 0.25
    connect_timeout: float = 0.25

    @classmethod
    def from_url(cls, url: str, tls: ssl.SSLContext | None, timeout: float, connect_timeout: float) -> "Endpoint":
        parts = urlsplit(url)
        path = parts.path.strip("/")
        try:
            db = int(path) if path else 0
        except ValueError:
            raise ValueError(f"redis tier: database {path!r} in {url!r} is not a number")
        return cls(parts.hostname or "localhost", parts.port or 6379, db,
                   unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None,
                   tls if parts.scheme == "rediss" else None, timeout, connect_timeout)

    def node(self, host: str, port: int) -> "Endpoint":
        """The same credentials and options for another node of a cluster (database 0)."""
        return Endpoint(host, port, 0, self.username, self.password, self.tls, self.timeout, self.connect_timeout)

    def open(self) -> socket.socket:
        """A connected, authenticated socket on the right database (OSError on failure)."""
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
                # A kernel timeout would surface as an SSL want-read error; TLS keeps the
                # Python-level timeout (its records cost more than the extra poll anyway).
                sock.settimeout(self.timeout)
            else:
                set_kernel_timeouts(sock, self.timeout)
            setup = []
            if self.password is not None:
                creds = (self.password,) if self.username is None else (self.username, self.password)
                setup.append(command(b"AUTH", *(c.encode() for c in creds)))
            if self.db:
                setup.append(command(b"SELECT", str(self.db).encode()))
            if setup:
                send_buffers(sock, setup)
                reader = RespReader(sock, float("inf"))
                for _ in setup:
                    reader.simple_reply()
        except RespError as e:  # AUTH or SELECT refused: this connection is unusable
            sock.close()
            raise ConnectionError(f"redis refused the connection setup: {e}") from e
        except BaseException:
            sock.close()
            raise
        return sock


class ConnectionPool:
    """Idle block-transfer connections to one endpoint."""

    def __init__(self, endpoint: Endpoint, max_idle: int):
        self.endpoint = endpoint
        self._max_idle = max_idle
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self) -> socket.socket:
        with self._lock:
            while self._idle:
                sock = self._idle.pop()
                if idle_and_open(sock):  # readable while idle: the server closed it
                    return sock
                sock.close()
        return self.endpoint.open()

    def release(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()
