"""Imports every table so that ``Base.metadata`` is complete (for Alembic and tests)."""

from pforte.audit.models import AuditCheckpoint, AuditEvent, AuditHead
from pforte.channels.models import Channel
from pforte.compliance.models import ComplianceReport
from pforte.contacts.models import Contact
from pforte.conversations.models import (
    Attachment,
    Conversation,
    ConversationTag,
    Message,
    MessageTemplate,
    PendingStatus,
)
from pforte.crypto.models import DataKey, SigningKey
from pforte.db import Base
from pforte.deletion.models import Tombstone
from pforte.orgs.models import Organisation
from pforte.outbox.models import Job, PeriodicRun, SendSlot
from pforte.privacy.models import ConsentEvent, PrivacyNotice
from pforte.reporting.models import ErrorReporting
from pforte.retention.models import Hold, RetentionRule
from pforte.staff.models import LoginAttempt, StaffSession, StaffUser

__all__ = [
    "Attachment",
    "AuditCheckpoint",
    "AuditEvent",
    "AuditHead",
    "Base",
    "Channel",
    "ComplianceReport",
    "ConsentEvent",
    "Contact",
    "Conversation",
    "ConversationTag",
    "DataKey",
    "ErrorReporting",
    "Hold",
    "Job",
    "LoginAttempt",
    "Message",
    "MessageTemplate",
    "Organisation",
    "PendingStatus",
    "PeriodicRun",
    "PrivacyNotice",
    "RetentionRule",
    "SendSlot",
    "SigningKey",
    "StaffSession",
    "StaffUser",
    "Tombstone",
]
