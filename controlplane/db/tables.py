"""SQLAlchemy 2 typed tables.

Alembic migrations under `migrations/` must match these exactly (a test runs `alembic check`).
Times are UNIX seconds as floats, the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql import false

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


# Model names hold fine-tuned ones, `ft:<base>:<suffix>:<job id>`, longer than other names.
MODEL_NAME = String(256)


class Model(Base):
    __tablename__ = "models"

    name: Mapped[str] = mapped_column(MODEL_NAME, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(128))
    architecture: Mapped[str | None] = mapped_column(String(128))
    num_parameters: Mapped[int | None] = mapped_column(BigInteger)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)


class Deployment(Base):
    __tablename__ = "deployments"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(MODEL_NAME, ForeignKey("models.name"))
    replicas: Mapped[int] = mapped_column(Integer)  # desired; the autoscaler's when it is on
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Its instance groups (reconcile/groups.py): `replicas` is the colocated group's size.
    mode: Mapped[str] = mapped_column(String(16), server_default="colocated")
    prefill_replicas: Mapped[int] = mapped_column(Integer, server_default="0")
    decode_replicas: Mapped[int] = mapped_column(Integer, server_default="0")
    # Mode semi-pd's instance settings (reconcile/semi_pd.py); None/false in the other modes.
    slo_ttft_ms: Mapped[float | None] = mapped_column(Float)
    slo_tpot_ms: Mapped[float | None] = mapped_column(Float)
    semi_pd_split: Mapped[int | None] = mapped_column(Integer)  # None: FlowServe's default
    semi_pd_static: Mapped[bool] = mapped_column(Boolean, server_default=false())
    # Autoscaling is on when max_replicas is set (docs/scaling.md, "Autoscaling").
    min_replicas: Mapped[int | None] = mapped_column(Integer)
    max_replicas: Mapped[int | None] = mapped_column(Integer)
    target_concurrency: Mapped[float | None] = mapped_column(Float)
    upscale_delay_s: Mapped[float | None] = mapped_column(Float)
    downscale_delay_s: Mapped[float | None] = mapped_column(Float)
    scale_to_zero_after_s: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class ScalingEvent(Base):
    """A change of one instance group's replicas (by the autoscaler or by hand) or a model
    preload, with the inputs it was decided on."""

    __tablename__ = "scaling_events"
    __table_args__ = (Index("ix_scaling_events_deployment_at", "deployment", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # autoscale | manual | preload
    role: Mapped[str | None] = mapped_column(String(16))  # the group; None: not about one
    from_replicas: Mapped[int] = mapped_column(Integer)
    to_replicas: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    inputs: Mapped[dict[str, Any]] = mapped_column(JSON)
    at: Mapped[float] = mapped_column(Float)


class Node(Base):
    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    url: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(32))
    resources: Mapped[dict[str, Any]] = mapped_column(JSON)
    last_heartbeat_at: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (Index("ix_instances_deployment_state", "deployment", "state"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    deployment: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(MODEL_NAME)
    node_id: Mapped[str | None] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(32))
    # The semi-PD settings it was started with (wire.SemiPDConfig; None: not semi-PD), so an
    # instance whose deployment's settings changed since is replaced.
    semi_pd: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(32))
    url: Mapped[str | None] = mapped_column(Text)
    pid: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    # How it started (db/instance_startup.py): fork | warm_pod | cold, the node's stages, and
    # the time from ready on the node to routed to, measured by the control plane.
    launch_path: Mapped[str | None] = mapped_column(String(16))
    startup: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    registration_s: Mapped[float | None] = mapped_column(Float)


class Request(Base):
    __tablename__ = "requests"
    __table_args__ = (Index("ix_requests_state_created", "state", "created_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    deployment: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(32))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    # The prompt's length as the router sees it (text), for learning chars per token.
    prompt_chars: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    # A chat job's routing decision on a PD deployment: mode, instances, and every input.
    schedule: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)


class Task(Base):
    __tablename__ = "tasks"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(32))
    instance_id: Mapped[str | None] = mapped_column(String(64))
    node_id: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    # A PD pair's K/V hand-off: on the prefill task its export, on the decode task its fetch
    # and import (docs/pd.md).
    kv_transport: Mapped[str | None] = mapped_column(String(16))
    kv_bytes: Mapped[int | None] = mapped_column(BigInteger)
    kv_transfer_s: Mapped[float | None] = mapped_column(Float)


class PDProfile(Base):
    """A measured PD heatmap of a deployment (`deepflow profile pd`); the newest one routes."""

    __tablename__ = "pd_profiles"
    __table_args__ = (Index("ix_pd_profiles_deployment_created", "deployment", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment: Mapped[str] = mapped_column(String(64))
    heatmap: Mapped[dict[str, Any]] = mapped_column(JSON)
    num_measurements: Mapped[int] = mapped_column(Integer)
    duration_s: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)


class Event(Base):
    """One state change of any record: requests, jobs, tasks, instances, nodes, fine-tunes."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_entity", "entity_kind", "entity_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    entity_kind: Mapped[str] = mapped_column(String(16))
    entity_id: Mapped[str] = mapped_column(String(64))
    from_state: Mapped[str | None] = mapped_column(String(32))
    to_state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text)
    at: Mapped[float] = mapped_column(Float)


class File(Base):
    """An uploaded file (OpenAI's files API); its bytes live at `path`."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    filename: Mapped[str] = mapped_column(Text)
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    path: Mapped[str] = mapped_column(Text)
    num_examples: Mapped[int | None] = mapped_column(Integer)  # fine-tune files only
    created_at: Mapped[float] = mapped_column(Float, index=True)


class FineTune(Base):
    """An OpenAI fine-tuning job; `request_id` is the fine_tune request whose four jobs run it."""

    __tablename__ = "fine_tunes"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id"))
    state: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(MODEL_NAME)  # the base: a registered model
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)  # resolved, no "auto"
    lora: Mapped[dict[str, Any]] = mapped_column(JSON)
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    output_dir: Mapped[str] = mapped_column(Text)
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    last_step: Mapped[int] = mapped_column(Integer, default=0)  # last progress step recorded
    last_checkpoint: Mapped[str | None] = mapped_column(Text)  # folder a restart resumes from
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    train_loss: Mapped[float | None] = mapped_column(Float)
    valid_loss: Mapped[float | None] = mapped_column(Float)
    merged_path: Mapped[str | None] = mapped_column(Text)
    fine_tuned_model: Mapped[str | None] = mapped_column(MODEL_NAME)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float, index=True)
    updated_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)


class FineTuneEvent(Base):
    """A fine-tuning job's OpenAI event: a message, or a `metrics` event with loss and step."""

    __tablename__ = "fine_tune_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    fine_tune_id: Mapped[str] = mapped_column(ForeignKey("fine_tunes.id"), index=True)
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)


class FineTuneCheckpoint(Base):
    __tablename__ = "fine_tune_checkpoints"
    __table_args__ = (UniqueConstraint("fine_tune_id", "step"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    fine_tune_id: Mapped[str] = mapped_column(ForeignKey("fine_tunes.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
