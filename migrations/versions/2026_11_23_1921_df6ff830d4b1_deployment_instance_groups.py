"""deployment modes and instance groups: prefill and decode group sizes, the group of a scaling
event

Revision ID: df6ff830d4b1
Revises: 5c2e9a7d41b3
Create Date: 2026-11-23 19:21:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "df6ff830d4b1"
down_revision = "5c2e9a7d41b3"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("mode", sa.String(length=16), server_default="colocated", nullable=False)
        )
        batch_op.add_column(
            sa.Column("prefill_replicas", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(
            sa.Column("decode_replicas", sa.Integer(), server_default="0", nullable=False)
        )

    with op.batch_alter_table("scaling_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("role", sa.String(length=16), nullable=True))
    # Every replica change so far was of the one group a deployment had.
    op.execute("UPDATE scaling_events SET role = 'colocated' WHERE kind != 'preload'")


def downgrade() -> None:
    with op.batch_alter_table("scaling_events", schema=None) as batch_op:
        batch_op.drop_column("role")

    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.drop_column("decode_replicas")
        batch_op.drop_column("prefill_replicas")
        batch_op.drop_column("mode")
