"""Pure routing decisions: which instance takes a task, which node takes an instance."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class InstanceLoad:
    id: str
    node_id: str | None
    url: str
    inflight: int


@dataclass(slots=True, frozen=True)
class NodeLoad:
    id: str
    url: str
    instances: int


def pick_instance(
    candidates: Sequence[InstanceLoad], exclude: frozenset[str] = frozenset()
) -> InstanceLoad | None:
    """Least loaded ready instance; ties go to the lowest id so the choice is deterministic."""
    usable = [c for c in candidates if c.id not in exclude]
    if not usable:
        return None
    return min(usable, key=lambda c: (c.inflight, c.id))


def pick_node(nodes: Sequence[NodeLoad]) -> NodeLoad | None:
    """The ready node running the fewest instances."""
    if not nodes:
        return None
    return min(nodes, key=lambda n: (n.instances, n.id))
