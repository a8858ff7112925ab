"""What pforte answers in the chat about privacy, and whether staff may send: pure decisions.

The flow (DSK I.1, Art. 13 and Art. 9(2)(a) GDPR):

1. A patient writes. If the organisation has published a privacy notice and this patient has not
   been sent the current version, pforte sends it (first contact, or the version changed).
2. If consent is required and the patient has not given it, pforte asks with two reply buttons
   ("Ja, einverstanden" / "Nein") whose ids carry the notice version. Typing "ja" or "nein" while a
   request is open counts too (plain-text fallback).
3. A "yes" for the current version is recorded as given; a "yes" for an older version is not: the
   patient gets the new notice's request instead. "No" is recorded as refused.
4. A withdrawal keyword ("STOP", "Widerruf") or button records the withdrawal and confirms it.
5. A patient who refused or withdrew and writes again is asked again, at most once a day.
6. A notice keyword ("Datenschutz", "privacy") sends the notice again.

Nothing here touches the database: the job in ``privacy/jobs.py`` loads the state, calls
``decide`` for each new inbound message and carries the actions out in one transaction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

YES_ID = "pforte:consent:yes"
NO_ID = "pforte:consent:no"
WITHDRAW_ID = "pforte:consent:withdraw"
YES_WORDS = frozenset({"ja", "yes", "ja einverstanden", "einverstanden", "ich bin einverstanden", "ok ja"})
NO_WORDS = frozenset({"nein", "no", "nicht einverstanden"})
ASK_AGAIN_AFTER = timedelta(hours=24)

Answer = Literal["yes", "no", "withdraw", "notice", "other"]
Action = Literal[
    "send_notice",
    "send_request",
    "record_given",
    "record_refused",
    "record_withdrawn",
    "confirm_given",
    "confirm_refused",
    "confirm_withdrawn",
    "explain_outdated",
]


@dataclass(frozen=True, slots=True)
class OrgPrivacy:
    """The organisation's side: current notice version (None if none published) and settings."""

    notice_version: int | None
    consent_required: bool
    notice_keywords: tuple[str, ...]
    withdraw_keywords: tuple[str, ...]


@dataclass(slots=True)
class PatientPrivacy:
    """The patient's side, updated as the actions of one message are applied."""

    consent_state: str  # none | requested | given | refused | withdrawn
    consent_version: int | None
    consent_at: datetime | None
    notice_version_sent: int | None


@dataclass(frozen=True, slots=True)
class Incoming:
    """What the policy needs to know about one inbound message."""

    type: str
    text: str | None
    button_id: str | None  # interactive button_reply id or quick-reply payload


@dataclass(slots=True)
class Decision:
    """The actions for one message, in order, and the notice version they concern."""

    actions: list[Action] = field(default_factory=list)
    version: int | None = None
    answer: Answer = "other"
    answered_version: int | None = None


def button_id(kind: str, version: int | None) -> str:
    """The id of a consent button; it carries the notice version the patient saw."""
    return f"{kind}:{version or 0}"


def _normalise(text: str | None) -> str:
    return re.sub(r"[^\w ]+", "", (text or "").casefold()).strip().replace("  ", " ")


def classify(msg: Incoming, org: OrgPrivacy, patient: PatientPrivacy) -> tuple[Answer, int | None]:
    """Which privacy answer a message is (and the version a button carried)."""
    if msg.button_id:
        prefix, _, ver = msg.button_id.rpartition(":")
        version = int(ver) if ver.isdigit() else None
        if prefix == YES_ID:
            return "yes", version
        if prefix == NO_ID:
            return "no", version
        if prefix == WITHDRAW_ID:
            return "withdraw", version
    if msg.type != "text" and not (msg.type in ("button", "interactive") and msg.text):
        return "other", None
    words = _normalise(msg.text)
    if not words or len(words) > 40:
        return "other", None
    if words in {_normalise(k) for k in org.withdraw_keywords}:
        return "withdraw", None
    if words in {_normalise(k) for k in org.notice_keywords}:
        return "notice", None
    if patient.consent_state == "requested":
        if words in YES_WORDS:
            return "yes", patient.consent_version
        if words in NO_WORDS:
            return "no", patient.consent_version
    return "other", None


def may_concern_privacy(
    *, text: str | None, type_: str, org: OrgPrivacy, consent_state: str, notice_version_sent: int | None
) -> bool:
    """Cheap pre-check for the ingest hot path: does this message need the privacy job at all?"""
    if org.notice_version is not None and notice_version_sent != org.notice_version:
        return True
    if org.consent_required and consent_state != "given":
        return True
    if type_ in ("interactive", "button"):
        return True
    words = _normalise(text) if type_ == "text" and text and len(text) <= 60 else ""
    return bool(words) and words in {_normalise(k) for k in (*org.notice_keywords, *org.withdraw_keywords)}


def decide(msg: Incoming, org: OrgPrivacy, patient: PatientPrivacy, now: datetime) -> Decision:
    """The actions one inbound message calls for; mutates ``patient`` to the state after them."""
    answer, answered = classify(msg, org, patient)
    d = Decision(version=org.notice_version, answer=answer, answered_version=answered)
    notice_due = org.notice_version is not None and patient.notice_version_sent != org.notice_version
    if notice_due or (answer == "notice" and org.notice_version is not None):
        d.actions.append("send_notice")
        patient.notice_version_sent = org.notice_version
    if answer == "withdraw":
        d.actions += ["record_withdrawn", "confirm_withdrawn"]
        _set(patient, "withdrawn", patient.consent_version, now)
        return d
    if answer == "yes":
        if patient.consent_state == "given" and patient.consent_version == org.notice_version:
            return d  # a second tap on the same button changes nothing
        if answered != org.notice_version:
            d.actions += ["explain_outdated", "send_request"]
            _set(patient, "requested", org.notice_version, now)
            return d
        d.actions += ["record_given", "confirm_given"]
        _set(patient, "given", org.notice_version, now)
        return d
    if answer == "no" and patient.consent_state != "refused":
        d.actions += ["record_refused", "confirm_refused"]
        _set(patient, "refused", answered or org.notice_version, now)
        return d
    if not org.consent_required or patient.consent_state == "given":
        return d
    if patient.consent_state == "none":
        d.actions.append("send_request")
        _set(patient, "requested", org.notice_version, now)
    elif patient.consent_state in ("refused", "withdrawn", "requested") and answer == "other":
        last = patient.consent_at
        if last is None or now - last >= ASK_AGAIN_AFTER:
            d.actions.append("send_request")
            _set(patient, "requested", org.notice_version, now)
    return d


def _set(patient: PatientPrivacy, state: str, version: int | None, now: datetime) -> None:
    patient.consent_state = state
    patient.consent_version = version
    patient.consent_at = now


@dataclass(frozen=True, slots=True)
class SendBlock:
    """Why staff may not send to this patient over this channel now."""

    code: str
    reason: str


def staff_send_block(
    *, consent_required: bool, consent_state: str, own_server_only: bool, encryption_ends_at_own_server: bool
) -> SendBlock | None:
    """Whether a staff message must be refused, and why (consent first, then the channel rule)."""
    if own_server_only and not encryption_ends_at_own_server:
        return SendBlock(
            "channel_not_own_server",
            "this organisation sends health content only over channels whose encryption ends at its own "
            "server; this channel's encryption ends at the provider",
        )
    if not consent_required or consent_state == "given":
        return None
    reasons = {
        "withdrawn": ("consent_withdrawn", "the patient has withdrawn consent"),
        "refused": ("consent_refused", "the patient has declined consent"),
        "requested": ("consent_pending", "the patient has not answered the consent request yet"),
    }
    code, reason = reasons.get(consent_state, ("consent_missing", "the patient has not given consent yet"))
    return SendBlock(code, reason)
