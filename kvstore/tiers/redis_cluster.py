"""The Redis tier on a cluster: block batches grouped by node (and, for MGET, by hash slot)
from redis-py's slot map, and that map refreshed when a node answers MOVED or ASK on the
tier's own connections. redis-py refreshes its map only when one of its own commands is
redirected, and the block transfers bypass it: without this, a resharding would turn every
get of a moved slot into a miss (never wrong KV) until some redis-py call happened to
notice."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

Node = tuple[str, int]


def node_groups(client, rkeys: Sequence[bytes], positions: Iterable[int]) -> dict[Node, dict[int, list[int]]]:
    """Positions grouped by node, then by hash slot (one MGET per slot)."""
    nodes: dict[Node, dict[int, list[int]]] = {}
    for p in positions:
        node = client.get_node_from_key(rkeys[p])
        nodes.setdefault((node.host, node.port), {}).setdefault(client.keyslot(rkeys[p]), []).append(p)
    return nodes


def node_shares(client, rkeys: Sequence[bytes]) -> dict[Node, list[int]]:
    """Positions grouped by node (SETs of any slots may share a pipeline)."""
    nodes: dict[Node, list[int]] = {}
    for p, rkey in enumerate(rkeys):
        node = client.get_node_from_key(rkey)
        nodes.setdefault((node.host, node.port), []).append(p)
    return nodes


def slots_moved(messages: Iterable[str]) -> bool:
    """Did a node redirect a command (`MOVED slot host:port` / `ASK ...`)?"""
    return any(m.startswith(("MOVED ", "ASK ")) or ": MOVED " in m or ": ASK " in m for m in messages)


def refresh_slots(client) -> None:
    """Ask the cluster for its slot map again (redis-py's NodesManager, a public attribute)."""
    client.nodes_manager.initialize()
