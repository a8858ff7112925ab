"""Inbound hot path: persist parsed webhook batches with group commit, then acknowledge.

Invariant (DESIGN 4, persist then acknowledge): a webhook request is answered 200 only after
everything it carried is committed. To reach thousands of updates per second, concurrent requests
are not given a transaction each: the ``IngestWriter`` collects what arrives within a few
milliseconds (``group_commit_window_ms``) and writes it in ONE transaction with Core bulk
statements; every waiting request is answered after that shared commit. If the transaction fails,
every request in the group gets the error (503) and the sender retries; the unique
``(channel_id, external_id)`` key makes the retry a no-op for what did get stored.

Steps inside the transaction, all set-based: resolve contacts by blind index (creating contact,
data key and conversation where new), insert messages with ON CONFLICT DO NOTHING (RETURNING tells
which were new), attachments and their download jobs, conversation counters, then statuses (merged
forward-only; statuses for a wamid not yet recorded are parked in ``pending_statuses``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BindParameter,
    Row,
    String,
    and_,
    bindparam,
    case,
    func,
    or_,
    select,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from pforte.audit import service as audit
from pforte.audit.service import SYSTEM
from pforte.channels.base import MEDIA_TYPES, InboundBatch, InboundMessage, StatusUpdate
from pforte.channels.service import ChannelRuntime
from pforte.clock import Clock
from pforte.contacts.models import Contact
from pforte.conversations import parts as parts_policy
from pforte.conversations import status as status_policy
from pforte.conversations.models import Attachment, Conversation, Message, PendingStatus
from pforte.crypto.blind_index import blind_index
from pforte.crypto.envelope import FieldCipher
from pforte.crypto.keys import KeyService
from pforte.crypto.models import DataKey
from pforte.db import Database, any_of, any_of_param, bulk_insert, new_id, table_of, take_write_lock
from pforte.errors import ServiceUnavailable
from pforte.events import EventBus, LiveEvent
from pforte.metrics import Metrics
from pforte.orgs.models import Organisation
from pforte.outbox.models import Job
from pforte.privacy import policy as privacy_policy
from pforte.privacy.models import PrivacyNotice
from pforte.privacy.service import org_privacy_from

log = logging.getLogger("pforte.ingest")

C = table_of(Contact)
CONV = table_of(Conversation)
M = table_of(Message)
A = table_of(Attachment)
PS = table_of(PendingStatus)
J = table_of(Job)
DK = table_of(DataKey)


@dataclass(slots=True)
class IngestResult:
    """What one submitted batch did."""

    accepted: int = 0
    duplicates: int = 0
    statuses_applied: int = 0
    statuses_pending: int = 0


@dataclass(slots=True)
class _Item:
    channel: ChannelRuntime
    batch: InboundBatch
    future: asyncio.Future[IngestResult]
    result: IngestResult = field(default_factory=IngestResult)


# The conversations touched by a group, in one statement. The CTE locks their rows in id order
# (the Sort is below the LockRows), the order every writer uses, so two writers never deadlock.
# FOR NO KEY UPDATE is the lock a plain UPDATE takes: it does not conflict with the KEY SHARE
# locks the messages INSERT's foreign key took on the same rows in another writer (FOR UPDATE
# does, and two writers then deadlocked; test_two_writers_on_the_same_conversations_never_deadlock).
_CONV_UPDATE_PG = """
WITH u AS (
  SELECT * FROM unnest($1::varchar[], $2::integer[], $3::timestamptz[], $4::varchar[]) AS u(id, n, ts, last)
), locked AS (
  SELECT c.id FROM conversations c JOIN u ON c.id = u.id ORDER BY c.id FOR NO KEY UPDATE OF c
)
UPDATE conversations c
   SET unread_count = c.unread_count + u.n,
       last_activity_at = $5,
       last_message_id = CASE WHEN c.last_inbound_at IS NULL OR c.last_inbound_at <= u.ts
                              THEN u.last ELSE c.last_message_id END,
       last_inbound_at = CASE WHEN c.last_inbound_at IS NULL OR c.last_inbound_at < u.ts
                              THEN u.ts ELSE c.last_inbound_at END
  FROM u JOIN locked ON locked.id = u.id
 WHERE c.id = u.id
"""


# The same, one statement per conversation on SQLite (executemany).
_CONV_UPDATE_SQLITE = (
    update(CONV)
    .where(CONV.c.id == bindparam("c_id"))
    .values(
        unread_count=CONV.c.unread_count + bindparam("c_n"),
        last_activity_at=bindparam("c_now"),
        last_message_id=case(
            (
                or_(CONV.c.last_inbound_at.is_(None), CONV.c.last_inbound_at <= bindparam("c_ts")),
                bindparam("c_last"),
            ),
            else_=CONV.c.last_message_id,
        ),
        last_inbound_at=case(
            (
                or_(CONV.c.last_inbound_at.is_(None), CONV.c.last_inbound_at < bindparam("c_ts")),
                bindparam("c_ts"),
            ),
            else_=CONV.c.last_inbound_at,
        ),
    )
)


def _contacts_by_index() -> dict[str, Any]:
    """The patients of ``:org_id`` with a BSUID index in ``:bsuid_ix`` or a phone index in
    ``:phone_ix``, in id order (locks are taken in id order everywhere), built once per dialect.

    PostgreSQL: the ids of each index's matches, as a UNION ALL of two look-ups, then the rows,
    locked FOR KEY SHARE. With ``bsuid_index IN (…) OR phone_index IN (…)`` PostgreSQL cannot
    use either index: it scanned every patient of the organisation per group (372 ms per group,
    127 updates/s, with 300,000 patients: ``bench/ingest_direct.py --other-patients 300000``).
    SQLite's planner answers the OR with both indexes itself; its lock is the write lock, taken
    by the caller.
    """
    cols = [
        C.c.id,
        C.c.dek_id,
        C.c.bsuid_index,
        C.c.phone_index,
        C.c.consent_state,
        C.c.notice_version_sent,
        C.c.created_at,
    ]
    org: BindParameter[str] = bindparam("org_id")
    pg, lite = "postgresql", "sqlite"
    by_bsuid = select(C.c.id).where(C.c.org_id == org, any_of_param(pg, C.c.bsuid_index, "bsuid_ix"))
    by_phone = select(C.c.id).where(C.c.org_id == org, any_of_param(pg, C.c.phone_index, "phone_ix"))
    return {
        pg: select(*cols)
        .where(C.c.id.in_(union_all(by_bsuid, by_phone)))
        .order_by(C.c.id)
        .with_for_update(read=True, key_share=True),
        lite: select(*cols)
        .where(
            C.c.org_id == org,
            or_(
                any_of_param(lite, C.c.bsuid_index, "bsuid_ix"),
                any_of_param(lite, C.c.phone_index, "phone_ix"),
            ),
        )
        .order_by(C.c.id),
    }


_CONTACTS_BY_INDEX = _contacts_by_index()

# Conversations by contact and channel lists.
_CONVERSATIONS_BY_PAIR = {
    d: select(CONV.c.id, CONV.c.channel_id, CONV.c.contact_id).where(
        any_of_param(d, CONV.c.contact_id, "contact_ids"), any_of_param(d, CONV.c.channel_id, "channel_ids")
    )
    for d in ("postgresql", "sqlite")
}


@dataclass(slots=True)
class _Txn:
    """What one group's transaction gathers on its way; kept off the shared Ingestor."""

    now: datetime
    dialect: str
    events: set[tuple[str, str]] = field(default_factory=set)
    privacy_state: dict[str, tuple[str, int | None]] = field(default_factory=dict)  # contact -> state
    conv_updates: dict[str, dict[str, Any]] = field(default_factory=dict)  # conversation -> counters


@dataclass(slots=True)
class _OrgKeys:
    index_key: bytes  # rotation re-wraps, the plaintext stays; the KEK id is deliberately not cached


class Ingestor:
    """Writes a group of batches in one transaction (no commit here: the writer owns it)."""

    def __init__(self, *, keys: KeyService, clock: Clock, audit_receipts: bool = True) -> None:
        self.keys = keys
        self.clock = clock
        self.audit_receipts = audit_receipts
        self._org_keys: dict[str, _OrgKeys] = {}

    async def _org(self, conn: AsyncConnection, org_id: str) -> _OrgKeys:
        hit = self._org_keys.get(org_id)
        if hit:
            return hit
        row = (await conn.execute(select(Organisation.index_key_id).where(Organisation.id == org_id))).one()
        key = await self.keys.raw_key(conn, row.index_key_id)  # type: ignore[arg-type]
        hit = _OrgKeys(index_key=key)
        self._org_keys[org_id] = hit
        return hit

    async def _kek_id(self, conn: AsyncConnection, org_id: str, *, lock: bool = False) -> str:
        """The organisation's current KEK, read in this transaction (see crypto/rotation.py)."""
        q = select(Organisation.kek_id).where(Organisation.id == org_id)
        return str((await conn.execute(q.with_for_update(read=True) if lock else q)).scalar_one())

    async def _fence_kek(
        self, conn: AsyncConnection, org_id: str, used: str, plain: dict[str, bytes]
    ) -> None:
        """Keys just inserted end up under the KEK that is current when this transaction commits.

        Runs after the insert: this transaction then holds the organisation row FOR SHARE
        (PostgreSQL) or the write lock (SQLite), so a rotation cannot switch the KEK until it ends;
        if the switch committed before, the new keys are re-wrapped under the new KEK here.
        """
        current = await self._kek_id(conn, org_id, lock=True)
        if current != used:
            await conn.execute(
                update(DK)
                .where(DK.c.id == bindparam("k_id"))
                .values(kek_id=current, wrapped=bindparam("k_wrapped")),
                [{"k_id": i, "k_wrapped": self.keys.wrap(kek_id=current, key=k)} for i, k in plain.items()],
            )

    async def write(self, conn: AsyncConnection, items: list[_Item]) -> list[LiveEvent]:
        """Persist every item's messages and statuses; return the live events to publish."""
        tx = _Txn(now=self.clock.now(), dialect=conn.dialect.name)
        for it in items:
            it.result = IngestResult()  # a retried group starts counting afresh
        # Messages first: contacts -> conversations -> rows.
        by_org: dict[str, list[tuple[_Item, InboundMessage]]] = defaultdict(list)
        for it in items:
            for m in it.batch.messages:
                by_org[it.channel.org_id].append((it, m))
        for org_id, pairs in by_org.items():
            await self._write_messages(conn, tx, org_id, pairs)
        statuses = [(it, s) for it in items for s in it.batch.statuses]
        if statuses:
            await self._write_statuses(conn, tx.dialect, statuses, tx.now, tx.events)
        # Row locks that other writers wait for come last, so each is held only until the commit:
        # the conversations' counters (in id order), then the audit chain's head.
        await self._update_conversations(conn, tx)
        if self.audit_receipts:
            await self._audit_receipts(conn, items, tx.now)
        return [LiveEvent(org_id=o, type="conversation", conversation_id=c) for o, c in sorted(tx.events)]

    async def _audit_receipts(self, conn: AsyncConnection, items: list[_Item], now: datetime) -> None:
        """One audit entry per organisation for what this transaction stored (DSK II.2: what arrived
        and when, as counts; the messages themselves carry their own hashes). Last in the
        transaction, so the chain's head stays locked only for the commit."""
        per_org: dict[str, dict[str, Any]] = {}
        for it in items:
            r = it.result
            if not (r.accepted or r.statuses_applied or r.statuses_pending):
                continue
            acc = per_org.setdefault(
                it.channel.org_id,
                {"channels": set(), "messages": 0, "duplicates": 0, "statuses": 0, "statuses_pending": 0},
            )
            acc["channels"].add(it.channel.id)
            acc["messages"] += r.accepted
            acc["duplicates"] += r.duplicates
            acc["statuses"] += r.statuses_applied
            acc["statuses_pending"] += r.statuses_pending
        for org_id in sorted(per_org):
            details = per_org[org_id]
            details["channels"] = sorted(details["channels"])
            await audit.record(
                conn, org_id=org_id, actor=SYSTEM, action="webhook.received", now=now, details=details
            )

    async def _resolve_contacts(
        self,
        conn: AsyncConnection,
        tx: _Txn,
        org_id: str,
        msgs: list[InboundMessage],
        *,
        locked: bool = False,
    ) -> dict[str, tuple[str, str]]:
        """Map sender key -> (contact id, dek id), creating contacts where new.

        Creating contacts is serialised per organisation on PostgreSQL (a transaction-scoped
        advisory lock, then a second look): writers of other groups or processes may meet the same
        new patient, and a patient known only by phone number has no unique key to collide on.

        The patients found are read-locked (``FOR KEY SHARE``, the weakest lock; SQLite's write
        lock) until the commit: an erasure or retention deleting one of them either finished
        before (the erased patient is no longer found, and the message makes a new one) or waits
        for this transaction and then takes its messages along (contacts.service.lock).
        """
        dialect, now = tx.dialect, tx.now
        ok = await self._org(conn, org_id)
        senders = {m.sender.key: m.sender for m in msgs}
        bsuid_ix = {k: blind_index(ok.index_key, "bsuid", s.user_id) for k, s in senders.items() if s.user_id}
        phone_ix = {k: blind_index(ok.index_key, "phone", s.wa_id) for k, s in senders.items() if s.wa_id}
        found: dict[str, tuple[str, str]] = {}
        if not (bsuid_ix or phone_ix):
            return found
        if dialect == "sqlite":
            await take_write_lock(conn)  # as read_locked does; PostgreSQL's statement locks its rows
        params = {
            "org_id": org_id,
            "bsuid_ix": list(set(bsuid_ix.values())),
            "phone_ix": list(set(phone_ix.values())),
        }
        rows = sorted(
            (await conn.execute(_CONTACTS_BY_INDEX[dialect], params)).all(), key=lambda r: r.created_at
        )
        by_bsuid = {r.bsuid_index: r for r in rows if r.bsuid_index}
        by_phone: dict[str, Any] = {}
        for row in rows:
            if row.phone_index:
                by_phone[row.phone_index] = row  # the newest contact with that phone wins
        adopt: list[dict[str, Any]] = []
        new_contacts: list[dict[str, Any]] = []
        new_keys: list[dict[str, Any]] = []
        kek_id = ""
        plain: dict[str, bytes] = {}
        for k, s in senders.items():
            bi, pi = bsuid_ix.get(k), phone_ix.get(k)
            r = by_bsuid.get(bi) if bi else None
            if r is None and pi and pi in by_phone:
                cand = by_phone[pi]
                if cand.bsuid_index is None or bi is None:
                    r = cand
                    if bi and cand.bsuid_index is None:
                        adopt.append(
                            {"b_id": cand.id, "b_index": bi, "b_dek": cand.dek_id, "b_user": s.user_id}
                        )
            if r is not None:
                found[k] = (r.id, r.dek_id)
                tx.privacy_state[r.id] = (r.consent_state, r.notice_version_sent)
                continue
            if dialect == "postgresql" and not locked:
                await conn.execute(
                    select(func.pg_advisory_xact_lock(func.hashtext("pforte.contacts:" + org_id)))
                )
                return await self._resolve_contacts(conn, tx, org_id, msgs, locked=True)
            kek_id = kek_id or await self._kek_id(conn, org_id)
            key_row, key = self.keys.new_data_key(org_id=org_id, kek_id=kek_id, purpose="contact", now=now)
            plain[key_row["id"]] = key
            cipher = FieldCipher(key)
            cid = new_id()
            new_keys.append(key_row)
            new_contacts.append(
                {
                    "id": cid,
                    "org_id": org_id,
                    "dek_id": key_row["id"],
                    "bsuid_index": bi,
                    "phone_index": pi,
                    "bsuid_enc": cipher.seal_text(s.user_id, "contacts", "bsuid", cid),
                    "phone_enc": cipher.seal_text(s.wa_id, "contacts", "phone", cid),
                    "name_enc": None,
                    "profile_name_enc": cipher.seal_text(s.profile_name, "contacts", "profile_name", cid),
                    "username_enc": cipher.seal_text(s.username, "contacts", "username", cid),
                    "created_at": now,
                    "updated_at": now,
                }
            )
            found[k] = (cid, key_row["id"])
            tx.privacy_state[cid] = ("none", None)
        if adopt:
            ciphers = await self.keys.ciphers(conn, {a["b_dek"] for a in adopt})
            for a in adopt:
                a["b_enc"] = ciphers[a["b_dek"]].seal_text(a["b_user"], "contacts", "bsuid", a["b_id"])
            await conn.execute(
                update(C)
                .where(C.c.id == bindparam("b_id"))
                .values(bsuid_index=bindparam("b_index"), bsuid_enc=bindparam("b_enc")),
                [{k: v for k, v in a.items() if k in ("b_id", "b_index", "b_enc")} for a in adopt],
            )
        if new_contacts:
            await bulk_insert(conn, DK, new_keys)
            await self._fence_kek(conn, org_id, kek_id, plain)
            inserted = set(
                await bulk_insert(conn, C, new_contacts, conflict=("org_id", "bsuid_index"), returning="id")
            )
            lost = [c for c in new_contacts if c["id"] not in inserted]
            if lost:  # another process created the same BSUID contact meanwhile: use theirs
                winners = await conn.execute(
                    select(C.c.id, C.c.dek_id, C.c.bsuid_index).where(
                        C.c.org_id == org_id,
                        any_of(dialect, C.c.bsuid_index, [c["bsuid_index"] for c in lost]),
                    )
                )
                theirs = {r.bsuid_index: (r.id, r.dek_id) for r in winners}
                for k, bi in bsuid_ix.items():
                    if bi in theirs and found[k][0] not in inserted:
                        found[k] = theirs[bi]
        return found

    async def _resolve_conversations(
        self, conn: AsyncConnection, dialect: str, org_id: str, pairs: set[tuple[str, str]], now: datetime
    ) -> dict[tuple[str, str], str]:
        """Map (channel id, contact id) -> conversation id, creating where new."""
        # Contacts and channels each as one list (see any_of); the few extra pairs are dropped here.
        q = _CONVERSATIONS_BY_PAIR[dialect]
        params = {"contact_ids": list({ct for _, ct in pairs}), "channel_ids": list({ch for ch, _ in pairs})}

        async def lookup() -> dict[tuple[str, str], str]:
            rows = await conn.execute(q, params)
            return {(ch, ct): cid for cid, ch, ct in rows if (ch, ct) in pairs}

        found = await lookup()
        missing = [p for p in pairs if p not in found]
        if missing:
            rows = [
                {
                    "id": new_id(),
                    "org_id": org_id,
                    "channel_id": ch,
                    "contact_id": ct,
                    "status": "open",
                    "unread_count": 0,
                    "last_activity_at": now,
                    "last_inbound_at": None,
                    "last_message_id": None,
                    "created_at": now,
                }
                for ch, ct in missing
            ]
            await bulk_insert(conn, CONV, rows, conflict=("channel_id", "contact_id"))
            found.update(await lookup())
        return found

    async def _write_messages(
        self, conn: AsyncConnection, tx: _Txn, org_id: str, pairs: list[tuple[_Item, InboundMessage]]
    ) -> None:
        dialect, now = tx.dialect, tx.now
        # Drop in-batch duplicates and ones already stored before touching contacts.
        seen: set[tuple[str, str]] = set()
        fresh: list[tuple[_Item, InboundMessage]] = []
        for it, m in pairs:
            key = (it.channel.id, m.external_id)
            if key in seen:
                it.result.duplicates += 1
                continue
            seen.add(key)
            fresh.append((it, m))
        existing: set[tuple[str, str]] = set()
        by_channel: dict[str, list[str]] = defaultdict(list)
        for it, m in fresh:
            by_channel[it.channel.id].append(m.external_id)
        for ch_id, ext_ids in by_channel.items():
            stored = await _messages_by_wamid(conn, _STORED_WAMIDS, ch_id, ext_ids)
            existing.update((ch_id, r.external_id) for r in stored)
        todo = []
        for it, m in fresh:
            if (it.channel.id, m.external_id) in existing:
                it.result.duplicates += 1
            else:
                todo.append((it, m))
        if not todo:
            return
        contacts = await self._resolve_contacts(conn, tx, org_id, [m for _, m in todo])
        convs = await self._resolve_conversations(
            conn, dialect, org_id, {(it.channel.id, contacts[m.sender.key][0]) for it, m in todo}, now
        )
        ciphers = await self.keys.ciphers(conn, {dek for _, dek in contacts.values()})
        rows: list[dict[str, Any]] = []
        owners: dict[str, Any] = {}
        for it, m in todo:
            contact_id, dek_id = contacts[m.sender.key]
            cipher = ciphers[dek_id]
            mid = new_id()
            details = dict(m.details)
            if m.frequently_forwarded:
                details["frequently_forwarded"] = True
            if m.errors:
                details["errors"] = [{"code": e.code, "title": e.title} for e in m.errors]
            digest = parts_policy.content_hash(
                direction="in",
                type_=m.type,
                body=m.text,
                details=details,
                media=[(m.media.sha256, m.media.filename)] if m.media and m.type in MEDIA_TYPES else (),
            )
            rows.append(
                {
                    "id": mid,
                    "org_id": org_id,
                    "conversation_id": convs[(it.channel.id, contact_id)],
                    "channel_id": it.channel.id,
                    "contact_id": contact_id,
                    "direction": "in",
                    "type": m.type,
                    "external_id": m.external_id,
                    "status": "received",
                    "body_enc": cipher.seal_text(m.text, "messages", "body", mid),
                    "details_enc": cipher.seal_text(json.dumps(details), "messages", "details", mid)
                    if details
                    else None,
                    "raw_enc": cipher.seal_text(json.dumps(m.raw), "messages", "raw", mid) if m.raw else None,
                    "context_external_id": m.context_id,
                    "forwarded": m.forwarded or m.frequently_forwarded,
                    "sender_user_id": None,
                    "template_name": None,
                    "error_code": m.errors[0].code if m.errors else None,
                    "error_reason": None,
                    "error_title": None,
                    "review_reason": None,
                    "provider_ts": m.timestamp,
                    "created_at": now,
                    "sent_at": None,
                    "delivered_at": None,
                    "read_at": None,
                    "failed_at": None,
                    "content_hash_enc": cipher.seal_text(digest, "messages", "content_hash", mid),
                }
            )
            owners[mid] = (it, m, cipher, contact_id)
        inserted = set(
            await bulk_insert(conn, M, rows, conflict=("channel_id", "external_id"), returning="id")
        )
        attachments, jobs = [], []
        for row in rows:
            it, m, cipher, contact_id = owners[row["id"]]
            if row["id"] not in inserted:
                it.result.duplicates += 1  # a concurrent writer stored it first
                continue
            it.result.accepted += 1
            cu = tx.conv_updates.setdefault(
                row["conversation_id"], {"n": 0, "ts": m.timestamp, "last": row["id"]}
            )
            cu["n"] += 1
            if m.timestamp >= cu["ts"]:
                cu["ts"], cu["last"] = m.timestamp, row["id"]
            tx.events.add((org_id, row["conversation_id"]))
            if m.media and m.type in MEDIA_TYPES:
                aid = new_id()
                attachments.append(
                    {
                        "id": aid,
                        "org_id": org_id,
                        "message_id": row["id"],
                        "contact_id": contact_id,
                        "kind": m.type,
                        "media_id": m.media.media_id,
                        "mime_type": m.media.mime_type,
                        "expected_sha256": m.media.sha256,
                        "filename_enc": cipher.seal_text(m.media.filename, "attachments", "filename", aid),
                        "size": None,
                        "state": "pending",
                        "error_reason": None,
                        "attempts": 0,
                        "blob_name": None,
                        "created_at": now,
                    }
                )
                jobs.append(_job_row(org_id, "download_media", it.channel.id, {"attachment_id": aid}, now))
        jobs += await self._privacy_jobs(conn, tx, org_id, rows, inserted, owners)
        await bulk_insert(conn, A, attachments)
        await bulk_insert(conn, J, jobs)

    async def _update_conversations(self, conn: AsyncConnection, tx: _Txn) -> None:
        """Unread count, last activity, last message and last inbound time of every conversation
        that got new messages, rows locked in id order (the same in every writer). A message older
        than the conversation's last inbound one (a late re-delivery) moves neither.

        PostgreSQL: one set-based statement (``_CONV_UPDATE_PG``); run once per conversation, as
        an executemany, it took about 30 ms per group of 600 messages (450 conversations).
        SQLite: one statement per conversation, which costs little in process."""
        if not tx.conv_updates:
            return
        ordered = sorted(tx.conv_updates.items())
        if tx.dialect == "postgresql":
            await conn.exec_driver_sql(
                _CONV_UPDATE_PG,
                (
                    [cid for cid, _ in ordered],
                    [v["n"] for _, v in ordered],
                    [v["ts"] for _, v in ordered],
                    [v["last"] for _, v in ordered],
                    tx.now,
                ),
            )
            return
        await conn.execute(
            _CONV_UPDATE_SQLITE,
            [
                {"c_id": cid, "c_n": v["n"], "c_ts": v["ts"], "c_last": v["last"], "c_now": tx.now}
                for cid, v in ordered
            ],
        )

    async def _privacy_jobs(
        self,
        conn: AsyncConnection,
        tx: _Txn,
        org_id: str,
        rows: list[dict[str, Any]],
        inserted: set[str],
        owners: dict[str, Any],
    ) -> list[dict[str, Any]]:
        """One ``privacy_reply`` job per conversation whose new messages may need a privacy answer."""
        org_row = (await conn.execute(_ORG_PRIVACY, {"org_id": org_id})).one()
        cfg = org_privacy_from(org_row.settings, org_row.notice_version)
        wanted: dict[str, list[str]] = defaultdict(list)
        channel_of: dict[str, str] = {}
        for row in rows:
            if row["id"] not in inserted:
                continue
            _, m, _, contact_id = owners[row["id"]]
            consent, notice_sent = tx.privacy_state.get(contact_id, ("none", None))
            if privacy_policy.may_concern_privacy(
                text=m.text, type_=m.type, org=cfg, consent_state=consent, notice_version_sent=notice_sent
            ):
                wanted[row["conversation_id"]].append(row["id"])
                channel_of[row["conversation_id"]] = row["channel_id"]
        return [
            _job_row(
                org_id,
                "privacy_reply",
                channel_of[conv_id],
                {"conversation_id": conv_id, "message_ids": ids},
                tx.now,
            )
            for conv_id, ids in sorted(wanted.items())
        ]

    async def _write_statuses(
        self,
        conn: AsyncConnection,
        dialect: str,
        statuses: list[tuple[_Item, StatusUpdate]],
        now: datetime,
        events: set[tuple[str, str]],
    ) -> None:
        wanted: dict[str, set[str]] = defaultdict(set)
        for it, s in statuses:
            wanted[it.channel.id].add(s.external_id)
        current: dict[tuple[str, str], dict[str, Any]] = {}
        for ch_id, ext_ids in wanted.items():
            rows = await _messages_by_wamid(conn, _SENT_STATES, ch_id, ext_ids)
            for r in rows:
                current[(ch_id, r.external_id)] = dict(r._mapping)
        changed: dict[str, dict[str, Any]] = {}
        pending = []
        for it, s in sorted(statuses, key=lambda p: p[1].timestamp):
            cur = current.get((it.channel.id, s.external_id))
            err = s.errors[0] if s.errors else None
            if cur is None:
                pending.append(
                    {
                        "id": new_id(),
                        "channel_id": it.channel.id,
                        "external_id": s.external_id,
                        "status": s.status[:16],
                        "provider_ts": s.timestamp,
                        "error_code": err.code if err else None,
                        "error_title": err.title[:300] if err else None,
                        "received_at": now,
                        "details": None,
                    }
                )
                it.result.statuses_pending += 1
                continue
            state = status_policy.MessageState(
                status=cur["status"],
                sent_at=cur["sent_at"],
                delivered_at=cur["delivered_at"],
                read_at=cur["read_at"],
                failed_at=cur["failed_at"],
            )
            delta = status_policy.merge(state, s.status, s.timestamp, err.code if err else None)
            it.result.statuses_applied += 1
            if not delta:
                continue
            if err and "error_code" in delta:
                delta["error_title"] = err.title[:300]
            cur.update(delta)
            changed.setdefault(cur["id"], {}).update(delta)
            events.add((cur["org_id"], cur["conversation_id"]))
        await bulk_insert(conn, PS, pending, conflict=("channel_id", "external_id", "status"))
        await apply_changes(conn, changed)


_STATUS_COLS = (
    "status",
    "sent_at",
    "delivered_at",
    "read_at",
    "failed_at",
    "error_code",
    "error_reason",
    "error_title",
)
_TIMESTAMPS = ("sent_at", "delivered_at", "read_at", "failed_at")
_FAILABLE = ("queued", "sending", "accepted", "sent")  # states "failed" may still end
_RANK = case(status_policy.STATUS_RANK, value=M.c.status, else_=-1)


# The organisation's privacy settings and newest notice, read once per group (built once, like
# the statements of ``_messages_by_wamid``).
_ORG_PRIVACY = select(
    Organisation.settings,
    select(func.max(PrivacyNotice.version))
    .where(PrivacyNotice.org_id == bindparam("org_id"))
    .scalar_subquery()
    .label("notice_version"),
).where(Organisation.id == bindparam("org_id"))


def _by_wamid(cols: list[Any], *where: Any) -> dict[str, Any]:
    """The statement of ``_messages_by_wamid`` for each dialect, built once: ``cols`` of the
    messages of channel ``:channel_id`` whose provider id is in ``:wamids``, narrowed by ``where``.

    On PostgreSQL the ids are unnested and each is joined to a LATERAL subquery with LIMIT 1, a plan
    shape the planner must run as a loop of index look-ups. With a semi-join (``db.any_of``) it
    may instead scan all of the channel's messages once per group when the table's statistics
    are stale (a new table filling fast, as in every benchmark): status ingest fell to
    700–810 statuses/s from 3,100/s that way, while the scan grew with the table.
    """
    q = select(*cols).where(M.c.channel_id == bindparam("channel_id"), *where)
    ids = bindparam("wamids", type_=postgresql.ARRAY(String()))
    u = func.unnest(ids).table_valued("wamid").render_derived(name="u")
    one = q.where(M.c.external_id == u.c.wamid).limit(1).lateral("m")
    return {
        "postgresql": select(one).select_from(u).join(one, true()),
        "sqlite": q.where(M.c.external_id.in_(bindparam("wamids", expanding=True))),
    }


_STORED_WAMIDS = _by_wamid([M.c.external_id])  # the dedupe
_SENT_STATES = _by_wamid(  # what a status may change, of our own messages only
    [
        M.c.id,
        M.c.org_id,
        M.c.conversation_id,
        M.c.external_id,
        M.c.status,
        M.c.sent_at,
        M.c.delivered_at,
        M.c.read_at,
        M.c.failed_at,
    ],
    M.c.direction == "out",
)


async def _messages_by_wamid(
    conn: AsyncConnection, stmts: dict[str, Any], channel_id: str, wamids: Iterable[str]
) -> Sequence[Row[Any]]:
    """Messages of one channel by the provider's id (``stmts`` from ``_by_wamid``), one look-up in
    the unique ``(channel_id, external_id)`` index per id.

    The statements are built once and only executed with new parameters: building them and
    computing their cache keys cost about 3 % of the CPU of one webhook per POST
    (docs/performance.md, "Statements built once").
    """
    stmt = stmts[conn.dialect.name]
    return (await conn.execute(stmt, {"channel_id": channel_id, "wamids": list(wamids)})).all()


def _job_row(
    org_id: str, kind: str, channel_id: str, payload: dict[str, Any], now: datetime
) -> dict[str, Any]:
    """A queued outbox job as a row for a bulk insert in the ingest's transaction."""
    return {
        "id": new_id(),
        "org_id": org_id,
        "kind": kind,
        "channel_id": channel_id,
        "payload": payload,
        "state": "queued",
        "attempts": 0,
        "run_after": now,
        "locked_by": None,
        "locked_until": None,
        "started_at": None,
        "last_error": None,
        "created_at": now,
        "updated_at": now,
    }


def _guarded(col: str, failing: bool) -> Any:
    """The SET expression of one column, guarded against the row's CURRENT state.

    Two transactions may merge statuses of the same message concurrently, each from what it read.
    The guard makes the UPDATE itself monotonic: timestamps are only filled, never replaced; the
    status only rises in rank; "failed" only ends a message that was not delivered yet. (In an
    UPDATE every right-hand side sees the row as it was, on SQLite and PostgreSQL alike.)
    """
    value: Any = bindparam(f"v_{col}")
    if failing:
        return case((M.c.status.in_(_FAILABLE), value), else_=M.c[col])
    if col in _TIMESTAMPS:
        return func.coalesce(M.c[col], value)
    if col == "status":
        return case((and_(M.c.status != "failed", _RANK < bindparam("v_rank")), value), else_=M.c.status)
    return value


async def apply_changes(conn: AsyncConnection, changed: dict[str, dict[str, Any]]) -> None:
    """Write merged delivery-state changes with SQL guards, grouped by the columns they touch."""
    groups: dict[tuple[tuple[str, ...], bool], list[dict[str, Any]]] = defaultdict(list)
    for mid, delta in sorted(changed.items()):
        failing = delta.get("status") == "failed"
        cols = tuple(c for c in _STATUS_COLS if c in delta)
        params = {"m_id": mid, **{f"v_{c}": delta[c] for c in cols}}
        if "status" in delta and not failing:
            params["v_rank"] = status_policy.STATUS_RANK[delta["status"]]
        groups[(cols, failing)].append(params)
    for key, group in groups.items():
        await conn.execute(_status_update(*key), group)


@functools.cache
def _status_update(cols: tuple[str, ...], failing: bool) -> Any:
    """The guarded UPDATE of these columns, built once per combination (subsets of the eight
    columns a status can set, a handful in practice), so that SQLAlchemy neither builds it nor
    computes its cache key again for every group."""
    return update(M).where(M.c.id == bindparam("m_id")).values({c: _guarded(c, failing) for c in cols})


async def apply_pending_statuses(
    conn: AsyncConnection,
    *,
    channel_id: str,
    message_id: str,
    external_id: str,
    state: status_policy.MessageState,
) -> dict[str, Any]:
    """Apply statuses that arrived before the send's wamid was recorded; returns the final changes."""
    changes = await apply_pending_statuses_many(
        conn, channel_id=channel_id, sends={external_id: (message_id, state)}
    )
    return changes.get(message_id, {})


async def apply_pending_statuses_many(
    conn: AsyncConnection,
    *,
    channel_id: str,
    sends: dict[str, tuple[str, status_policy.MessageState]],
) -> dict[str, dict[str, Any]]:
    """``apply_pending_statuses`` for many just-recorded sends (wamid → message id, state) at once:
    one statement takes the parked statuses of all of them (usually none).

    They are taken with DELETE … RETURNING, never read first and deleted by wamid after: on
    PostgreSQL each statement sees what was committed before it began, so a status parked by
    another transaction between a SELECT and a later DELETE would have been deleted unread, and
    lost (a reply stayed "sent" after its "delivered" arrived). A status parked after this
    statement stays parked for ``reconcile_pending_statuses``.
    """
    if not sends:
        return {}
    taken = (
        await conn.execute(
            PS.delete()
            .where(PS.c.channel_id == channel_id, any_of(conn.dialect.name, PS.c.external_id, sends))
            .returning(PS.c.external_id, PS.c.status, PS.c.provider_ts, PS.c.error_code, PS.c.error_title)
        )
    ).all()
    if not taken:
        return {}
    rows = sorted(taken, key=lambda r: (r.provider_ts, status_policy.STATUS_RANK.get(r.status, -1)))
    changes: dict[str, dict[str, Any]] = {}
    states = {ext: state for ext, (_, state) in sends.items()}
    for r in rows:
        message_id, state = sends[r.external_id][0], states[r.external_id]
        delta = status_policy.merge(state, r.status, r.provider_ts, r.error_code)
        if delta:
            if "error_code" in delta:
                delta["error_title"] = r.error_title
            total = changes.setdefault(message_id, {})
            total.update(delta)
            states[r.external_id] = status_policy.MessageState(
                **{
                    k: total.get(k, getattr(state, k))
                    for k in ("status", "sent_at", "delivered_at", "read_at", "failed_at")
                }
            )
    if changes:
        await apply_changes(conn, changes)
    return changes


async def reconcile_pending_statuses(conn: AsyncConnection, *, limit: int = 500) -> int:
    """Apply parked statuses whose send has since been recorded.

    Closes the race where a status webhook is parked in the same instant as the send result commits
    (each transaction cannot see the other's rows). Runs periodically from the outbox worker, in
    the transaction that claimed the run, which on SQLite holds the one write lock.

    The parked statuses (few) are read first and each is looked up in ``messages`` by its unique
    key. Written as a plain join, SQLite's planner scanned all of ``messages`` instead (0.4–0.7 s
    at 1,000,000 messages, every 2 s, under the write lock; docs/performance.md, "The
    conversation page's slow tail"). A DISTINCT subquery is not flattened into the join, so
    both databases start from it.
    """
    parked = select(PS.c.channel_id, PS.c.external_id).distinct().subquery("parked")
    rows = (
        await conn.execute(
            select(
                parked.c.channel_id,
                parked.c.external_id,
                M.c.id,
                M.c.status,
                M.c.sent_at,
                M.c.delivered_at,
                M.c.read_at,
                M.c.failed_at,
            )
            .select_from(parked)
            .join(M, and_(M.c.channel_id == parked.c.channel_id, M.c.external_id == parked.c.external_id))
            .limit(limit)
        )
    ).all()
    for r in rows:
        await apply_pending_statuses(
            conn,
            channel_id=r.channel_id,
            message_id=r.id,
            external_id=r.external_id,
            state=status_policy.MessageState(
                status=r.status,
                sent_at=r.sent_at,
                delivered_at=r.delivered_at,
                read_at=r.read_at,
                failed_at=r.failed_at,
            ),
        )
    return len(rows)


class IngestWriter:
    """Group commit: writer tasks, one transaction per few-millisecond window each.

    On PostgreSQL ``writers`` tasks (two by default) take groups from one queue, so one group's
    statements run in the database while the next group is encrypted and built here; with one,
    the process waited on each in turn (docs/performance.md, "two groups in flight"). Their
    transactions meet as two processes' do (``serve --workers``): rows that both may lock
    (conversations, the audit head) are touched last and in one order (``Ingestor.write``), and
    new contacts are created under a lock (``Ingestor._resolve_contacts``). SQLite has one
    writer: its database takes one write transaction at a time.
    """

    def __init__(
        self,
        *,
        db: Database,
        ingestor: Ingestor,
        bus: EventBus,
        metrics: Metrics,
        window_ms: float,
        max_updates: int,
        writers: int = 1,
    ) -> None:
        self.db = db
        self.ingestor = ingestor
        self.bus = bus
        self.metrics = metrics
        self.window = window_ms / 1000.0
        self.max_updates = max_updates
        self.writers = writers if db.dialect == "postgresql" else 1
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.on_parked: Callable[[], None] | None = None  # called after statuses were parked

    async def start(self) -> None:
        """Start the writer tasks."""
        if not self._tasks:
            for n in range(self.writers):
                self._tasks.append(asyncio.create_task(self._run(), name=f"pforte-ingest-writer-{n}"))

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        if not self._tasks:
            return
        await self._queue.join()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks = []

    async def submit(self, channel: ChannelRuntime, batch: InboundBatch) -> IngestResult:
        """Queue a batch and wait until it is committed (or failed)."""
        if not self._tasks:
            raise ServiceUnavailable("ingest writer is not running")
        fut: asyncio.Future[IngestResult] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(channel=channel, batch=batch, future=fut))
        return await fut

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            group = [first]
            size = first.batch.size
            deadline = time.monotonic() + self.window
            while size < self.max_updates:
                timeout = deadline - time.monotonic()
                try:
                    item = (
                        self._queue.get_nowait()
                        if timeout <= 0
                        else await asyncio.wait_for(self._queue.get(), timeout)
                    )
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                group.append(item)
                size += item.batch.size
            try:
                await self._commit(group)
            finally:
                for _ in group:
                    self._queue.task_done()

    async def _commit(self, group: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            async with self.db.engine.begin() as conn:
                events = await self.ingestor.write(conn, group)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if len(group) > 1:  # isolate a poisonous batch: retry one by one
                for item in group:
                    await self._commit([item])
                return
            log.warning("ingest transaction failed", extra={"error": type(exc).__name__})
            err = ServiceUnavailable("database write failed")
            for item in group:
                if not item.future.done():
                    item.future.set_exception(err)
            return
        self.metrics.ingest_commit_seconds.observe(time.perf_counter() - started)
        self.metrics.ingest_group_size.observe(sum(i.batch.size for i in group))
        for item in group:
            r = item.result
            self.metrics.messages_received.inc(r.accepted)
            if not item.future.done():
                item.future.set_result(r)
        for ev in events:
            self.bus.publish(ev)
        if self.on_parked and any(i.result.statuses_pending for i in group):
            self.on_parked()
