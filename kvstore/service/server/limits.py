"""Resource limits of the kv-server's bulk stream, and the per-tenant accounting behind them.

A tenant is the bearer token of the call that opened the bulk connection (its digest) when
the server checks tokens, else the namespace; without --auth-token-file callers choose
namespaces freely, so there only the global caps protect one caller from another.

Every per-tenant limit has a global cap beside it (the server's whole budget): one tenant can
use at most its share, so a flood by tenant A costs A, not B, until the tenants together
reach the global cap.
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class BulkLimits:
    handshake_timeout_s: float = 5.0  # accept to HELLO answered, the whole handshake (TLS too)
    max_connections: int = 256  # all bulk connections, ticketed or not
    max_unauthenticated: int = 32  # connections still in their handshake, all addresses
    max_unauthenticated_per_address: int = 8
    max_connections_per_tenant: int = 64
    ticket_ttl_s: float = 30.0
    max_tickets: int = 10_000  # outstanding (issued, not yet redeemed) tickets
    max_tickets_per_tenant: int = 256
    max_inflight_bytes: int = 4 << 30  # received block bytes not yet handed to the store
    max_inflight_bytes_per_tenant: int = 1 << 30

    def __post_init__(self):
        for f in fields(self):
            if not getattr(self, f.name) > 0:
                raise ValueError(f"bulk limits: {f.name} must be positive, got {getattr(self, f.name)}")
        # Room for ticketed clients: unauthenticated connections alone can never fill the port.
        if self.max_unauthenticated >= self.max_connections:
            raise ValueError(f"bulk limits: max_unauthenticated ({self.max_unauthenticated}) must be below "
                             f"max_connections ({self.max_connections})")
        # A per-tenant limit above its global cap is allowed: the global cap then binds.


class TenantQuota:
    """Counts of one resource per tenant under a per-tenant limit and a global cap."""

    def __init__(self, per_tenant: int, total: int):
        self.per_tenant, self.total = per_tenant, total
        self._lock = threading.Lock()
        self._used: Counter[bytes] = Counter()
        self._sum = 0

    def acquire(self, tenant: bytes, n: int = 1) -> bool:
        with self._lock:
            if self._used[tenant] + n > self.per_tenant or self._sum + n > self.total:
                return False
            self._used[tenant] += n
            self._sum += n
            return True

    def release(self, tenant: bytes, n: int = 1) -> None:
        if n <= 0:
            return
        with self._lock:
            left = self._used[tenant] - n
            if left > 0:
                self._used[tenant] = left
            else:
                del self._used[tenant]  # no empty entries left behind by many tenants
            self._sum -= n

    def used(self, tenant: bytes | None = None) -> int:
        with self._lock:
            return self._sum if tenant is None else self._used.get(tenant, 0)
