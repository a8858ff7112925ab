"""The retention sweeper: deletes what is due, in batches, safely beside live traffic.

Why this is careful:

* **One transaction per batch.** A crash loses at most the batch in flight, which rolls back
  whole; the next run starts again from the oldest due conversation. Erased contacts are cleaned
  up by :func:`pforte.deletion.service.purge_erased_step`, also one step per transaction.
* **Several sweepers at once** (the periodic job in every process, an operator's
  ``pforte retention run``) take a per-organisation lock first: a PostgreSQL advisory lock, or on
  SQLite the database's write lock. Candidate conversations are then read *under* that lock. On
  PostgreSQL their patients' rows are locked next (the lock every deletion and every hold takes,
  :func:`pforte.contacts.service.lock`), then the conversations ``FOR UPDATE``, and the candidates
  are read again as they are now. So a message arriving at the same moment either lands before
  the decision (and makes the conversation active again) or waits and lands in a new
  conversation; a hold placed at the same moment is seen or finds its target gone; and a patient
  whose last conversation goes is not erased while a new conversation of theirs is being stored.
* **Holds always win**; a held conversation is skipped and reported, never touched.
* **Nothing is decided twice**: the keyset cursor walks each candidate once per run.
* **Time comes from the injected clock**, so tests move it instead of waiting.

Contacts left without any conversation are crypto-shredded in the same batch. Metadata classes
(delivery timestamps, parked webhook statuses, finished job records, session IP/user agent,
failed logins) have their own short retention and are purged here too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, literal, or_, select, text, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from pforte.audit import service as audit
from pforte.audit.service import SYSTEM, Actor
from pforte.config import Settings
from pforte.contacts import service as contacts
from pforte.contacts.models import Contact
from pforte.conversations.models import Attachment, Conversation, ConversationTag, Message, PendingStatus
from pforte.crypto.models import DataKey
from pforte.db import Database, dialect_of, table_of, take_write_lock
from pforte.deletion import service as deletion
from pforte.deletion.ledger import Erasure
from pforte.deletion.models import Tombstone
from pforte.deletion.service import Eraser
from pforte.orgs import service as orgs
from pforte.orgs.models import Organisation
from pforte.outbox.models import Job
from pforte.retention.models import Hold
from pforte.retention.policy import Decision, Policy, decide
from pforte.retention.service import load_policy
from pforte.staff.models import LoginAttempt, StaffSession

log = logging.getLogger("pforte.retention")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class DueItem:
    """One conversation the sweeper looked at: what it decided and why."""

    org_id: str
    conversation_id: str
    contact_id: str
    last_activity_at: datetime
    decision: Decision
    holds: list[str]

    @property
    def goes(self) -> bool:
        """Due and not held."""
        return self.decision.due and not self.holds


@dataclass
class SweepReport:
    """What one run did (or, for a dry run, would do)."""

    dry_run: bool = False
    conversations: int = 0
    messages: int = 0
    attachments: int = 0
    contacts_erased: int = 0
    contacts_purged: int = 0
    kept_on_hold: int = 0
    batches: int = 0
    metadata: dict[str, int] = field(default_factory=dict)
    items: list[DueItem] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Counts only (for logs, audit and the CLI's JSON)."""
        return {
            "dry_run": self.dry_run,
            "conversations": self.conversations,
            "messages": self.messages,
            "attachments": self.attachments,
            "contacts_erased": self.contacts_erased,
            "contacts_purged": self.contacts_purged,
            "kept_on_hold": self.kept_on_hold,
            "batches": self.batches,
            "metadata": dict(self.metadata),
        }


async def _lock_org(session: AsyncSession, org_id: str) -> None:
    """Serialise sweepers of one organisation until the transaction ends."""
    if dialect_of(session) == "postgresql":
        await session.execute(
            text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"retention:{org_id}"}
        )
    else:  # SQLite's write lock: reads after it see the latest commit, and nobody writes meanwhile
        await take_write_lock(session)


async def _candidates(
    session: AsyncSession,
    org_id: str,
    cutoff: datetime,
    cursor: tuple[datetime, str],
    limit: int,
    *,
    by_clock: bool = False,
    locked: list[str] | None = None,
) -> list[Any]:
    """The next candidates by last activity, or (``by_clock``) by a withdrawal's retention clock.

    The second pass sees only conversations the first one did not: their clock is past the cutoff
    while later activity is not (a patient who withdrew consent and wrote again). ``locked``: read
    those of the given ids that are still candidates, locking them ``FOR UPDATE`` on PostgreSQL.
    """
    ref = Conversation.retention_clock_at if by_clock else Conversation.last_activity_at
    q = (
        select(
            Conversation.id,
            Conversation.contact_id,
            Conversation.channel_id,
            Conversation.last_activity_at,
            Conversation.retention_clock_at,
            ref.label("ref"),
        )
        .join(Contact, Contact.id == Conversation.contact_id)
        .where(
            Conversation.org_id == org_id,
            ref < cutoff,
            Contact.erased_at.is_(None),
            tuple_(ref, Conversation.id) > tuple_(literal(cursor[0]), literal(cursor[1])),
        )
        .order_by(ref, Conversation.id)
        .limit(limit)
    )
    if by_clock:
        q = q.where(Conversation.last_activity_at >= cutoff)
    if locked is not None:
        q = q.where(Conversation.id.in_(locked))
        if dialect_of(session) == "postgresql":
            q = q.with_for_update(of=Conversation)
    return list((await session.execute(q)).all())


async def _holds_by_conversation(session: AsyncSession, org_id: str, rows: list[Any]) -> dict[str, list[str]]:
    conv_ids = [r.id for r in rows]
    contact_of = {r.id: r.contact_id for r in rows}
    out: dict[str, list[str]] = {c: [] for c in conv_ids}
    direct = await session.execute(
        select(Hold.target_kind, Hold.target_id, Hold.kind).where(
            Hold.org_id == org_id,
            Hold.released_at.is_(None),
            or_(
                (Hold.target_kind == "conversation") & Hold.target_id.in_(conv_ids),
                (Hold.target_kind == "contact") & Hold.target_id.in_(set(contact_of.values())),
            ),
        )
    )
    for kind, target, hold_kind in direct:
        for c in conv_ids:
            if (kind == "conversation" and target == c) or (kind == "contact" and contact_of[c] == target):
                out[c].append(str(hold_kind))
    inner = await session.execute(
        select(Message.conversation_id, Hold.kind)
        .join(Message, (Message.id == Hold.target_id) & (Hold.target_kind == "message"))
        .where(Hold.org_id == org_id, Hold.released_at.is_(None), Message.conversation_id.in_(conv_ids))
    )
    for conv, hold_kind in inner:
        out[str(conv)].append(str(hold_kind))
    return out


async def _tags(session: AsyncSession, conv_ids: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    rows = await session.execute(
        select(ConversationTag.conversation_id, ConversationTag.tag).where(
            ConversationTag.conversation_id.in_(conv_ids)
        )
    )
    for conv, tag in rows:
        out.setdefault(str(conv), []).append(str(tag))
    return out


def _reference_time(row: Any) -> datetime:
    """Retention counts from the last activity, or from a withdrawal of consent if that came first."""
    clock = getattr(row, "retention_clock_at", None)
    return min(row.last_activity_at, clock) if clock is not None else row.last_activity_at  # type: ignore[no-any-return]


async def _judge(
    session: AsyncSession, org_id: str, policy: Policy, rows: list[Any], now: datetime
) -> list[DueItem]:
    tags = await _tags(session, [r.id for r in rows])
    holds = await _holds_by_conversation(session, org_id, rows)
    return [
        DueItem(
            org_id=org_id,
            conversation_id=r.id,
            contact_id=r.contact_id,
            last_activity_at=r.last_activity_at,
            decision=decide(
                policy,
                channel_id=r.channel_id,
                tags=tags.get(r.id, ()),
                last_activity_at=_reference_time(r),
                now=now,
            ),
            holds=holds.get(r.id, []),
        )
        for r in rows
    ]


async def _counts_by_conversation(session: AsyncSession, ids: list[str]) -> dict[str, dict[str, int]]:
    """Messages and attachments per conversation (for the tombstones), in two grouped queries."""
    out: dict[str, dict[str, int]] = {c: {"messages": 0, "attachments": 0} for c in ids}
    msgs = await session.execute(
        select(Message.conversation_id, func.count())
        .where(Message.conversation_id.in_(ids))
        .group_by(Message.conversation_id)
    )
    for conv, n in msgs:
        out[str(conv)]["messages"] = int(n)
    atts = await session.execute(
        select(Message.conversation_id, func.count())
        .join(Attachment, Attachment.message_id == Message.id)
        .where(Message.conversation_id.in_(ids))
        .group_by(Message.conversation_id)
    )
    for conv, n in atts:
        out[str(conv)]["attachments"] = int(n)
    return out


async def _erase_orphans(
    session: AsyncSession, er: Eraser, org_id: str, contact_ids: set[str], now: datetime
) -> int:
    """Erase the batch's contacts that have no conversation and no hold left: key and row go here."""
    if not contact_ids:
        return 0
    still = set(
        (
            await session.execute(
                select(Conversation.contact_id).where(Conversation.contact_id.in_(contact_ids))
            )
        ).scalars()
    )
    held = set(
        (
            await session.execute(
                select(Hold.target_id).where(
                    Hold.org_id == org_id,
                    Hold.released_at.is_(None),
                    Hold.target_kind == "contact",
                    Hold.target_id.in_(contact_ids),
                )
            )
        ).scalars()
    )
    orphans = sorted(contact_ids - still - held)
    if not orphans:
        return 0
    found = await session.execute(select(Contact.id, Contact.dek_id).where(Contact.id.in_(orphans)))
    deks = {str(cid): str(dek) for cid, dek in found}
    at = now.isoformat(timespec="seconds")
    er.ledger.append(
        [
            e
            for c in orphans
            for e in (Erasure("data_key", deks[c], org_id, at), Erasure("contact", c, org_id, at))
        ]
    )
    # Nothing of theirs is left (messages live in conversations), so key and row go together.
    await session.execute(delete(Contact).where(Contact.id.in_(orphans)))
    await session.execute(delete(DataKey).where(DataKey.id.in_(list(deks.values()))))
    await session.execute(
        table_of(Tombstone).insert(),
        [
            deletion.tombstone_row(
                org_id=org_id,
                kind="contact",
                object_id=c,
                reason="retention",
                actor=SYSTEM,
                now=now,
                details={"last_conversation_deleted": True},
            )
            for c in orphans
        ],
    )
    er.forget_keys(org_id, deks.values())
    return len(orphans)


async def _sweep_batch(
    db: Database,
    er: Eraser,
    org_id: str,
    policy: Policy,
    cutoff: datetime,
    cursor: tuple[datetime, str],
    now: datetime,
    batch: int,
    actor: Actor,
    report: SweepReport,
    by_clock: bool = False,
) -> tuple[datetime, str] | None:
    """One transaction: decide a batch of candidates and delete the due ones. Returns the next cursor."""
    async with db.transaction() as session:
        await _lock_org(session, org_id)
        rows = await _candidates(session, org_id, cutoff, cursor, batch, by_clock=by_clock)
        if not rows:
            return None
        next_cursor = (rows[-1].ref, rows[-1].id)
        if dialect_of(session) == "postgresql":  # SQLite: _lock_org holds the write lock already
            await contacts.lock(session, {r.contact_id for r in rows})
            rows = await _candidates(
                session, org_id, cutoff, cursor, batch, by_clock=by_clock, locked=[r.id for r in rows]
            )
        items = await _judge(session, org_id, policy, rows, now)
        going = [i for i in items if i.goes]
        report.kept_on_hold += sum(1 for i in items if i.decision.due and i.holds)
        report.batches += 1
        if going:
            at = now.isoformat(timespec="seconds")
            er.ledger.append([Erasure("conversation", i.conversation_id, org_id, at) for i in going])
            ids = [i.conversation_id for i in going]
            per_conv = await _counts_by_conversation(session, ids)
            counts = await deletion._drop_conversation_rows(session, er, ids)
            tomb_rows = [
                deletion.tombstone_row(
                    org_id=org_id,
                    kind="conversation",
                    object_id=i.conversation_id,
                    reason="retention",
                    actor=actor,
                    now=now,
                    details={
                        "contact_id": i.contact_id,
                        "rule": i.decision.source,
                        "days": i.decision.days,
                        **per_conv.get(i.conversation_id, {"messages": 0, "attachments": 0}),
                    },
                )
                for i in going
            ]
            await session.execute(table_of(Tombstone).insert(), tomb_rows)
            erased = await _erase_orphans(session, er, org_id, {i.contact_id for i in going}, now)
            report.conversations += len(going)
            report.messages += counts["messages"]
            report.attachments += counts["attachments"]
            report.contacts_erased += erased
            await audit.record(
                session,
                org_id=org_id,
                actor=actor,
                action="retention.sweep",
                now=now,
                details={
                    "conversations": [i.conversation_id for i in going],
                    "messages": counts["messages"],
                    "attachments": counts["attachments"],
                    "contacts_erased": erased,
                },
            )
        return next_cursor


async def plan(session: AsyncSession, org_id: str, now: datetime, limit: int = 10_000) -> list[DueItem]:
    """Dry run: every conversation past its retention, with the rule and any hold that keeps it."""
    policy = await load_policy(session, org_id)
    shortest = policy.shortest_days()
    if not policy.enabled or shortest is None:
        return []
    rows: list[Any] = []
    cursor = (EPOCH, "")
    while len(rows) < limit:
        q = (
            select(
                Conversation.id,
                Conversation.contact_id,
                Conversation.channel_id,
                Conversation.last_activity_at,
            )
            .join(Contact, Contact.id == Conversation.contact_id)
            .where(
                Conversation.org_id == org_id,
                Conversation.last_activity_at < now - timedelta(days=shortest),
                Contact.erased_at.is_(None),
                tuple_(Conversation.last_activity_at, Conversation.id)
                > tuple_(literal(cursor[0]), literal(cursor[1])),
            )
            .order_by(Conversation.last_activity_at, Conversation.id)
            .limit(1000)
        )
        got = list((await session.execute(q)).all())
        if not got:
            break
        rows.extend(got)
        cursor = (got[-1].last_activity_at, got[-1].id)
    items = []
    for i in range(0, len(rows), 500):
        items.extend(await _judge(session, org_id, policy, rows[i : i + 500], now))
    return [i for i in items if i.decision.due]


async def sweep_org(
    db: Database,
    er: Eraser,
    org_id: str,
    now: datetime,
    *,
    batch: int = 200,
    actor: Actor = SYSTEM,
    report: SweepReport | None = None,
) -> SweepReport:
    """Delete every due conversation of one organisation, batch by batch."""
    report = report or SweepReport()
    async with db.transaction() as session:
        policy = await load_policy(session, org_id)
    shortest = policy.shortest_days()
    if not policy.enabled or shortest is None:
        return report
    cutoff = now - timedelta(days=shortest)
    for by_clock in (False, True):
        cursor: tuple[datetime, str] | None = (EPOCH, "")
        while cursor is not None:
            cursor = await _sweep_batch(
                db, er, org_id, policy, cutoff, cursor, now, batch, actor, report, by_clock=by_clock
            )
    return report


async def purge_erased(db: Database, er: Eraser, *, report: SweepReport, max_steps: int = 1_000_000) -> None:
    """Physically remove the rows and files of contacts whose key is already destroyed."""
    steps = 0
    while steps < max_steps:
        async with db.transaction() as session:
            pending = await deletion.erased_contacts(session, limit=1)
        if not pending:
            return
        finished = False
        while not finished and steps < max_steps:
            async with db.transaction() as session:
                finished, _ = await deletion.purge_erased_step(session, er, pending[0])
            steps += 1
        if finished:
            report.contacts_purged += 1


def _metadata_days(org: Organisation, name: str) -> int:
    return int(dict(orgs.setting(org, "metadata_days")).get(name, 7))


async def _batched_update(db: Database, make: Any, limit: int = 5000) -> int:
    """Run a limited UPDATE/DELETE (built by ``make(limit)``) until it touches nothing."""
    total = 0
    while True:
        async with db.transaction() as session:
            n = int(getattr(await session.execute(make(limit)), "rowcount", 0) or 0)
        total += n
        if n < limit:
            return total


async def purge_metadata(db: Database, settings: Settings, now: datetime, report: SweepReport) -> None:
    """Drop each class of metadata past its own retention (II.3)."""
    async with db.transaction() as session:
        all_orgs = list((await session.execute(select(Organisation))).scalars())
    counts = report.metadata
    for org in all_orgs:
        cut = now - timedelta(days=_metadata_days(org, "delivery_timestamps"))

        def strip(limit: int, org_id: str = org.id, cut: datetime = cut) -> Any:
            ids = (
                select(Message.id)
                .where(
                    Message.org_id == org_id,
                    Message.created_at < cut,
                    or_(
                        Message.sent_at.is_not(None),
                        Message.delivered_at.is_not(None),
                        Message.read_at.is_not(None),
                        Message.failed_at.is_not(None),
                    ),
                )
                .limit(limit)
            )
            return (
                update(Message)
                .where(Message.id.in_(ids.scalar_subquery()))
                .values(sent_at=None, delivered_at=None, read_at=None, failed_at=None)
            )

        counts["delivery_timestamps"] = counts.get("delivery_timestamps", 0) + await _batched_update(
            db, strip
        )

        cut_jobs = now - timedelta(days=_metadata_days(org, "job_records"))

        def jobs(limit: int, org_id: str = org.id, cut: datetime = cut_jobs) -> Any:
            ids = (
                select(Job.id)
                .where(Job.org_id == org_id, Job.state.in_(("done", "failed")), Job.updated_at < cut)
                .limit(limit)
            )
            return delete(Job).where(Job.id.in_(ids.scalar_subquery()))

        counts["job_records"] = counts.get("job_records", 0) + await _batched_update(db, jobs)

    # Parked statuses belong to a channel, not yet to a message; the shortest org setting applies.
    hook_days = min((_metadata_days(o, "webhook_metadata") for o in all_orgs), default=7)

    def parked(limit: int) -> Any:
        ids = (
            select(PendingStatus.id)
            .where(PendingStatus.received_at < now - timedelta(days=hook_days))
            .limit(limit)
        )
        return delete(PendingStatus).where(PendingStatus.id.in_(ids.scalar_subquery()))

    counts["webhook_metadata"] = counts.get("webhook_metadata", 0) + await _batched_update(db, parked)

    def sessions(limit: int) -> Any:
        ids = (
            select(StaffSession.id)
            .where(
                StaffSession.created_at < now - timedelta(days=settings.session_metadata_days),
                or_(StaffSession.ip.is_not(None), StaffSession.user_agent.is_not(None)),
            )
            .limit(limit)
        )
        return (
            update(StaffSession)
            .where(StaffSession.id.in_(ids.scalar_subquery()))
            .values(ip=None, user_agent=None)
        )

    counts["session_network"] = counts.get("session_network", 0) + await _batched_update(db, sessions)

    def attempts(limit: int) -> Any:
        ids = (
            select(LoginAttempt.id)
            .where(LoginAttempt.at < now - timedelta(days=settings.failed_login_days))
            .limit(limit)
        )
        return delete(LoginAttempt).where(LoginAttempt.id.in_(ids.scalar_subquery()))

    counts["failed_logins"] = counts.get("failed_logins", 0) + await _batched_update(db, attempts)


async def run(
    db: Database,
    er: Eraser,
    settings: Settings,
    now: datetime,
    *,
    actor: Actor = SYSTEM,
    org_ids: list[str] | None = None,
) -> SweepReport:
    """A full sweep: due conversations of every organisation, erased contacts' rows, metadata."""
    report = SweepReport()
    if org_ids is None:
        async with db.transaction() as session:
            org_ids = [str(o) for o in (await session.execute(select(Organisation.id))).scalars()]
    for org_id in org_ids:
        await sweep_org(db, er, org_id, now, batch=settings.retention_batch, actor=actor, report=report)
    await purge_erased(db, er, report=report)
    await purge_metadata(db, settings, now, report)
    log.info("retention sweep finished", extra={"count": report.conversations})
    return report
