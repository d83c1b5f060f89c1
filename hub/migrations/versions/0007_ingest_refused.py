"""Record seqs the hub refused to store (kept as dead letters), which the ack cursor passes;
and each cursor's high-water mark (``stored_max``), so ingest walks stored seqs only after
records came out of order.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 17:45:00
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
        "ingest_refused",
        sa.Column("device_id", sa.String(length=63), nullable=False),
        sa.Column("stream", sa.String(length=8), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "stream", "seq"),
    )
    op.create_index(
        "ix_ingest_refused_received_at", "ingest_refused", ["received_at"], unique=False
    )
    with op.batch_alter_table("ingest_cursor", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("stored_max", sa.BigInteger(), nullable=False, server_default="0")
        )
    # Existing cursors: the highest seq already stored of their stream.
    for stream, table in (("tm", "telemetry_point"), ("dc", "collected_record")):
        op.execute(
            f"UPDATE ingest_cursor SET stored_max = COALESCE((SELECT MAX(seq) FROM {table}"
            f" WHERE {table}.device_id = ingest_cursor.device_id), 0) WHERE stream = '{stream}'"
        )


def downgrade() -> None:
    with op.batch_alter_table("ingest_cursor", schema=None) as batch_op:
        batch_op.drop_column("stored_max")
    op.drop_index("ix_ingest_refused_received_at", table_name="ingest_refused")
    op.drop_table("ingest_refused")
