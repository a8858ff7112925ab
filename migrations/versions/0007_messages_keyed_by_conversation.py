"""messages keyed by their conversation only: no foreign keys of their own to org, channel, contact

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22 23:30:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_DROPPED = (
    ("fk_messages_org_id_organisations", "org_id", "organisations"),
    ("fk_messages_channel_id_channels", "channel_id", "channels"),
    ("fk_messages_contact_id_contacts", "contact_id", "contacts"),
)


def upgrade() -> None:
    """Apply."""
    with op.batch_alter_table("messages", schema=None) as batch_op:
        for name, _column, _table in _DROPPED:
            batch_op.drop_constraint(name, type_="foreignkey")


def downgrade() -> None:
    """Revert."""
    with op.batch_alter_table("messages", schema=None) as batch_op:
        for name, column, table in _DROPPED:
            batch_op.create_foreign_key(name, table, [column], ["id"], ondelete="CASCADE")
