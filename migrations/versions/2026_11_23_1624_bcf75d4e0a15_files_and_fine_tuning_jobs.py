"""files and fine-tuning jobs

Revision ID: bcf75d4e0a15
Revises: 1e7718695fc2
Create Date: 2026-11-23 16:24:44.445248
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "bcf75d4e0a15"
down_revision = "1e7718695fc2"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("filename", sa.Text(), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("num_examples", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_files")),
    )
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_files_created_at"), ["created_at"], unique=False)

    op.create_table(
        "fine_tunes",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("training_file", sa.String(length=64), nullable=False),
        sa.Column("validation_file", sa.String(length=64), nullable=True),
        sa.Column("hyperparameters", sa.JSON(), nullable=False),
        sa.Column("lora", sa.JSON(), nullable=False),
        sa.Column("suffix", sa.String(length=64), nullable=True),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("output_dir", sa.Text(), nullable=False),
        sa.Column("restarts", sa.Integer(), nullable=False),
        sa.Column("last_step", sa.Integer(), nullable=False),
        sa.Column("last_checkpoint", sa.Text(), nullable=True),
        sa.Column("trained_tokens", sa.BigInteger(), nullable=True),
        sa.Column("train_loss", sa.Float(), nullable=True),
        sa.Column("valid_loss", sa.Float(), nullable=True),
        sa.Column("merged_path", sa.Text(), nullable=True),
        sa.Column("fine_tuned_model", sa.String(length=256), nullable=True),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["request_id"], ["requests.id"], name=op.f("fk_fine_tunes_request_id_requests")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fine_tunes")),
    )
    with op.batch_alter_table("fine_tunes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_fine_tunes_created_at"), ["created_at"], unique=False)

    op.create_table(
        "fine_tune_checkpoints",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("fine_tune_id", sa.String(length=64), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["fine_tune_id"],
            ["fine_tunes.id"],
            name=op.f("fk_fine_tune_checkpoints_fine_tune_id_fine_tunes"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fine_tune_checkpoints")),
        sa.UniqueConstraint(
            "fine_tune_id", "step", name=op.f("uq_fine_tune_checkpoints_fine_tune_id")
        ),
    )
    with op.batch_alter_table("fine_tune_checkpoints", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_fine_tune_checkpoints_fine_tune_id"), ["fine_tune_id"], unique=False
        )

    op.create_table(
        "fine_tune_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("fine_tune_id", sa.String(length=64), nullable=False),
        sa.Column("level", sa.String(length=8), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["fine_tune_id"],
            ["fine_tunes.id"],
            name=op.f("fk_fine_tune_events_fine_tune_id_fine_tunes"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fine_tune_events")),
    )
    with op.batch_alter_table("fine_tune_events", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_fine_tune_events_fine_tune_id"), ["fine_tune_id"], unique=False
        )

    _model_name_length(256)


def downgrade() -> None:
    _model_name_length(64)

    with op.batch_alter_table("fine_tune_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_fine_tune_events_fine_tune_id"))

    op.drop_table("fine_tune_events")
    with op.batch_alter_table("fine_tune_checkpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_fine_tune_checkpoints_fine_tune_id"))

    op.drop_table("fine_tune_checkpoints")
    with op.batch_alter_table("fine_tunes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_fine_tunes_created_at"))

    op.drop_table("fine_tunes")
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_files_created_at"))

    op.drop_table("files")


def _model_name_length(length: int) -> None:
    """Model names widen for fine-tuned models (`ft:<base>:<suffix>:<job id>`).

    SQLite's batch mode rebuilds `models` by dropping it, which its foreign-key check refuses
    while deployments point at it; so the deployments' key is dropped first and put back last."""
    fk = "fk_deployments_model_models"
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.drop_constraint(fk, type_="foreignkey")
        batch_op.alter_column("model", type_=sa.String(length=length), existing_nullable=False)
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.alter_column("model", type_=sa.String(length=length), existing_nullable=False)
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.alter_column("name", type_=sa.String(length=length), existing_nullable=False)
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.create_foreign_key(fk, "models", ["model"], ["name"])
