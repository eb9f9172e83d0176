"""One-time tickets for the bulk stream: OpenBulk issues one per connection, the connection
redeems it. A ticket stands for one namespace and one tenant (limits.py), once.

Outstanding tickets are bounded per tenant and in all: a tenant that asks for tickets it
never uses fills only its own share, and its own new tickets are refused (RESOURCE_EXHAUSTED)
until some are redeemed or expire.
"""
from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict

from kvtier.kvstore.service.bulk_protocol import TICKET_BYTES


class TicketsExhausted(Exception):
    """No ticket now; the message says whose limit was reached."""


class BulkTickets:
    def __init__(self, ttl_s: float = 30.0, limit: int = 10_000, per_tenant: int = 256):
        if ttl_s <= 0 or limit < 1 or per_tenant < 1:
            raise ValueError(f"bulk tickets: ttl_s, limit and per_tenant must be positive, "
                             f"got {ttl_s}, {limit}, {per_tenant}")
        self.ttl_s = ttl_s
        self._limit, self._per_tenant = limit, per_tenant
        self._lock = threading.Lock()
        self._open: dict[bytes, tuple[bytes, bytes, float]] = {}  # ticket -> (tag, tenant, expiry)
        # per tenant, its tickets in issue order, which is expiry order (one TTL for all)
        self._by_tenant: dict[bytes, OrderedDict[bytes, float]] = {}

    def issue(self, tag: bytes, tenant: bytes = b"") -> bytes:
        """A new ticket for namespace `tag`; TicketsExhausted when the tenant's share or the
        server's cap of outstanding tickets is used up."""
        now = time.monotonic()
        with self._lock:
            mine = self._by_tenant.get(tenant)
            if mine is not None and len(mine) >= self._per_tenant:
                self._expire(tenant, now)
                mine = self._by_tenant.get(tenant)
                if mine is not None and len(mine) >= self._per_tenant:
                    raise TicketsExhausted(f"this tenant has {len(mine)} unused bulk tickets "
                                           f"(at most {self._per_tenant}); try again later")
            if len(self._open) >= self._limit:
                for t in list(self._by_tenant):
                    self._expire(t, now)
                if len(self._open) >= self._limit:
                    raise TicketsExhausted(f"the server has {len(self._open)} unused bulk tickets "
                                           f"(at most {self._limit}); try again later")
            ticket = secrets.token_bytes(TICKET_BYTES)
            self._open[ticket] = (tag, tenant, now + self.ttl_s)
            self._by_tenant.setdefault(tenant, OrderedDict())[ticket] = now + self.ttl_s
        return ticket

    def redeem(self, ticket: bytes) -> tuple[bytes, bytes] | None:
        """(namespace tag, tenant), once; None for an unknown, used or expired ticket."""
        with self._lock:
            entry = self._open.pop(ticket, None)
            if entry is None:
                return None
            tag, tenant, expiry = entry
            mine = self._by_tenant[tenant]
            del mine[ticket]
            if not mine:
                del self._by_tenant[tenant]
        if expiry < time.monotonic():
            return None
        return tag, tenant

    def outstanding(self, tenant: bytes | None = None) -> int:
        with self._lock:
            if tenant is None:
                return len(self._open)
            return len(self._by_tenant.get(tenant, ()))

    def _expire(self, tenant: bytes, now: float) -> None:
        mine = self._by_tenant[tenant]
        while mine:
            ticket, expiry = next(iter(mine.items()))
            if expiry > now:
                break
            del mine[ticket]
            del self._open[ticket]
        if not mine:
            del self._by_tenant[tenant]
