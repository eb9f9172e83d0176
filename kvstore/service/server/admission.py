"""Who gets a bulk connection: the accept policy and the table of open connections.

A connection is unauthenticated from accept until its HELLO redeems a ticket, and only then
counts against its tenant (limits.py). Unauthenticated connections are what a client
without a token can make, so they are held on a short leash:

- a whole-handshake deadline (accept to HELLO answered, TLS included), not a per-recv
  timeout that one byte every few seconds would renew forever;
- at most `max_unauthenticated_per_address` per source address and `max_unauthenticated`
  in all, well below `max_connections`; when either is full the oldest unauthenticated
  connection (of that address, or of all) is dropped for the new one, so a client that
  connects and sends its ticket at once gets in however many idle ones others hold.

A new connection is refused only when the port is full of ticketed connections, which per
tenant caps bound.
"""
from __future__ import annotations

import socket
import threading
import time
from collections import Counter, OrderedDict

from kvtier.kvstore.service.server.limits import BulkLimits, TenantQuota


class ConnectionTable:
    def __init__(self, limits: BulkLimits):
        self._limits = limits
        self._lock = threading.Lock()
        self._pending: OrderedDict[socket.socket, tuple[str, float]] = OrderedDict()  # -> (address, deadline)
        self._per_address: Counter[str] = Counter()
        self._ticketed: dict[socket.socket, bytes] = {}  # -> tenant
        self._busy: set[socket.socket] = set()  # ticketed and inside a batch
        self._tenants = TenantQuota(limits.max_connections_per_tenant, limits.max_connections)
        self.closing = False
        self.dropped = 0  # unauthenticated connections dropped for newer ones or the deadline

    def admit(self, conn: socket.socket, address: str) -> list[socket.socket]:
        """Register a just-accepted connection; the connections to close now (the new one
        itself when the server is closing or full of ticketed connections)."""
        limits = self._limits
        with self._lock:
            if self.closing:
                return [conn]
            victim = None
            if self._per_address[address] >= limits.max_unauthenticated_per_address:
                victim = next(c for c, (a, _) in self._pending.items() if a == address)
            elif self._pending and (len(self._pending) >= limits.max_unauthenticated
                                    or len(self._pending) + len(self._ticketed) >= limits.max_connections):
                victim = next(iter(self._pending))
            elif len(self._ticketed) >= limits.max_connections:
                return [conn]
            if victim is not None:
                self._forget_pending(victim)
                self.dropped += 1
            self._pending[conn] = (address, time.monotonic() + limits.handshake_timeout_s)
            self._per_address[address] += 1
            return [victim] if victim is not None else []

    def deadline(self, conn: socket.socket) -> float | None:
        with self._lock:
            entry = self._pending.get(conn)
        return entry[1] if entry is not None else None

    def expired(self) -> list[socket.socket]:
        """Unauthenticated connections past their handshake deadline, forgotten now: the
        caller shuts them down, which ends whatever recv their thread is in."""
        now = time.monotonic()
        with self._lock:
            late = [c for c, (_, deadline) in self._pending.items() if deadline <= now]
            for conn in late:
                self._forget_pending(conn)
            self.dropped += len(late)
        return late

    def authenticated(self, conn: socket.socket, tenant: bytes) -> str | None:
        """Move the connection to its tenant; why not (dropped meanwhile, tenant full), or None."""
        with self._lock:
            if conn not in self._pending:
                return "handshake deadline passed"
            if not self._tenants.acquire(tenant):
                return (f"too many bulk connections for this tenant (at most "
                        f"{self._limits.max_connections_per_tenant}) or in all (at most {self._limits.max_connections})")
            self._forget_pending(conn)
            self._ticketed[conn] = tenant
            return None

    def set_busy(self, conn: socket.socket, busy: bool) -> bool:
        """Mark a ticketed connection; False when the server is closing and it is idle now."""
        with self._lock:
            (self._busy.add if busy else self._busy.discard)(conn)
            return busy or not self.closing

    def remove(self, conn: socket.socket) -> None:
        with self._lock:
            if conn in self._pending:
                self._forget_pending(conn)
            tenant = self._ticketed.pop(conn, None)
            self._busy.discard(conn)
        if tenant is not None:
            self._tenants.release(tenant)

    def close(self) -> None:
        with self._lock:
            self.closing = True

    def snapshot(self) -> tuple[list[socket.socket], list[socket.socket]]:
        """(connections not inside a batch, all connections)."""
        with self._lock:
            every = list(self._pending) + list(self._ticketed)
            return [c for c in every if c not in self._busy], every

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"unauthenticated": len(self._pending), "ticketed": len(self._ticketed), "dropped": self.dropped}

    def _forget_pending(self, conn: socket.socket) -> None:
        address, _ = self._pending.pop(conn)
        left = self._per_address[address] - 1
        if left > 0:
            self._per_address[address] = left
        else:
            del self._per_address[address]
