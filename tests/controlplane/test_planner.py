from __future__ import annotations

from controlplane.reconcile.planner import (
    DeploymentView,
    DrainInstance,
    FailInstance,
    InstanceView,
    MarkNode,
    NodeView,
    StartInstance,
    StopInstance,
    plan,
)
from controlplane.routing.policy import InstanceLoad, NodeLoad, pick_instance, pick_node
from controlplane.states import InstanceState, NodeState

NOW = 100.0
N1 = NodeView("n1", "http://n1", NodeState.READY, NOW)
N2 = NodeView("n2", "http://n2", NodeState.READY, NOW)


def inst(
    iid: str,
    state: InstanceState,
    *,
    dep: str = "d",
    node: str = "n1",
    inflight: int = 0,
    created: float = 1.0,
    updated: float = 1.0,
) -> InstanceView:
    return InstanceView(iid, dep, node, state, inflight, created, updated)


def run(deps, instances, nodes=(N1, N2)):
    return plan(deps, instances, nodes, now=NOW, node_timeout_s=10.0)


def test_scale_up_spreads_over_nodes() -> None:
    actions = run([DeploymentView("d", "m", 3)], [inst("a", InstanceState.READY)])
    assert actions == [StartInstance("d", "m", "n2"), StartInstance("d", "m", "n1")]


def test_no_node_no_start() -> None:
    assert run([DeploymentView("d", "m", 1)], [], nodes=()) == []


def test_scale_down_drains_unready_first_then_stops_when_idle() -> None:
    instances = [inst("a", InstanceState.READY, created=1), inst("b", InstanceState.STARTING)]
    assert run([DeploymentView("d", "m", 1)], instances) == [DrainInstance("b", "scaled to 1")]
    draining = [inst("a", InstanceState.READY), inst("b", InstanceState.DRAINING, inflight=2)]
    assert run([DeploymentView("d", "m", 1)], draining) == []
    idle = [inst("a", InstanceState.READY), inst("b", InstanceState.DRAINING)]
    assert run([DeploymentView("d", "m", 1)], idle) == [StopInstance("b", "drained")]


def test_deleted_deployment_is_drained() -> None:
    assert run([], [inst("a", InstanceState.READY)]) == [DrainInstance("a", "deployment deleted")]


def test_silent_node_is_marked_and_its_instances_fail_and_are_replaced() -> None:
    silent = NodeView("n1", "http://n1", NodeState.READY, NOW - 60)
    actions = run([DeploymentView("d", "m", 1)], [inst("a", InstanceState.READY)], (silent, N2))
    assert actions == [
        MarkNode("n1", NodeState.UNREACHABLE, "missed heartbeats"),
        FailInstance("a", "node unreachable"),
        StartInstance("d", "m", "n2"),
    ]


def test_crash_loop_backs_off() -> None:
    failed = [inst(f"f{i}", InstanceState.FAILED, updated=NOW - 5) for i in range(3)]
    assert run([DeploymentView("d", "m", 1)], failed) == []
    old = [inst(f"f{i}", InstanceState.FAILED, updated=NOW - 500) for i in range(3)]
    assert run([DeploymentView("d", "m", 1)], old) == [StartInstance("d", "m", "n1")]


def test_pick_instance_least_loaded_deterministic() -> None:
    cands = [
        InstanceLoad("b", None, "u", 1),
        InstanceLoad("a", None, "u", 1),
        InstanceLoad("c", None, "u", 0),
    ]
    assert pick_instance(cands).id == "c"
    assert pick_instance(cands, frozenset({"c"})).id == "a"
    assert pick_instance([]) is None
    assert pick_node([NodeLoad("x", "u", 2), NodeLoad("y", "u", 1)]).id == "y"
