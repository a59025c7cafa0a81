"""semi-PD deployments: a deployment's semi-PD settings (SLOs, split, static), and the settings
each instance was started with

Revision ID: 4c75c18aaccf
Revises: 1e1595e9e784
Create Date: 2026-12-07 15:22:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "4c75c18aaccf"
down_revision = "1e1595e9e784"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("slo_ttft_ms", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("slo_tpot_ms", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("semi_pd_split", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("semi_pd_static", sa.Boolean(), server_default=sa.false(), nullable=False)
        )

    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("semi_pd", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("semi_pd")

    with op.batch_alter_table("deployments", schema=None) as batch_op:
        batch_op.drop_column("semi_pd_static")
        batch_op.drop_column("semi_pd_split")
        batch_op.drop_column("slo_tpot_ms")
        batch_op.drop_column("slo_ttft_ms")
