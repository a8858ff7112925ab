"""Conversations, messages, attachments and message templates.

Content columns end in ``_enc`` and hold AES-GCM ciphertext under the contact's data key with
associated data ``pforte:v1:<table>:<column>:<row id>``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from pforte.db import Base, UTCDateTime, new_id


class Conversation(Base):
    """The thread between one contact and one channel."""

    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"))
    contact_id: Mapped[str] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"))
    channel_id: Mapped[str] = mapped_column(ForeignKey("channels.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default="open")
    unread_count: Mapped[int] = mapped_column(Integer, default=0)
    last_activity_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_inbound_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_message_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Set when the patient withdraws consent: retention counts from here, later activity does not reset it.
    retention_clock_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        UniqueConstraint("channel_id", "contact_id"),
        Index("ix_conversations_org_activity", "org_id", "last_activity_at"),
        Index("ix_conversations_contact", "contact_id"),
        # The inbox header's unread total reads only the conversations with something unread.
        Index(
            "ix_conversations_unread",
            "org_id",
            "unread_count",
            postgresql_where=text("unread_count > 0"),
            sqlite_where=text("unread_count > 0"),
        ),
    )


class ConversationTag(Base):
    """A label staff put on a conversation; retention rules can key on it."""

    __tablename__ = "conversation_tags"

    conversation_id: Mapped[str] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"))

    __table_args__ = (Index("ix_conversation_tags_org_tag", "org_id", "tag"),)


class Message(Base):
    """One message in either direction; ``external_id`` (wamid) is unique per channel.

    A message belongs to its conversation: the foreign key to it (ON DELETE CASCADE) is the one
    that removes messages. ``org_id``, ``channel_id`` and ``contact_id`` are copies of the
    conversation's, kept for the indexes that filter by them, without foreign keys of their own:
    the conversation's keys already guarantee them and cascade through it, and each of those keys
    cost a look-up per inserted row (about a quarter of the ingest INSERT, docs/performance.md).
    """

    __tablename__ = "messages"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(String(32))  # = the conversation's
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    channel_id: Mapped[str] = mapped_column(String(32))  # = the conversation's
    contact_id: Mapped[str] = mapped_column(String(32))  # = the conversation's
    direction: Mapped[str] = mapped_column(String(3))  # in | out
    type: Mapped[str] = mapped_column(String(24))
    external_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    body_enc: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    details_enc: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # JSON, type-specific
    raw_enc: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # kept only if unsupported
    context_external_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    forwarded: Mapped[bool] = mapped_column(Boolean, default=False)
    sender_user_id: Mapped[str | None] = mapped_column(ForeignKey("staff_users.id"), nullable=True)
    template_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    error_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error_reason: Mapped[str | None] = mapped_column(
        String(64), nullable=True
    )  # our code, e.g. needs_template
    error_title: Mapped[str | None] = mapped_column(String(300), nullable=True)  # provider's generic wording
    review_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The composer's one-time key: a form sent twice (lost answer, retry) queues one message.
    client_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    provider_ts: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    read_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # "Message x of y" (II.2): a long outgoing text is one logical row (parent_id NULL, not sent
    # itself) and part rows that point to it, each sent on its own.
    # No foreign key on purpose: adding one makes SQLite rebuild the whole table on upgrade. Every
    # place that deletes message rows deletes the parts with them (deletion/service.py).
    parent_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    part_index: Mapped[int | None] = mapped_column(Integer, nullable=True)  # 1-based
    part_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # SHA-256 (hex) over the message's canonical content, encrypted like the content it describes.
    content_hash_enc: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)

    __table_args__ = (
        UniqueConstraint("channel_id", "external_id"),
        Index("ix_messages_conversation_created", "conversation_id", "created_at"),
        Index("ix_messages_org_status", "org_id", "status"),
        Index("ix_messages_org_created", "org_id", "created_at"),
        Index("ix_messages_contact", "contact_id"),
        UniqueConstraint("conversation_id", "client_key"),
    )


class Attachment(Base):
    """A media file of a message, stored encrypted in the blob directory."""

    __tablename__ = "attachments"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"))
    message_id: Mapped[str] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    contact_id: Mapped[str] = mapped_column(ForeignKey("contacts.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # image | video | document | audio | sticker
    media_id: Mapped[str | None] = mapped_column(String(200), nullable=True)  # provider's id
    mime_type: Mapped[str | None] = mapped_column(String(120), nullable=True)
    expected_sha256: Mapped[str | None] = mapped_column(String(100), nullable=True)
    filename_enc: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    state: Mapped[str] = mapped_column(String(16))  # pending | stored | failed
    error_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    blob_name: Mapped[str | None] = mapped_column(String(80), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class MessageTemplate(Base):
    """An approved WhatsApp template that staff may send outside the 24-hour window."""

    __tablename__ = "message_templates"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    org_id: Mapped[str] = mapped_column(ForeignKey("organisations.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    language: Mapped[str] = mapped_column(String(16))
    body: Mapped[str] = mapped_column(String(1024))  # the approved text with {{1}} placeholders
    param_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (UniqueConstraint("org_id", "name", "language"),)


class PendingStatus(Base):
    """A status webhook that arrived before we recorded the wamid of the send it belongs to."""

    __tablename__ = "pending_statuses"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    channel_id: Mapped[str] = mapped_column(ForeignKey("channels.id", ondelete="CASCADE"))
    external_id: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    provider_ts: Mapped[datetime] = mapped_column(UTCDateTime)
    error_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error_title: Mapped[str | None] = mapped_column(String(300), nullable=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    __table_args__ = (
        UniqueConstraint("channel_id", "external_id", "status"),
        Index("ix_pending_statuses_lookup", "channel_id", "external_id"),
    )
