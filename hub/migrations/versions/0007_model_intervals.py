"""Per-model scoring figures of each telemetry interval, as rows: what ``/metrics`` aggregates
into per-model inference rates and latency.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 17:15:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_interval",
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("model", sa.String(length=63), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("interval_s", sa.Float(), nullable=False),
        sa.Column("inferences", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("p50_ms", sa.Float(), nullable=True),
        sa.Column("p95_ms", sa.Float(), nullable=True),
        sa.Column("p99_ms", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("device_id", "seq", "model"),
    )
    op.create_index("ix_model_interval_at", "model_interval", ["at"], unique=False)
    op.create_index(
        "ix_model_interval_received_at", "model_interval", ["received_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_model_interval_received_at", table_name="model_interval")
    op.drop_index("ix_model_interval_at", table_name="model_interval")
    op.drop_table("model_interval")
