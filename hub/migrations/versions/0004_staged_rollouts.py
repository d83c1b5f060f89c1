"""Staged rollouts: rollout state, policy, waves, priority, continuous targets and leases on
deployments; per-device hub state, wave and rollback target; device groups; the audit history.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 17:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deployment", schema=None) as batch_op:
        # Deployments made before this revision were all-at-once: one wave, already released.
        batch_op.add_column(
            sa.Column("state", sa.String(length=16), server_default="running", nullable=False)
        )
        batch_op.add_column(sa.Column("state_reason", sa.String(), server_default="", nullable=False))
        batch_op.add_column(sa.Column("policy", sa.JSON(), server_default="{}", nullable=False))
        batch_op.add_column(sa.Column("current_wave", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("waves", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("priority", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(
            sa.Column("continuous", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(sa.Column("selector", sa.String(length=1000), nullable=True))
        batch_op.add_column(sa.Column("groups", sa.JSON(), server_default="[]", nullable=False))
        batch_op.add_column(
            sa.Column("retry_bad", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(
            sa.Column("created_by", sa.String(length=255), server_default="", nullable=False)
        )
        batch_op.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_deployment_state", ["state"], unique=False)
    op.execute("UPDATE deployment SET updated_at = created_at")
    with op.batch_alter_table("deployment", schema=None) as batch_op:
        batch_op.alter_column("updated_at", nullable=False)

    with op.batch_alter_table("deployment_device", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("state", sa.String(length=16), server_default="in_progress", nullable=False)
        )
        batch_op.add_column(sa.Column("wave", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("previous_digest", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("released_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("state_changed_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.create_index("ix_deployment_device_state", ["state"], unique=False)
    # Rows from before: the device's step says where it stands.
    op.execute(
        "UPDATE deployment_device SET state = CASE step"
        " WHEN 'active' THEN 'succeeded' WHEN 'failed' THEN 'failed'"
        " WHEN 'timed_out' THEN 'timed_out' ELSE 'in_progress' END,"
        " released_at = updated_at, state_changed_at = updated_at"
    )
    with op.batch_alter_table("deployment_device", schema=None) as batch_op:
        batch_op.alter_column("state_changed_at", nullable=False)

    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.add_column(sa.Column("group", sa.String(length=63), nullable=True))
        batch_op.create_index("ix_device_group", ["group"], unique=False)

    op.create_table(
        "deployment_audit",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("deployment_id", sa.String(length=40), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=255), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("detail", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployment.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "ix_deployment_audit_deployment_id", "deployment_audit", ["deployment_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_deployment_audit_deployment_id", table_name="deployment_audit")
    op.drop_table("deployment_audit")
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_index("ix_device_group")
        batch_op.drop_column("group")
    with op.batch_alter_table("deployment_device", schema=None) as batch_op:
        batch_op.drop_index("ix_deployment_device_state")
        for name in ("state_changed_at", "activated_at", "released_at", "previous_digest", "wave", "state"):
            batch_op.drop_column(name)
    with op.batch_alter_table("deployment", schema=None) as batch_op:
        batch_op.drop_index("ix_deployment_state")
        for name in (
            "lease_expires_at", "lease_owner", "finished_at", "updated_at", "created_by",
            "retry_bad", "groups", "selector", "continuous", "priority", "waves",
            "current_wave", "policy", "state_reason", "state",
        ):
            batch_op.drop_column(name)
