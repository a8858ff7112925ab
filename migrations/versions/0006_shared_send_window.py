"""shared send window: a channel's places in the provider's one-second window

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply."""
    op.create_table(
        "send_places",
        sa.Column("channel_id", sa.String(length=32), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("free_at", sa.Float(), nullable=False),
        sa.Column("holder", sa.String(length=32), nullable=True),
        sa.Column("held_until", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("channel_id", "n", name=op.f("pk_send_places")),
    )


def downgrade() -> None:
    """Revert."""
    op.drop_table("send_places")
