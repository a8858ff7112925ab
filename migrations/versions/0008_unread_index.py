"""the inbox header's unread total: a partial index over conversations with something unread

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UNREAD = sa.text("unread_count > 0")


def upgrade() -> None:
    """Apply."""
    op.create_index(
        "ix_conversations_unread",
        "conversations",
        ["org_id", "unread_count"],
        postgresql_where=_UNREAD,
        sqlite_where=_UNREAD,
    )


def downgrade() -> None:
    """Revert."""
    op.drop_index("ix_conversations_unread", table_name="conversations")
