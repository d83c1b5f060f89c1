"""Telemetry and data collection: telemetry points, collected records, per-(device, stream) ack
cursors, dead letters for malformed device messages, and a deployment's data-collection policy.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "telemetry_point",
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("interval_s", sa.Float(), nullable=False),
        sa.Column("health", sa.String(length=16), nullable=False),
        sa.Column("uptime_s", sa.Float(), nullable=False),
        sa.Column("cpu_percent", sa.Float(), nullable=True),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=True),
        sa.Column("disk_free_bytes", sa.BigInteger(), nullable=True),
        sa.Column("temperature_c", sa.Float(), nullable=True),
        sa.Column("reconnects", sa.BigInteger(), nullable=False),
        sa.Column("outbox_backlog", sa.BigInteger(), nullable=False),
        sa.Column("outbox_dropped", sa.BigInteger(), nullable=False),
        sa.Column("inferences", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "seq"),
    )
    op.create_index("ix_telemetry_point_at", "telemetry_point", ["at"], unique=False)
    op.create_index(
        "ix_telemetry_point_device_at", "telemetry_point", ["device_id", "at"], unique=False
    )
    op.create_index(
        "ix_telemetry_point_received_at", "telemetry_point", ["received_at"], unique=False
    )

    op.create_table(
        "collected_record",
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model", sa.String(length=63), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("deployment_id", sa.String(length=40), nullable=True),
        sa.Column("correlation_id", sa.String(length=200), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("inputs", sa.JSON(), nullable=True),
        sa.Column("outputs", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("device_id", "seq"),
    )
    op.create_index("ix_collected_record_at", "collected_record", ["at"], unique=False)
    op.create_index(
        "ix_collected_record_model_at", "collected_record", ["model", "version", "at"], unique=False
    )
    op.create_index(
        "ix_collected_record_received_at", "collected_record", ["received_at"], unique=False
    )

    op.create_table(
        "ingest_cursor",
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("stream", sa.String(length=8), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "stream"),
    )

    op.create_table(
        "dead_letter",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("topic", sa.String(length=255), nullable=False),
        sa.Column("device_id", sa.String(length=63), nullable=True),
        sa.Column("reason", sa.String(length=1000), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("payload_bytes", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_dead_letter_received_at", "dead_letter", ["received_at"], unique=False)

    # Deployments made before this revision collect nothing.
    with op.batch_alter_table("deployment", schema=None) as batch_op:
        batch_op.add_column(sa.Column("data_collection", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployment", schema=None) as batch_op:
        batch_op.drop_column("data_collection")
    op.drop_index("ix_dead_letter_received_at", table_name="dead_letter")
    op.drop_table("dead_letter")
    op.drop_table("ingest_cursor")
    for name in ("ix_collected_record_received_at", "ix_collected_record_model_at", "ix_collected_record_at"):
        op.drop_index(name, table_name="collected_record")
    op.drop_table("collected_record")
    for name in ("ix_telemetry_point_received_at", "ix_telemetry_point_device_at", "ix_telemetry_point_at"):
        op.drop_index(name, table_name="telemetry_point")
    op.drop_table("telemetry_point")
