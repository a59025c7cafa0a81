"""A deployment's instance groups: which roles its mode runs, and where each group's size lives.

docs/pd.md, "Deployment modes and groups": a **colocated** deployment runs one group of colocated
instances (`replicas`); a **disaggregated** one a prefill group and a decode group
(`prefill_replicas`, `decode_replicas`); **auto** runs all three, so a request can be served
either way; **semi-pd** runs one colocated group whose instances split their device between a
prefill and a decode worker (reconcile/semi_pd.py). Every group is planned, drained and
autoscaled on its own.
"""

from __future__ import annotations

from typing import Final

from controlplane.wire.instance import InstanceRole

COLOCATED: Final = "colocated"
PREFILL: Final = "prefill"
DECODE: Final = "decode"
ROLES: tuple[InstanceRole, ...] = (COLOCATED, PREFILL, DECODE)
SEMI_PD: Final = "semi-pd"

MODE_ROLES: dict[str, tuple[InstanceRole, ...]] = {
    "colocated": (COLOCATED,),
    "disaggregated": (PREFILL, DECODE),
    "auto": (COLOCATED, PREFILL, DECODE),
    SEMI_PD: (COLOCATED,),  # to the platform its instances are colocated ones
}
# The field of DeploymentCreate/DeploymentUpdate, and the deployments column, of each group.
COUNT_FIELD = {COLOCATED: "replicas", PREFILL: "prefill_replicas", DECODE: "decode_replicas"}


def roles_of(mode: str) -> tuple[InstanceRole, ...]:
    """The groups a mode runs, in the order they are planned and shown."""
    try:
        return MODE_ROLES[mode]
    except KeyError:
        raise ValueError(f"unknown deployment mode {mode!r}") from None


def pd_scheduled(mode: str) -> bool:
    """Whether a request goes through the PD scheduler (colocated or a pair, per request): only
    where the mode has prefill and decode groups; else it is one task on a colocated instance."""
    return PREFILL in roles_of(mode)


def safe_mode_change(old: str, new: str) -> bool:
    """A mode may change to one that keeps a group of the old one, so the instances of that group
    go on serving while the others start or drain: colocated and disaggregated share none, and
    change through auto. Colocated, semi-pd and auto share the colocated group; where its
    instances' semi-PD settings change they are replaced one by one (reconcile/planner.py)."""
    return bool(set(roles_of(old)) & set(roles_of(new)))


def waits_for(mode: str, role: str | None) -> tuple[str, ...]:
    """The groups a request waiting for an instance of `role` (None: any role) counts toward at
    the activator: its own group; a request for any role the colocated group when the mode has
    one (it is a colocated request), else every group (whichever is ready first takes it)."""
    roles = roles_of(mode)
    if role is not None:
        return (role,) if role in roles else ()
    return (COLOCATED,) if COLOCATED in roles else roles
