"""The privacy reply job: answers a patient's message with notice, consent request or confirmation.

Ingest enqueues one ``privacy_reply`` job per conversation and batch when a message may concern
privacy (``policy.may_concern_privacy``: a new or out-of-date patient, missing consent, a button
answer, a keyword), in the same transaction as the messages. The job locks the patient, decides
each message with ``policy.decide`` and writes the ledger entries, the outgoing messages (through
the normal outbox) and the job's own completion in one transaction: it either happened entirely or
not at all, so a crash can neither lose an answer nor send a notice twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from pforte.audit.service import SYSTEM
from pforte.clock import Clock
from pforte.contacts.models import Contact
from pforte.conversations import service as conversations
from pforte.conversations.models import Conversation, Message
from pforte.crypto.keys import KeyService
from pforte.db import Database, read_locked
from pforte.events import EventBus, LiveEvent
from pforte.orgs import service as orgs
from pforte.orgs.models import Organisation
from pforte.outbox.worker import ClaimedJob, OutboxWorker, finish
from pforte.privacy import policy, texts
from pforte.privacy import service as privacy
from pforte.privacy.models import ConsentEvent, PrivacyNotice

KIND = "privacy_reply"


@dataclass
class PrivacyDeps:
    """What the job needs; built in bootstrap."""

    db: Database
    keys: KeyService
    clock: Clock
    bus: EventBus
    worker: OutboxWorker
    base_url: str


def public_url(base_url: str, slug: str) -> str:
    """The public address of an organisation's privacy notice."""
    return f"{base_url.rstrip('/')}/privacy/{slug}"


def register(worker: OutboxWorker, deps: PrivacyDeps) -> None:
    """Attach the job handler."""

    async def _run(job: ClaimedJob) -> None:
        changed = await reply(deps, job)
        if changed:
            deps.worker.wake()
            deps.bus.publish(LiveEvent(org_id=changed[0], type="conversation", conversation_id=changed[1]))

    worker.register(KIND, _run)


async def reply(deps: PrivacyDeps, job: ClaimedJob) -> tuple[str, str] | None:
    """Run one job; returns (org id, conversation id) when something was sent or recorded."""
    now = deps.clock.now()
    conv_id = str(job.payload.get("conversation_id", ""))
    ids = [str(i) for i in job.payload.get("message_ids") or ()]
    async with deps.db.transaction() as session:
        conn = await session.connection()
        conv = await session.get(Conversation, conv_id)
        contact = None
        if conv is not None:  # the patient row is the lock: one privacy decision at a time per patient
            q = select(Contact).where(Contact.id == conv.contact_id)
            contact = (await read_locked(session, q)).scalar_one_or_none()
        if conv is None or contact is None or contact.erased_at is not None:
            await finish(conn, job, state="done", now=now)
            return None
        org = await session.get(Organisation, conv.org_id)
        assert org is not None
        notice = await privacy.current_notice(session, org_id=org.id)
        cfg = privacy.org_privacy_from(org.settings, notice.version if notice else None)
        answered = select(ConsentEvent.message_id).where(ConsentEvent.message_id.in_(ids))
        done = set((await session.execute(answered)).scalars())
        msgs = (
            await session.execute(
                select(Message)
                .where(Message.id.in_(ids), Message.conversation_id == conv.id, Message.direction == "in")
                .order_by(Message.provider_ts, Message.created_at)
            )
        ).scalars()
        cipher = await deps.keys.cipher(session, contact.dek_id)
        patient = policy.PatientPrivacy(
            consent_state=contact.consent_state,
            consent_version=contact.consent_version,
            consent_at=contact.consent_at,
            notice_version_sent=contact.notice_version_sent,
        )
        acted = False
        for msg in msgs:
            if msg.id in done:
                continue
            details = json.loads(cipher.open_text(msg.details_enc, "messages", "details", msg.id) or "{}")
            incoming = policy.Incoming(
                type=msg.type,
                text=cipher.open_text(msg.body_enc, "messages", "body", msg.id),
                button_id=details.get("id") or details.get("payload"),
            )
            decision = policy.decide(incoming, cfg, patient, now)
            if decision.actions:
                acted = True
                await _carry_out(deps, session, org, conv, contact, notice, msg, decision, now)
        await finish(conn, job, state="done", now=now)
    return (conv.org_id, conv.id) if acted else None


async def _carry_out(
    deps: PrivacyDeps,
    session: AsyncSession,
    org: Organisation,
    conv: Conversation,
    contact: Contact,
    notice: PrivacyNotice | None,
    msg: Message,
    decision: policy.Decision,
    now: datetime,
) -> None:
    """Queue the messages and write the ledger entries one decision calls for."""
    url = public_url(deps.base_url, org.slug)
    stop = (orgs.setting(org, "withdraw_keywords") or ["STOP"])[0].upper()
    version = notice.version if notice else None
    common: dict[str, Any] = {
        "session": session,
        "keys": deps.keys,
        "org_id": org.id,
        "conversation_id": conv.id,
        "now": now,
    }
    ledger: dict[str, Any] = {
        "contact": contact,
        "now": now,
        "actor": SYSTEM,
        "channel_id": conv.channel_id,
        "conversation_id": conv.id,
    }

    async def say(text: str) -> Message:
        return await conversations.send_text(user_id=None, text=text, system=True, **common)

    for action in decision.actions:
        if action == "send_notice" and notice is not None:
            sent = await say(
                texts.notice(org=org.name, version=notice.version, body_de=notice.body_de, url=url)
            )
            await privacy.record(
                session,
                state="notice_sent",
                version=notice.version,
                via="system",
                message_id=sent.id,
                **ledger,
            )
        elif action == "send_request":
            sent = await conversations.send_buttons(
                text=texts.request(version=version, stop=stop, url=url),
                buttons=[
                    (policy.button_id(policy.YES_ID, version), texts.YES_TITLE),
                    (policy.button_id(policy.NO_ID, version), texts.NO_TITLE),
                ],
                **common,
            )
            await privacy.record(
                session, state="requested", version=version, via="system", message_id=sent.id, **ledger
            )
        elif action in ("record_given", "record_refused", "record_withdrawn"):
            state = {"record_given": "given", "record_refused": "refused", "record_withdrawn": "withdrawn"}[
                action
            ]
            via = "button" if msg.type in ("interactive", "button") else "text"
            await privacy.record(
                session,
                state=state,
                version=decision.answered_version if state != "withdrawn" else contact.consent_version,
                via=via,
                message_id=msg.id,
                external_id=msg.external_id,
                **ledger,
            )
            # Withdrawal starts the retention clock; a new consent stops it again.
            conv.retention_clock_at = now if state == "withdrawn" else None
        elif action == "confirm_given":
            await say(texts.given(stop=stop))
        elif action == "confirm_refused":
            await say(texts.refused())
        elif action == "confirm_withdrawn":
            await say(texts.withdrawn())
        elif action == "explain_outdated":
            await say(texts.outdated(version=version))
