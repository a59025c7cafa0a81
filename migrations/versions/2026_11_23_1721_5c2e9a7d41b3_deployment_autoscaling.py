"""deployment autoscaling settings and scaling events

Revision ID: 5c2e9a7d41b3
Revises: 5c1d9e0b7a42
Create Date: 2026-11-23 17:21:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "5c2e9a7d41b3"
down_revision = "5c1d9e0b7a42"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "scaling_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("deployment", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("from_replicas", sa.Integer(), nullable=False),
        sa.Column("to_replicas", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("inputs", sa.JSON(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scaling_events")),
    )
    with op.batch_alter_table("scaling_events", schema=None) as batch_op:
        batch_op.create_index("ix_scaling_events_deployment_at", ["deployment", "at"], unique=False)

    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("min_replicas", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("max_replicas", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("target_concurrency", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("upscale_delay_s", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("downscale_delay_s", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("scale_to_zero_after_s", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.drop_column("scale_to_zero_after_s")
        batch_op.drop_column("downscale_delay_s")
        batch_op.drop_column("upscale_delay_s")
        batch_op.drop_column("target_concurrency")
        batch_op.drop_column("max_replicas")
        batch_op.drop_column("min_replicas")

    with op.batch_alter_table("scaling_events", schema=None) as batch_op:
        batch_op.drop_index("ix_scaling_events_deployment_at")

    op.drop_table("scaling_events")
