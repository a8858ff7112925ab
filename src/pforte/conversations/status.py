"""Delivery-state policy (pure): statuses move only forward, whatever order webhooks arrive in.

Meta delivers status webhooks concurrently and out of order; "read" may come without "delivered".
The rule: a status raises the state only if it ranks higher; a lower one only fills its own
timestamp if that is still empty. "failed" ends a message that was not yet delivered.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pforte.channels.base import STATUS_RANK

TIMESTAMP_COLUMN = {
    "sent": "sent_at",
    "delivered": "delivered_at",
    "read": "read_at",
    "played": "read_at",
    "failed": "failed_at",
}
FAILURE_REASONS = {
    131047: "needs_template",
    131026: "undeliverable",
    131049: "undeliverable",
    131050: "undeliverable",
    131036: "expired",
    132015: "template_paused",
}


@dataclass(frozen=True, slots=True)
class MessageState:
    """The delivery fields of a stored outgoing message."""

    status: str
    sent_at: datetime | None = None
    delivered_at: datetime | None = None
    read_at: datetime | None = None
    failed_at: datetime | None = None


def merge(
    current: MessageState, status: str, ts: datetime, error_code: int | None = None
) -> dict[str, object]:
    """The column changes one status webhook causes (empty dict: nothing to change)."""
    changes: dict[str, object] = {}
    column = TIMESTAMP_COLUMN.get(status)
    if column is None:
        return changes  # a status we do not track (e.g. "warning"): ignored, never a downgrade
    if status == "failed":
        if current.status in ("failed", "delivered", "read", "played"):
            return changes
        changes.update(
            status="failed",
            failed_at=ts,
            error_code=error_code,
            error_reason=FAILURE_REASONS.get(error_code or 0, "failed"),
        )
        return changes
    if getattr(current, column) is None:
        changes[column] = ts
    if current.status != "failed" and STATUS_RANK.get(status, -1) > STATUS_RANK.get(current.status, -1):
        changes["status"] = status
    return changes
