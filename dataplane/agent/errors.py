"""The node agent's exception tree.

    AgentError
    ├── InvalidStart           an InstanceStart the agent cannot act on (HTTP 400)
    ├── UnknownInstance        no instance with that id on this node (HTTP 404)
    ├── InstanceConflict       the id is taken by a different instance (HTTP 409)
    ├── UnknownTask            no training task with that id on this node (HTTP 404)
    ├── TaskRunning            a training task with that id is still running (HTTP 409)
    ├── ShuttingDown           the agent is stopping and starts nothing new (HTTP 503)
    ├── SpawnFailed            an instance or trainer process could not be started (HTTP 500)
    ├── IllegalTransition      a state change the transition table forbids (a bug: HTTP 500)
    └── ControlPlaneError      a call to the control plane failed or was refused
        └── NodeForgotten      the control plane does not know this node (heartbeat 404)

Errors become HTTP status codes in `app.py` and nowhere else.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the node agent raises on purpose."""


class InvalidStart(AgentError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class UnknownInstance(AgentError):
    def __init__(self, instance_id: str) -> None:
        super().__init__(f"instance {instance_id!r} is not on this node")
        self.instance_id = instance_id


class InstanceConflict(AgentError):
    def __init__(self, instance_id: str) -> None:
        super().__init__(f"instance {instance_id!r} already exists with a different spec")
        self.instance_id = instance_id


class UnknownTask(AgentError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"training task {task_id!r} is not on this node")
        self.task_id = task_id


class TaskRunning(AgentError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"training task {task_id!r} is already running on this node")
        self.task_id = task_id


class ShuttingDown(AgentError):
    def __init__(self) -> None:
        super().__init__("the node agent is shutting down")


class SpawnFailed(AgentError):
    def __init__(self, instance_id: str, cause: Exception, entity: str = "instance") -> None:
        super().__init__(f"{entity} {instance_id!r} could not be started: {cause}")
        self.instance_id = instance_id


class IllegalTransition(AgentError):
    def __init__(self, from_state: str, to_state: str, entity: str = "instance") -> None:
        super().__init__(f"illegal {entity} transition {from_state} -> {to_state}")
        self.from_state = from_state
        self.to_state = to_state


class ControlPlaneError(AgentError):
    """A call to the control plane failed: no answer, or an answer that is not a success."""


class NodeForgotten(ControlPlaneError):
    def __init__(self, node_id: str) -> None:
        super().__init__(f"the control plane does not know node {node_id!r}")
        self.node_id = node_id
