"""The inference config of a model version: built-in runtime or entry script, the script's
requirements and the runtime options.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 03:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Versions registered before this revision ran on their framework's built-in runtime with
    # its default options, which is what the server defaults say.
    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "runtime_kind", sa.String(length=16), server_default="builtin", nullable=False
            )
        )
        batch_op.add_column(sa.Column("entry_script", sa.String(length=255), nullable=True))
        batch_op.add_column(
            sa.Column("requirements", sa.JSON(), server_default="[]", nullable=False)
        )
        batch_op.add_column(
            sa.Column("runtime_options", sa.JSON(), server_default="{}", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.drop_column("runtime_options")
        batch_op.drop_column("requirements")
        batch_op.drop_column("entry_script")
        batch_op.drop_column("runtime_kind")
