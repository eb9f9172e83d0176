"""Rendezvous (highest-random-weight) hashing: which server owns a key.

Every (server, key) pair gets a pseudo-random score; the key belongs to the server with the
highest one. Adding a server moves only the keys it now wins (about 1/n of them), removing
one moves only its own keys, and every client with the same server list agrees on the
owner without any coordination. Servers are named by the address the user wrote, so the
order of the list does not matter.
"""
from __future__ import annotations

from collections.abc import Sequence

import xxhash


class Rendezvous:
    def __init__(self, nodes: Sequence[str]):
        if not nodes:
            raise ValueError("rendezvous hashing needs at least one node")
        if len(set(nodes)) != len(nodes):
            raise ValueError(f"rendezvous hashing: duplicate nodes in {list(nodes)}")
        self.nodes = list(nodes)
        # Each node's score function is xxh3 seeded with a hash of its name.
        self._seeds = [xxhash.xxh3_64_intdigest(n.encode()) for n in self.nodes]

    def owner(self, key: bytes) -> int:
        """Index (into nodes) of the node that owns `key`."""
        if len(self._seeds) == 1:
            return 0
        best, best_score = 0, -1
        for i, seed in enumerate(self._seeds):
            score = xxhash.xxh3_64_intdigest(key, seed=seed)
            if score > best_score:
                best, best_score = i, score
        return best

    def assign(self, keys: Sequence[bytes]) -> dict[int, list[int]]:
        """node index -> positions (into keys) of the keys it owns, in order."""
        if len(self._seeds) == 1:
            return {0: list(range(len(keys)))} if keys else {}
        groups: dict[int, list[int]] = {}
        for pos, key in enumerate(keys):
            groups.setdefault(self.owner(key), []).append(pos)
        return groups
