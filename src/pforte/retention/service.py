"""Retention settings, rules, tags and holds. Every change is audited on the caller's transaction."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from pforte.audit import service as audit
from pforte.audit.service import Actor
from pforte.channels.models import Channel
from pforte.contacts import service as contacts
from pforte.contacts.models import Contact
from pforte.conversations.models import Conversation, ConversationTag, Message
from pforte.db import new_id, read_locked
from pforte.errors import NotFoundError, ValidationError
from pforte.orgs import service as orgs
from pforte.orgs.models import Organisation
from pforte.retention.models import HOLD_KINDS, SCOPES, TARGETS, Hold, RetentionRule
from pforte.retention.policy import Policy

METADATA_CLASSES = ("delivery_timestamps", "webhook_metadata", "job_records")
MAX_DAYS = 36_500  # a hundred years: a typo guard, not a policy
_TAG = re.compile(r"^[\w][\w .-]{0,63}$", re.UNICODE)


def _days(value: int | None, what: str) -> int | None:
    if value is None:
        return None
    if not 1 <= value <= MAX_DAYS:
        raise ValidationError(f"{what} must be between 1 and {MAX_DAYS} days")
    return value


def normalise_tag(tag: str) -> str:
    """Tags are short labels: letters, digits, space, dot, dash, underscore; case-folded."""
    t = " ".join(tag.split()).casefold()
    if not _TAG.match(t):
        raise ValidationError("a tag is 1-64 letters, digits, spaces, dots, dashes or underscores")
    return t


async def load_policy(session: AsyncSession, org_id: str) -> Policy:
    """The organisation's retention policy with its channel and tag rules."""
    org = await orgs.get(session=session, org_id=org_id)
    rules = (await session.execute(select(RetentionRule).where(RetentionRule.org_id == org_id))).scalars()
    channel_days: dict[str, int | None] = {}
    tag_days: dict[str, int | None] = {}
    for r in rules:
        (channel_days if r.scope == "channel" else tag_days)[r.scope_ref] = r.days
    return Policy(
        enabled=bool(orgs.setting(org, "retention_enabled")),
        default_days=orgs.setting(org, "retention_days"),
        channel_days=channel_days,
        tag_days=tag_days,
    )


async def _org(session: AsyncSession, org_id: str) -> Organisation:
    """The organisation, locked, to change its settings."""
    return await orgs.get(session=session, org_id=org_id, for_update=True)


async def set_org_retention(
    session: AsyncSession, *, org_id: str, enabled: bool, days: int | None, actor: Actor, now: datetime
) -> None:
    """Switch retention on or off and set the default period (None: keep until deleted by hand)."""
    days = _days(days, "retention")
    org = await _org(session, org_id)
    before = {"enabled": orgs.setting(org, "retention_enabled"), "days": orgs.setting(org, "retention_days")}
    org.settings = {**(org.settings or {}), "retention_enabled": enabled, "retention_days": days}
    await audit.record(
        session,
        org_id=org_id,
        actor=actor,
        action="settings.retention",
        now=now,
        details={"before": before, "after": {"enabled": enabled, "days": days}},
    )


async def set_metadata_days(
    session: AsyncSession, *, org_id: str, values: dict[str, int], actor: Actor, now: datetime
) -> None:
    """Set how many days each class of metadata is kept."""
    org = await _org(session, org_id)
    current = dict(orgs.setting(org, "metadata_days"))
    for name, days in values.items():
        if name not in METADATA_CLASSES:
            raise ValidationError(f"unknown metadata class {name!r}")
        current[name] = _days(days, name)
    org.settings = {**(org.settings or {}), "metadata_days": current}
    await audit.record(
        session, org_id=org_id, actor=actor, action="settings.metadata_retention", now=now, details=current
    )


async def set_rule(
    session: AsyncSession,
    *,
    org_id: str,
    scope: str,
    ref: str,
    days: int | None,
    actor: Actor,
    now: datetime,
) -> RetentionRule:
    """Create or replace the rule for a channel or a tag (``days`` None: never delete automatically)."""
    if scope not in SCOPES:
        raise ValidationError(f"scope must be one of {', '.join(SCOPES)}")
    days = _days(days, "retention")
    if scope == "channel":
        ok = (
            await session.execute(select(Channel.id).where(Channel.id == ref, Channel.org_id == org_id))
        ).scalar()
        if ok is None:
            raise NotFoundError("channel not found")
    else:
        ref = normalise_tag(ref)
    rule = (
        await session.execute(
            select(RetentionRule).where(
                RetentionRule.org_id == org_id, RetentionRule.scope == scope, RetentionRule.scope_ref == ref
            )
        )
    ).scalar_one_or_none()
    if rule is None:
        rule = RetentionRule(
            id=new_id(), org_id=org_id, scope=scope, scope_ref=ref, days=days, created_at=now
        )
        session.add(rule)
    else:
        rule.days = days
    await session.flush()
    await audit.record(
        session,
        org_id=org_id,
        actor=actor,
        action="retention.rule_set",
        now=now,
        object_kind="retention_rule",
        object_id=rule.id,
        details={"scope": scope, "ref": ref, "days": days},
    )
    return rule


async def remove_rule(
    session: AsyncSession, *, org_id: str, rule_id: str, actor: Actor, now: datetime
) -> None:
    """Remove a channel or tag rule; the default applies again."""
    n = await session.execute(
        delete(RetentionRule).where(RetentionRule.id == rule_id, RetentionRule.org_id == org_id)
    )
    if not getattr(n, "rowcount", 0):
        raise NotFoundError("retention rule not found")
    await audit.record(
        session,
        org_id=org_id,
        actor=actor,
        action="retention.rule_removed",
        now=now,
        object_kind="retention_rule",
        object_id=rule_id,
    )


async def rules(session: AsyncSession, org_id: str) -> list[RetentionRule]:
    """The organisation's channel and tag rules."""
    q = (
        select(RetentionRule)
        .where(RetentionRule.org_id == org_id)
        .order_by(RetentionRule.scope, RetentionRule.scope_ref)
    )
    return list((await session.execute(q)).scalars())


async def _target_exists(session: AsyncSession, org_id: str, kind: str, target_id: str) -> bool:
    return await _patient_of(session, org_id, kind, target_id) is not None


async def _patient_of(session: AsyncSession, org_id: str, kind: str, target_id: str) -> str | None:
    """The contact a message, conversation or contact belongs to, if it is there and not erased."""
    q = select(Contact.id).where(Contact.org_id == org_id, Contact.erased_at.is_(None))
    if kind == "contact":
        q = q.where(Contact.id == target_id)
    else:
        model: Any = Message if kind == "message" else Conversation
        q = q.join(model, model.contact_id == Contact.id).where(model.id == target_id)
    found = (await session.execute(q)).scalar()
    return None if found is None else str(found)


async def place_hold(
    session: AsyncSession,
    *,
    org_id: str,
    target_kind: str,
    target_id: str,
    kind: str,
    actor: Actor,
    now: datetime,
) -> Hold:
    """Stop every deletion of a message, conversation or contact until the hold is released."""
    if target_kind not in TARGETS:
        raise ValidationError(f"a hold is placed on one of {', '.join(TARGETS)}")
    if kind not in HOLD_KINDS:
        raise ValidationError(f"hold kind must be one of {', '.join(HOLD_KINDS)}")
    # The patient's row is the lock every deletion takes before it reads the holds (contacts.lock):
    # a deletion already running finishes first, and the target is then looked at as it is now.
    # The organisation's row first, as deleting an organisation locks it before its patients.
    await read_locked(session, select(Organisation.id).where(Organisation.id == org_id), "key_share")
    patient = await _patient_of(session, org_id, target_kind, target_id)
    if patient is not None:
        await contacts.lock(session, [patient], "no_key_update")
        patient = await _patient_of(session, org_id, target_kind, target_id)
    if patient is None:
        raise NotFoundError(f"{target_kind} not found")
    existing = (
        await session.execute(
            select(Hold).where(
                Hold.org_id == org_id,
                Hold.target_kind == target_kind,
                Hold.target_id == target_id,
                Hold.kind == kind,
                Hold.released_at.is_(None),
            )
        )
    ).scalar_one_or_none()
    if existing is not None:
        return existing
    hold = Hold(
        id=new_id(),
        org_id=org_id,
        target_kind=target_kind,
        target_id=target_id,
        kind=kind,
        placed_by=actor.id,
        placed_at=now,
    )
    session.add(hold)
    await session.flush()
    await audit.record(
        session,
        org_id=org_id,
        actor=actor,
        action="hold.place",
        now=now,
        object_kind=target_kind,
        object_id=target_id,
        details={"hold_id": hold.id, "kind": kind},
    )
    return hold


async def release_hold(
    session: AsyncSession, *, org_id: str, hold_id: str, actor: Actor, now: datetime
) -> Hold:
    """End a hold; automatic deletion applies again from the next sweep."""
    hold = (
        await session.execute(
            select(Hold).where(Hold.id == hold_id, Hold.org_id == org_id, Hold.released_at.is_(None))
        )
    ).scalar_one_or_none()
    if hold is None:
        raise NotFoundError("hold not found")
    hold.released_at = now
    hold.released_by = actor.id
    await audit.record(
        session,
        org_id=org_id,
        actor=actor,
        action="hold.release",
        now=now,
        object_kind=hold.target_kind,
        object_id=hold.target_id,
        details={"hold_id": hold.id, "kind": hold.kind},
    )
    return hold


async def holds(
    session: AsyncSession, *, org_id: str, target_kind: str | None = None, target_ids: list[str] | None = None
) -> list[Hold]:
    """Active holds, optionally for some targets."""
    q = select(Hold).where(Hold.org_id == org_id, Hold.released_at.is_(None))
    if target_kind:
        q = q.where(Hold.target_kind == target_kind)
    if target_ids is not None:
        q = q.where(Hold.target_id.in_(target_ids))
    return list((await session.execute(q.order_by(Hold.placed_at))).scalars())


async def set_tags(
    session: AsyncSession, *, org_id: str, conversation_id: str, tags: list[str], actor: Actor, now: datetime
) -> list[str]:
    """Replace a conversation's tags."""
    if not await _target_exists(session, org_id, "conversation", conversation_id):
        raise NotFoundError("conversation not found")
    clean = sorted({normalise_tag(t) for t in tags if t.strip()})
    if len(clean) > 20:
        raise ValidationError("at most 20 tags per conversation")
    await session.execute(delete(ConversationTag).where(ConversationTag.conversation_id == conversation_id))
    for t in clean:
        session.add(ConversationTag(conversation_id=conversation_id, tag=t, org_id=org_id))
    await session.flush()
    await audit.record(
        session,
        org_id=org_id,
        actor=actor,
        action="conversation.tags",
        now=now,
        object_kind="conversation",
        object_id=conversation_id,
        details={"tags": clean},
    )
    return clean


async def tags_of(session: AsyncSession, conversation_id: str) -> list[str]:
    """A conversation's tags, sorted."""
    q = (
        select(ConversationTag.tag)
        .where(ConversationTag.conversation_id == conversation_id)
        .order_by(ConversationTag.tag)
    )
    return [str(t) for t in (await session.execute(q)).scalars()]
