"""Device tags: labels such as site=plant-3 that tag-selector deployments will match.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 14:20:19.809350
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The server default gives devices enrolled before this revision an empty set of tags.
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tags", sa.JSON(), server_default="{}", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_column("tags")
