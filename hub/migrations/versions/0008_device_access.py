"""Device access: each device's status (active, pending approval, disabled) and enrolment
tokens bound to one serial number.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 22:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("device", schema=None) as batch_op:
        # Devices enrolled before this revision keep their access.
        batch_op.add_column(
            sa.Column("status", sa.String(length=16), nullable=False, server_default="active")
        )
        batch_op.add_column(
            sa.Column("status_changed_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.create_index("ix_device_status", ["status"], unique=False)
    with op.batch_alter_table("enrollment_token", schema=None) as batch_op:
        batch_op.add_column(sa.Column("device_id", sa.String(length=63), nullable=True))
        batch_op.create_index("ix_enrollment_token_device_id", ["device_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("enrollment_token", schema=None) as batch_op:
        batch_op.drop_index("ix_enrollment_token_device_id")
        batch_op.drop_column("device_id")
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_index("ix_device_status")
        batch_op.drop_column("status_changed_at")
        batch_op.drop_column("status")
