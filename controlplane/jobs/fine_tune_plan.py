"""Pure decisions of the fine-tune executor: hyperparameters, names, nodes, overdue trainings.

"auto" hyperparameters (OpenAI lets the platform choose) resolve from the training file's size:

- `n_epochs`: 3, raised for small files so that a run sees about 100 examples, at most 10.
- `batch_size`: about 0.2% of the examples (OpenAI's rule of thumb), between 1 and 8: LoRA on one
  device, where a larger batch of long conversations would not fit.
- `learning_rate_multiplier`: 1.0, times the base rate 2e-4 (a usual LoRA learning rate).

A run checkpoints about `CHECKPOINTS_PER_RUN` times (and the trainer also at each epoch end), so a
restart loses at most a quarter of the work.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from controlplane import wire
from controlplane.states import NodeState

BASE_LEARNING_RATE = 2e-4
CHECKPOINTS_PER_RUN = 4
AUTO_EPOCHS = 3
MAX_AUTO_EPOCHS = 10
EXAMPLES_PER_RUN = 100
MAX_AUTO_BATCH = 8
MAX_MODEL_NAME = 256


def resolve_hyperparameters(
    requested: wire.Hyperparameters, num_examples: int
) -> wire.ResolvedHyperparameters:
    if num_examples < 1:
        raise ValueError("a training file needs at least one example")
    n_epochs: int
    if requested.n_epochs == "auto":
        wanted = math.ceil(EXAMPLES_PER_RUN / num_examples)
        n_epochs = min(MAX_AUTO_EPOCHS, max(AUTO_EPOCHS, wanted))
    else:
        n_epochs = requested.n_epochs
    batch_size: int
    if requested.batch_size == "auto":
        batch_size = min(MAX_AUTO_BATCH, max(1, round(num_examples * 0.002)))
    else:
        batch_size = requested.batch_size
    multiplier: float
    if requested.learning_rate_multiplier == "auto":
        multiplier = 1.0
    else:
        multiplier = requested.learning_rate_multiplier
    return wire.ResolvedHyperparameters(
        n_epochs=n_epochs, batch_size=batch_size, learning_rate_multiplier=multiplier
    )


def total_steps(num_examples: int, hp: wire.ResolvedHyperparameters) -> int:
    return math.ceil(num_examples / hp.batch_size) * hp.n_epochs


def checkpoint_every(num_examples: int, hp: wire.ResolvedHyperparameters) -> int:
    return max(1, math.ceil(total_steps(num_examples, hp) / CHECKPOINTS_PER_RUN))


def training_hyperparameters(
    hp: wire.ResolvedHyperparameters, *, num_examples: int, seed: int, lora: wire.LoraConfig
) -> wire.TrainingHyperparameters:
    return wire.TrainingHyperparameters(
        n_epochs=hp.n_epochs,
        batch_size=hp.batch_size,
        learning_rate=hp.learning_rate_multiplier * BASE_LEARNING_RATE,
        seed=seed,
        lora_rank=lora.rank,
        lora_alpha=lora.alpha,
        checkpoint_every=checkpoint_every(num_examples, hp),
    )


def fine_tuned_model_name(base: str, suffix: str | None, job_id: str) -> str:
    """`ft:<base>:<suffix>:<job id>`, the suffix empty when none was given (as OpenAI's)."""
    return f"ft:{base}:{suffix or ''}:{job_id}"


def checkpoint_model_name(fine_tuned_model: str, step: int) -> str:
    return f"{fine_tuned_model}:ckpt-step-{step}"


# ---------------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class NodeLoad:
    id: str
    name: str
    url: str
    state: NodeState
    trainings: int  # training tasks in flight on it
    instances: int  # live serving instances on it


def pick_node(nodes: Sequence[NodeLoad], avoid: frozenset[str] = frozenset()) -> NodeLoad | None:
    """The least busy ready node: fewest trainings, then fewest instances. A node in `avoid`
    (where the last attempt failed) is taken only when no other is ready."""
    ready = [n for n in nodes if n.state == NodeState.READY]
    if not ready:
        return None
    return min(ready, key=lambda n: (n.id in avoid, n.trainings, n.instances, n.name))


# ---------------------------------------------------------------------------------------------
# Watching trainings in flight
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class TrainingView:
    task_id: str
    fine_tune_id: str
    node_id: str | None
    node_name: str | None
    dispatched_at: float


def overdue(
    trainings: Sequence[TrainingView],
    node_states: Mapping[str, NodeState],
    last_report_at: Mapping[str, float],
    *,
    now: float,
    report_timeout_s: float,
) -> list[tuple[TrainingView, str]]:
    """Trainings to give up on: their node is no longer ready, or it has been silent too long."""
    found = []
    for training in trainings:
        node = training.node_name or training.node_id
        state = node_states.get(training.node_id or "")
        if state is None:
            found.append((training, f"node {node} is gone"))
            continue
        if state != NodeState.READY:
            found.append((training, f"node {node} is {state.value}"))
            continue
        heard = max(training.dispatched_at, last_report_at.get(training.task_id, 0.0))
        if now - heard > report_timeout_s:
            found.append((training, f"no report from node {node} in {now - heard:.0f} s"))
    return found
