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
    role: str = "colocated",
) -> InstanceView:
    return InstanceView(iid, dep, node, state, inflight, created, updated, role)


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


# -- instance groups (PD disaggregation) ---------------------------------------------------------


def pd(prefill: int, decode: int, replicas: int = 0) -> DeploymentView:
    mode = "auto" if replicas else "disaggregated"
    return DeploymentView("d", "m", replicas, prefill, decode, mode)


def test_each_group_starts_its_own_role() -> None:
    actions = run([pd(prefill=1, decode=2)], [])
    assert actions == [
        StartInstance("d", "m", "n1", "prefill"),
        StartInstance("d", "m", "n2", "decode"),
        StartInstance("d", "m", "n1", "decode"),
    ]
    auto = run([pd(prefill=1, decode=1, replicas=1)], [])
    assert [a.role for a in auto if isinstance(a, StartInstance)] == [
        "colocated",
        "prefill",
        "decode",
    ]


def test_a_group_counts_only_its_own_instances() -> None:
    running = [
        inst("p1", InstanceState.READY, role="prefill"),
        inst("p2", InstanceState.STARTING, role="prefill"),
    ]
    # Two prefill instances do not stand in for the decode one.
    assert run([pd(prefill=2, decode=1)], running) == [StartInstance("d", "m", "n2", "decode")]


def test_scaling_one_group_down_drains_only_that_group() -> None:
    running = [
        inst("p1", InstanceState.READY, role="prefill", inflight=3),
        inst("p2", InstanceState.READY, role="prefill", inflight=0),
        inst("d1", InstanceState.READY, role="decode", inflight=0),
        inst("d2", InstanceState.READY, role="decode", inflight=0),
    ]
    assert run([pd(prefill=1, decode=2)], running) == [DrainInstance("p2", "prefill scaled to 1")]
    draining = [*running[:1], inst("p2", InstanceState.DRAINING, role="prefill"), *running[2:]]
    assert run([pd(prefill=1, decode=2)], draining) == [StopInstance("p2", "drained")]


def test_a_group_the_mode_no_longer_has_drains() -> None:
    # auto -> disaggregated: the colocated group wants 0; prefill and decode stay.
    running = [
        inst("c1", InstanceState.READY),
        inst("p1", InstanceState.READY, role="prefill"),
        inst("d1", InstanceState.READY, role="decode"),
    ]
    assert run([pd(prefill=1, decode=1)], running) == [DrainInstance("c1", "scaled to 0")]


def test_groups_of_a_view_follow_its_mode() -> None:
    assert DeploymentView("d", "m", 2).groups() == {"colocated": 2}
    assert pd(prefill=1, decode=3).groups() == {"prefill": 1, "decode": 3}
    assert pd(1, 1, replicas=2).groups() == {"colocated": 2, "prefill": 1, "decode": 1}
