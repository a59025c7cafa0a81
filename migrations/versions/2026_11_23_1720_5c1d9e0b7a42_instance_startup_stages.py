"""instance startup stages: launch path, the node's stages, registration

Revision ID: 5c1d9e0b7a42
Revises: bcf75d4e0a15
Create Date: 2026-11-23 17:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "5c1d9e0b7a42"
down_revision = "bcf75d4e0a15"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("launch_path", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("startup", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("registration_s", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("registration_s")
        batch_op.drop_column("startup")
        batch_op.drop_column("launch_path")
