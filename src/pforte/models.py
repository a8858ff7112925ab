"""Imports every table so that ``Base.metadata`` is complete (for Alembic and tests)."""

from pforte.audit.models import AuditEvent, AuditHead
from pforte.channels.models import Channel
from pforte.contacts.models import Contact
from pforte.conversations.models import (
    Attachment,
    Conversation,
    ConversationTag,
    Message,
    MessageTemplate,
    PendingStatus,
)
from pforte.crypto.models import DataKey
from pforte.db import Base
from pforte.deletion.models import Tombstone
from pforte.orgs.models import Organisation
from pforte.outbox.models import Job, PeriodicRun, SendSlot
from pforte.retention.models import Hold, RetentionRule
from pforte.staff.models import LoginAttempt, StaffSession, StaffUser

__all__ = [
    "Attachment",
    "AuditEvent",
    "AuditHead",
    "Base",
    "Channel",
    "Contact",
    "Conversation",
    "ConversationTag",
    "DataKey",
    "Hold",
    "Job",
    "LoginAttempt",
    "Message",
    "MessageTemplate",
    "Organisation",
    "PendingStatus",
    "PeriodicRun",
    "RetentionRule",
    "SendSlot",
    "StaffSession",
    "StaffUser",
    "Tombstone",
]
