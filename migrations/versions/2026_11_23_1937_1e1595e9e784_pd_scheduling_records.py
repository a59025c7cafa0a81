"""PD scheduling records: stored PD heatmaps, a chat job's routing decision, a request's prompt
length in characters, and the K/V hand-off of prefill and decode tasks

Revision ID: 1e1595e9e784
Revises: df6ff830d4b1
Create Date: 2026-11-23 19:37:21.363175
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "1e1595e9e784"
down_revision = "df6ff830d4b1"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pd_profiles",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("deployment", sa.String(length=64), nullable=False),
        sa.Column("heatmap", sa.JSON(), nullable=False),
        sa.Column("num_measurements", sa.Integer(), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pd_profiles")),
    )
    with op.batch_alter_table("pd_profiles", schema=None) as batch_op:
        batch_op.create_index(
            "ix_pd_profiles_deployment_created", ["deployment", "created_at"], unique=False
        )

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("schedule", sa.JSON(), nullable=True))

    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("prompt_chars", sa.Integer(), nullable=True))

    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kv_transport", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("kv_bytes", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("kv_transfer_s", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("kv_transfer_s")
        batch_op.drop_column("kv_bytes")
        batch_op.drop_column("kv_transport")

    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_column("prompt_chars")

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("schedule")

    with op.batch_alter_table("pd_profiles", schema=None) as batch_op:
        batch_op.drop_index("ix_pd_profiles_deployment_created")

    op.drop_table("pd_profiles")
