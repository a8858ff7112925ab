"""What each kind of channel is, honestly (DSK II.1): where its encryption ends and who sees content.

An organisation can decide that health content goes only over channels whose encryption ends at its
own server (``own_server_encryption_only``); a channel qualifies when ``encryption_ends`` is
``"own_server"``. The WhatsApp Cloud API does not: Meta's Cloud API decrypts every message and
re-encrypts it for the patient's app, holding the keys on the business's behalf as processor
(Art. 28 GDPR). That is stated plainly on the channels page, with the number's storage mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EncryptionEnd = Literal["provider", "own_server"]


def N_(text: str) -> str:
    """Mark a string for the catalogs; templates translate it when they show it."""
    return text


@dataclass(frozen=True, slots=True)
class ChannelKind:
    """The facts an admin needs to judge a channel kind."""

    kind: str
    label: str
    encryption_ends: EncryptionEnd
    operator: str  # who runs the endpoint where encryption ends
    operator_role: str  # in GDPR terms
    provider_retention: str  # how long the operator may keep content


@dataclass(frozen=True, slots=True)
class StorageMode:
    """Where the operator keeps content at rest for one number."""

    code: str
    label: str
    detail: str


KINDS: dict[str, ChannelKind] = {
    "whatsapp": ChannelKind(
        kind="whatsapp",
        label=N_("WhatsApp Business Platform (Cloud API)"),
        encryption_ends="provider",
        operator="Meta Platforms Ireland Ltd.",
        operator_role=N_("processor (Art. 28 GDPR)"),
        provider_retention=N_("up to 30 days at rest, encrypted (1 hour in No-Storage mode)"),
    ),
}

STORAGE_MODES: dict[str, StorageMode] = {
    "default": StorageMode(
        "default", N_("Default storage"), N_("Meta keeps content at rest in its default (US-based) storage.")
    ),
    "DE": StorageMode(
        "DE",
        N_("Local Storage DE"),
        N_(
            "Content may be in use in any Meta data centre for up to 60 minutes, then kept at rest only "
            "in Germany."
        ),
    ),
    "no_storage": StorageMode(
        "no_storage",
        N_("No Storage"),
        N_(
            "Content is kept in transit for at most 1 hour and not stored at rest; failed deliveries are "
            "not retried after that hour."
        ),
    ),
}


def kind_of(kind: str) -> ChannelKind:
    """The declaration of a channel kind; an unknown kind is treated as ending at a provider."""
    return KINDS.get(
        kind,
        ChannelKind(kind, kind, "provider", "unknown", "unknown", "unknown"),
    )


def ends_at_own_server(kind: str) -> bool:
    """Whether a channel of this kind keeps encryption up to our own server."""
    return kind_of(kind).encryption_ends == "own_server"
