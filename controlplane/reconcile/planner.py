"""Pure planning: from what is desired and what exists, the actions that close the gap.

A deployment is planned group by group (reconcile/groups.py): each role's instances are started
or drained towards that group's count, and an instance of a group the deployment no longer has
wants 0, so it drains. An instance started with other semi-PD settings than its deployment's
(the mode or the SLOs changed since; reconcile/semi_pd.py) is outdated: replacements start as
for a missing instance, and outdated ones drain as replacements become ready, so the group
never has fewer ready instances than it wants while they are replaced.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from controlplane.reconcile.groups import COLOCATED, COUNT_FIELD, ROLES, roles_of
from controlplane.routing.policy import NodeLoad, pick_node
from controlplane.states import InstanceState, NodeState
from controlplane.wire.instance import InstanceRole, SemiPDConfig

# A deployment whose instances failed this often within the window waits before the next start,
# so a model that cannot load does not spin the node in a crash loop.
CRASH_LOOP_FAILURES = 3
CRASH_LOOP_WINDOW_S = 60.0


@dataclass(slots=True, frozen=True)
class DeploymentView:
    name: str
    model: str
    replicas: int  # the colocated group; a group the mode does not have is 0
    prefill_replicas: int = 0
    decode_replicas: int = 0
    mode: str = "colocated"
    semi_pd: SemiPDConfig | None = None  # mode semi-pd: how its instances run

    def desired(self, role: str) -> int:
        return int(getattr(self, COUNT_FIELD[role]))

    def groups(self) -> dict[str, int]:
        """Every group of its mode and its desired count."""
        return {role: self.desired(role) for role in roles_of(self.mode)}


@dataclass(slots=True, frozen=True)
class InstanceView:
    id: str
    deployment: str
    node_id: str | None
    state: InstanceState
    inflight: int
    created_at: float
    updated_at: float
    role: str = COLOCATED
    semi_pd: SemiPDConfig | None = None  # what it was started with


@dataclass(slots=True, frozen=True)
class NodeView:
    id: str
    url: str
    state: NodeState
    last_heartbeat_at: float | None


@dataclass(slots=True, frozen=True)
class StartInstance:
    deployment: str
    model: str
    node_id: str
    role: InstanceRole = COLOCATED
    semi_pd: SemiPDConfig | None = None


@dataclass(slots=True, frozen=True)
class DrainInstance:
    instance_id: str
    reason: str


@dataclass(slots=True, frozen=True)
class StopInstance:
    instance_id: str
    reason: str


@dataclass(slots=True, frozen=True)
class FailInstance:
    instance_id: str
    reason: str


@dataclass(slots=True, frozen=True)
class MarkNode:
    node_id: str
    state: NodeState
    reason: str


Action = StartInstance | DrainInstance | StopInstance | FailInstance | MarkNode

SERVING = (InstanceState.PENDING, InstanceState.STARTING, InstanceState.READY)


def plan(
    deployments: Sequence[DeploymentView],
    instances: Sequence[InstanceView],
    nodes: Sequence[NodeView],
    *,
    now: float,
    node_timeout_s: float,
) -> list[Action]:
    actions: list[Action] = []
    lost_nodes = {n.id for n in nodes if n.state != NodeState.READY}
    for node in nodes:
        if node.state == NodeState.READY and _silent(node, now, node_timeout_s):
            actions.append(MarkNode(node.id, NodeState.UNREACHABLE, "missed heartbeats"))
            lost_nodes.add(node.id)

    alive: list[InstanceView] = []
    for inst in instances:
        if inst.state in InstanceState.terminal():
            continue
        if inst.node_id in lost_nodes:
            actions.append(FailInstance(inst.id, "node unreachable"))
        else:
            alive.append(inst)

    by_name = {d.name: d for d in deployments}
    for inst in alive:
        if inst.deployment not in by_name and inst.state != InstanceState.DRAINING:
            actions.append(DrainInstance(inst.id, "deployment deleted"))
        elif inst.state == InstanceState.DRAINING and inst.inflight == 0:
            actions.append(StopInstance(inst.id, "drained"))

    ready_nodes = [n for n in nodes if n.id not in lost_nodes]
    load = Counter(i.node_id for i in alive if i.node_id is not None)
    for dep in deployments:
        crash_looping = _crash_looping(dep.name, instances, now)
        for role in ROLES:
            group = [
                i
                for i in alive
                if i.deployment == dep.name and i.role == role and i.state in SERVING
            ]
            current = [i for i in group if i.semi_pd == dep.semi_pd]
            wanted = dep.desired(role)
            gap = wanted - len(current)
            if gap > 0 and not crash_looping:
                for _ in range(gap):
                    target = pick_node([NodeLoad(n.id, n.url, load[n.id]) for n in ready_nodes])
                    if target is None:
                        break
                    load[target.id] += 1
                    actions.append(StartInstance(dep.name, dep.model, target.id, role, dep.semi_pd))
            elif gap < 0:
                why = f"scaled to {wanted}" if role == COLOCATED else f"{role} scaled to {wanted}"
                for inst in _removal_order(current)[:-gap]:
                    actions.append(DrainInstance(inst.id, why))
            outdated = [i for i in group if i.semi_pd != dep.semi_pd]
            for inst in _replaced(outdated, current, wanted):
                actions.append(DrainInstance(inst.id, "replaced: semi-PD settings changed"))
    return actions


def _replaced(
    outdated: list[InstanceView], current: list[InstanceView], wanted: int
) -> list[InstanceView]:
    """The outdated instances to drain now: those not ready (they would serve the old settings
    once ready), and of the ready ones as many as the group has ready instances beyond what it
    wants (the least busy first)."""
    ready = [i for i in outdated if i.state == InstanceState.READY]
    num_ready = len(ready) + sum(i.state == InstanceState.READY for i in current)
    spare = max(0, min(len(ready), num_ready - wanted))
    unready = [i for i in outdated if i.state != InstanceState.READY]
    return unready + _removal_order(ready)[:spare]


def _silent(node: NodeView, now: float, timeout: float) -> bool:
    return node.last_heartbeat_at is None or now - node.last_heartbeat_at > timeout


def _crash_looping(deployment: str, instances: Sequence[InstanceView], now: float) -> bool:
    recent = [
        i
        for i in instances
        if i.deployment == deployment
        and i.state == InstanceState.FAILED
        and now - i.updated_at < CRASH_LOOP_WINDOW_S
    ]
    return len(recent) >= CRASH_LOOP_FAILURES


def _removal_order(serving: list[InstanceView]) -> list[InstanceView]:
    """Instances that are not ready yet go first, then the least busy, then the newest."""
    return sorted(
        serving,
        key=lambda i: (i.state == InstanceState.READY, i.inflight, -i.created_at),
    )
