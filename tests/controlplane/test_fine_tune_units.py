"""Pure parts of fine-tuning: the status table, chat JSONL checks and the executor's decisions."""

from __future__ import annotations

import json

import pytest

from controlplane import wire
from controlplane.chat_jsonl import check_chat_jsonl, check_line
from controlplane.jobs import fine_tune_plan as plan
from controlplane.states import (
    TRANSITIONS,
    FineTuneState,
    IllegalTransition,
    NodeState,
    check_transition,
    is_terminal,
)

# -- the status table ---------------------------------------------------------------------------


def test_fine_tune_states_have_a_table_and_terminal_states_are_final() -> None:
    assert set(TRANSITIONS[FineTuneState]) == set(FineTuneState)
    for state in FineTuneState.terminal():
        assert TRANSITIONS[FineTuneState][state] == frozenset() and is_terminal(state)
    assert FineTuneState.in_flight() | FineTuneState.terminal() == set(FineTuneState)


def test_fine_tune_moves() -> None:
    f = FineTuneState
    path = [f.VALIDATING_FILES, f.QUEUED, f.RUNNING, f.SUCCEEDED]
    for current, target in zip(path, path[1:], strict=False):
        assert check_transition(current, target) is target
    for state in FineTuneState.in_flight():  # any unfinished job can fail or be cancelled
        check_transition(state, f.FAILED)
        check_transition(state, f.CANCELLED)
    with pytest.raises(IllegalTransition, match="validating_files -> running"):
        check_transition(f.VALIDATING_FILES, f.RUNNING)
    with pytest.raises(IllegalTransition):
        check_transition(f.SUCCEEDED, f.CANCELLED)


# -- chat JSONL ---------------------------------------------------------------------------------


def line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"{not json\n", "not valid JSON"),
        (b"\xff\xfe\n", "not UTF-8"),
        (line([1, 2]), "JSON object"),
        (line({"messages": []}), "non-empty 'messages'"),
        (line({"prompt": "x"}), "non-empty 'messages'"),
        (line({"messages": ["hi"]}), "messages[0] is not an object"),
        (line({"messages": [{"role": "tool", "content": "x"}]}), "messages[0].role"),
        (line({"messages": [{"role": "assistant", "content": 3}]}), "messages[0].content"),
        (line({"messages": [{"role": "user", "content": "x"}]}), "no assistant message"),
    ],
)
def test_bad_lines_say_what_is_wrong(raw: bytes, problem: str) -> None:
    found = check_line(raw)
    assert found is not None and problem in found


def test_a_file_check_numbers_its_problems_and_counts_the_rest() -> None:
    weighted = {"messages": [{"role": "assistant", "content": "x", "weight": 1}]}
    lines = [line(GOOD), b"\n", line(weighted)] + [b"oops\n"] * 7
    check = check_chat_jsonl(lines)
    assert check.num_examples == 2 and check.num_problems == 7 and not check.ok
    text = check.describe()
    assert text.startswith("line 4: not valid JSON") and "line 8:" in text
    assert "line 9" not in text and text.endswith("and 2 more problems")
    assert check_chat_jsonl([line(GOOD)]).ok
    empty = check_chat_jsonl([b"\n", b"  \n"])
    assert not empty.ok and empty.describe() == "the file has no examples"


# -- hyperparameters and names ------------------------------------------------------------------


def test_auto_hyperparameters_follow_the_file_size() -> None:
    auto = wire.Hyperparameters()
    small = plan.resolve_hyperparameters(auto, 10)
    assert (small.n_epochs, small.batch_size, small.learning_rate_multiplier) == (10, 1, 1.0)
    mid = plan.resolve_hyperparameters(auto, 40)
    assert (mid.n_epochs, mid.batch_size) == (3, 1)
    large = plan.resolve_hyperparameters(auto, 100_000)
    assert (large.n_epochs, large.batch_size) == (3, 8)
    given = wire.Hyperparameters(n_epochs=2, batch_size=4, learning_rate_multiplier=0.5)
    chosen = plan.resolve_hyperparameters(given, 10)
    assert (chosen.n_epochs, chosen.batch_size, chosen.learning_rate_multiplier) == (2, 4, 0.5)
    with pytest.raises(ValueError):
        plan.resolve_hyperparameters(auto, 0)


def test_training_hyperparameters_scale_the_base_rate_and_checkpoint_a_few_times() -> None:
    hp = wire.ResolvedHyperparameters(n_epochs=3, batch_size=2, learning_rate_multiplier=0.5)
    lora = wire.LoraConfig(rank=4, alpha=8)
    train = plan.training_hyperparameters(hp, num_examples=10, seed=7, lora=lora)
    assert train.learning_rate == pytest.approx(1e-4)
    assert plan.total_steps(10, hp) == 15 and train.checkpoint_every == 4
    assert (train.lora_rank, train.lora_alpha, train.seed) == (4, 8, 7)
    one = wire.ResolvedHyperparameters(n_epochs=1, batch_size=8, learning_rate_multiplier=1)
    assert plan.checkpoint_every(3, one) == 1


def test_fine_tuned_model_names() -> None:
    assert plan.fine_tuned_model_name("tiny", "demo", "ftjob-1") == "ft:tiny:demo:ftjob-1"
    assert plan.fine_tuned_model_name("tiny", None, "ftjob-1") == "ft:tiny::ftjob-1"
    assert plan.checkpoint_model_name("ft:tiny::ftjob-1", 4) == "ft:tiny::ftjob-1:ckpt-step-4"


def test_model_names_take_fine_tuned_ones() -> None:
    wire.ModelCreate(name="ft:tiny:Demo_1:ftjob-abc", path="/x")
    wire.DeploymentCreate(name="demo", model="ft:tiny::ftjob-abc")
    with pytest.raises(ValueError):
        wire.DeploymentCreate(name="ft:x", model="tiny")  # deployment names stay plain


# -- nodes and watching -------------------------------------------------------------------------


def node(name: str, trainings: int = 0, instances: int = 0, state: str = "ready") -> plan.NodeLoad:
    return plan.NodeLoad(name, name, f"http://{name}", NodeState(state), trainings, instances)


def test_pick_node_prefers_the_least_busy_ready_node() -> None:
    assert plan.pick_node([]) is None
    assert plan.pick_node([node("a", state="unreachable")]) is None
    nodes = [node("a", trainings=1), node("b", instances=2), node("c", instances=1)]
    assert plan.pick_node(nodes) == nodes[2]
    assert plan.pick_node(nodes, avoid=frozenset({"c"})) == nodes[1]
    assert plan.pick_node([node("a")], avoid=frozenset({"a"})) is not None  # the only one


def test_overdue_trainings() -> None:
    views = [
        plan.TrainingView("t1", "f1", "n1", "a", dispatched_at=0.0),
        plan.TrainingView("t2", "f2", "n2", "b", dispatched_at=0.0),
        plan.TrainingView("t3", "f3", "n1", "a", dispatched_at=0.0),
        plan.TrainingView("t4", "f4", "gone", None, dispatched_at=0.0),
    ]
    states = {"n1": NodeState.READY, "n2": NodeState.UNREACHABLE}
    found = plan.overdue(views, states, {"t1": 95.0}, now=100.0, report_timeout_s=30.0)
    reasons = {view.task_id: why for view, why in found}
    assert set(reasons) == {"t2", "t3", "t4"}
    assert reasons["t2"] == "node b is unreachable"
    assert reasons["t3"] == "no report from node a in 100 s"
    assert reasons["t4"] == "node gone is gone"
