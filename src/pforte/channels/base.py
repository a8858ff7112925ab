"""The Channel port: what every messenger adapter turns its wire format into and out of.

Inbound, an adapter parses a provider's webhook into plain dataclasses (`InboundMessage`,
`StatusUpdate`, `ChannelProblem`) grouped per business number in an `InboundBatch`. Outbound, the
outbox hands it an `OutboundMessage` and gets back a `SendResult` or a `ChannelError`.

Error tree (machine-readable ``code`` on every class; the provider's own code in ``provider_code``)::

    ChannelError                       base; never carries message text or patient identifiers
     +-- RetryableError                 try again later (``retry_after`` seconds, may be None)
     |    +-- RateLimitedError          130429 throughput, 131056 pair rate, 4/80007 call rate
     |    +-- ProviderUnavailableError  1, 2, 131000, 131016, 131057, HTTP 5xx, connect failures
     +-- OutcomeUnknownError            the request may have reached the provider (timeout after send)
     +-- PermanentError                 do not retry this message
     |    +-- NeedsTemplateError        131047 outside the 24-hour window
     |    +-- UndeliverableError        131026 and the other "won't be delivered" codes
     |    +-- InvalidRequestError       100, 131008, 131009, 132000, 132001, ...
     +-- ChannelDownError               190 and other credential/permission failures: the channel
                                        is unusable until an admin fixes it
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

Direction = Literal["in", "out"]

# Inbound message types we understand; anything else is stored with type "unsupported"
# and its raw JSON kept (encrypted) so nothing is ever dropped.
INBOUND_TYPES = frozenset(
    {
        "text",
        "image",
        "video",
        "document",
        "audio",
        "sticker",
        "location",
        "contacts",
        "interactive",
        "button",
        "reaction",
        "system",
        "unsupported",
    }
)
MEDIA_TYPES = frozenset({"image", "video", "document", "audio", "sticker"})

# Delivery states of an outgoing message, in the order they may only move forward.
STATUS_RANK: dict[str, int] = {
    "queued": 0,
    "sending": 1,
    "accepted": 2,
    "sent": 3,
    "delivered": 4,
    "read": 5,
    "played": 6,
}


@dataclass(frozen=True, slots=True)
class Sender:
    """Who wrote an inbound message: BSUID first, phone optional (may be absent for usernames)."""

    user_id: str | None  # BSUID, e.g. "DE.1349120865530274"
    wa_id: str | None  # phone number without '+', may be None
    profile_name: str | None = None
    username: str | None = None
    parent_user_id: str | None = None

    @property
    def key(self) -> str:
        """A stable identity for deduplicating senders inside one batch."""
        return f"u:{self.user_id}" if self.user_id else f"p:{self.wa_id}"


@dataclass(frozen=True, slots=True)
class MediaRef:
    """A provider media object referenced by an inbound message."""

    media_id: str
    mime_type: str | None
    sha256: str | None  # as sent by the provider (WhatsApp: base64 of the SHA-256)
    filename: str | None = None
    url: str | None = None
    voice: bool = False
    animated: bool = False


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One message a patient sent, parsed from a webhook."""

    external_id: str  # wamid
    channel_ref: str  # the business number's id at the provider (phone_number_id)
    sender: Sender
    type: str  # one of INBOUND_TYPES
    timestamp: datetime
    text: str | None = None  # body or caption or the human-readable part (button title, ...)
    media: MediaRef | None = None
    context_id: str | None = None  # wamid of the quoted message, if any
    forwarded: bool = False
    frequently_forwarded: bool = False
    details: dict[str, Any] = field(default_factory=dict)  # type-specific data (location, ...)
    raw: dict[str, Any] | None = None  # the raw item, kept (encrypted) for unsupported types
    errors: tuple[ChannelProblem, ...] = ()


@dataclass(frozen=True, slots=True)
class ChannelProblem:
    """An error object the provider attached to a webhook item (code and title only)."""

    code: int
    title: str
    details: str | None = None


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """A delivery-state change of a message we sent."""

    external_id: str  # wamid of our outgoing message
    channel_ref: str
    status: str  # sent | delivered | read | failed | played | (anything else kept as given)
    timestamp: datetime
    recipient_id: str | None = None
    recipient_user_id: str | None = None
    errors: tuple[ChannelProblem, ...] = ()


@dataclass(slots=True)
class InboundBatch:
    """Everything one webhook POST carried, in order of appearance."""

    messages: list[InboundMessage] = field(default_factory=list)
    statuses: list[StatusUpdate] = field(default_factory=list)
    problems: list[ChannelProblem] = field(default_factory=list)  # value.errors[] (system level)
    ignored_fields: int = 0  # changes of fields we do not handle (account_update, ...)

    @property
    def size(self) -> int:
        """Number of updates (messages + statuses) in the batch."""
        return len(self.messages) + len(self.statuses)


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """A message the outbox asks a channel to send. Exactly one of the kinds is filled."""

    to_user_id: str | None  # BSUID
    to_phone: str | None  # E.164 with '+'
    kind: Literal["text", "image", "document", "template", "interactive"]
    text: str | None = None  # body for text, caption for media
    media_id: str | None = None
    filename: str | None = None
    template_name: str | None = None
    template_language: str | None = None
    template_params: tuple[str, ...] = ()
    reply_to_external_id: str | None = None
    buttons: tuple[tuple[str, str], ...] = ()  # interactive reply buttons: (id, title), 1 to 3


@dataclass(frozen=True, slots=True)
class SendResult:
    """What the provider answered to an accepted send."""

    external_id: str
    message_status: str | None = None  # e.g. "accepted", "held_for_quality_assessment"


class ChannelError(Exception):
    """Base of every channel failure. ``str()`` never contains message text or identifiers."""

    code = "channel_error"

    def __init__(self, detail: str = "", *, provider_code: int | None = None, http_status: int | None = None):
        super().__init__(detail or self.code)
        self.detail = detail
        self.provider_code = provider_code
        self.http_status = http_status


class RetryableError(ChannelError):
    """The send did not happen; try again after ``retry_after`` seconds."""

    code = "retryable"

    def __init__(self, detail: str = "", *, retry_after: float | None = None, **kw: Any):
        super().__init__(detail, **kw)
        self.retry_after = retry_after


class RateLimitedError(RetryableError):
    """Throughput, pair-rate or call-rate limit hit."""

    code = "rate_limited"


class ProviderUnavailableError(RetryableError):
    """The provider is down or overloaded, or we could not connect."""

    code = "provider_unavailable"


class OutcomeUnknownError(ChannelError):
    """The request may have reached the provider; resending could duplicate the message."""

    code = "outcome_unknown"


class PermanentError(ChannelError):
    """The provider refused this message for good."""

    code = "permanent"


class NeedsTemplateError(PermanentError):
    """Outside the 24-hour customer-service window: only templates may be sent."""

    code = "needs_template"


class UndeliverableError(PermanentError):
    """The recipient cannot receive the message (not on WhatsApp, old client, ...)."""

    code = "undeliverable"


class InvalidRequestError(PermanentError):
    """The request was malformed or named an unknown template or parameter."""

    code = "invalid_request"


class ChannelDownError(ChannelError):
    """Credentials or permissions fail: the whole channel is unusable until an admin acts."""

    code = "channel_down"


def decode_sha256(value: str | None) -> bytes | None:
    """A SHA-256 as providers announce it (hex, or standard or URL-safe base64 with or without
    padding) as 32 bytes; None if it is neither."""
    if not value:
        return None
    value = value.strip()
    if len(value) == 64:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    padded = value.replace("-", "+").replace("_", "/") + "=" * (-len(value) % 4)
    try:
        digest = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return None
    return digest if len(digest) == 32 else None
