"""Imports every table so that ``Base.metadata`` is complete (for Alembic and tests)."""

from pforte.channels.models import Channel
from pforte.contacts.models import Contact
from pforte.conversations.models import Attachment, Conversation, Message, MessageTemplate, PendingStatus
from pforte.crypto.models import DataKey
from pforte.db import Base
from pforte.orgs.models import Organisation
from pforte.outbox.models import Job, PeriodicRun, SendSlot
from pforte.staff.models import StaffSession, StaffUser

__all__ = [
    "Attachment",
    "Base",
    "Channel",
    "Contact",
    "Conversation",
    "DataKey",
    "Job",
    "Message",
    "MessageTemplate",
    "Organisation",
    "PendingStatus",
    "PeriodicRun",
    "SendSlot",
    "StaffSession",
    "StaffUser",
]
