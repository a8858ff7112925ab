"""Writing and checking the audit log.

Every state-changing action records its entry with :func:`record` on the caller's transaction, so
the entry exists exactly when the change does. Entries carry ids, action names and counts, never
message content, names or phone numbers.

Each organisation has its own chain (instance-wide acts such as backups use ``"instance"``). An
entry's hash covers the previous entry's hash and a canonical JSON encoding of the entry, so a
changed, removed, inserted or reordered row breaks the chain from that point on. Appending first
bumps the chain's head row (``UPDATE … RETURNING``): on PostgreSQL that row lock, on SQLite the
write lock, orders concurrent writers, so the chain never forks.

A database writer could still rewrite a whole chain and recompute every hash. Signed checkpoints
(``audit/checkpoints.py``) pin an organisation's head with its signing key; :func:`verify` checks
them along the way and names the first entry or checkpoint that does not fit (docs/audit.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, bindparam, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from pforte.audit.models import AuditEvent, AuditHead
from pforte.db import Executor, new_id, table_of, upsert_insert

GENESIS = "0" * 64
INSTANCE = "instance"


@dataclass(frozen=True)
class Actor:
    """Who acted: a staff user, the system (sweeper, jobs) or an operator at the command line."""

    kind: str
    id: str | None = None

    @classmethod
    def staff(cls, user_id: str) -> Actor:
        """A logged-in staff member."""
        return cls("staff", user_id)


SYSTEM = Actor("system")
CLI = Actor("cli")


def canonical(entry: dict[str, Any]) -> bytes:
    """The bytes an entry's hash covers (fixed key order, UTC ISO time, no whitespace)."""
    at = entry["at"]
    doc = {
        "chain": entry["chain"],
        "seq": entry["seq"],
        "at": at.astimezone(UTC).isoformat(timespec="microseconds") if isinstance(at, datetime) else at,
        "org_id": entry["org_id"],
        "actor_kind": entry["actor_kind"],
        "actor_id": entry["actor_id"],
        "action": entry["action"],
        "object_kind": entry["object_kind"],
        "object_id": entry["object_id"],
        "details": entry["details"],
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev_hash: str, entry: dict[str, Any]) -> str:
    """SHA-256 over the previous hash and the canonical entry."""
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical(entry)).hexdigest()


_HEADS = table_of(AuditHead)
_EVENTS = table_of(AuditEvent)
# Built once: every audited action (and every group of webhooks, for its receipts) runs these, and
# building them and their cache keys anew cost about 4 % of a webhook POST's CPU (one per POST).
_BUMP = (
    update(_HEADS)
    .where(_HEADS.c.chain == bindparam("b_chain"))
    .values(seq=_HEADS.c.seq + 1)
    .returning(_HEADS.c.seq, _HEADS.c.hash)
)
_APPEND = _EVENTS.insert()
_MOVE_HEAD = update(_HEADS).where(_HEADS.c.chain == bindparam("b_chain")).values(hash=bindparam("b_hash"))


async def _bump_head(db: Executor, chain: str) -> tuple[int, str]:
    """Take the next sequence number of a chain, locking its head until the transaction ends."""
    row = (await db.execute(_BUMP, {"b_chain": chain})).first()
    if row is None:
        dialect = db.dialect.name if isinstance(db, AsyncConnection) else db.get_bind().dialect.name
        ins = upsert_insert(dialect, _HEADS).values(chain=chain, seq=0, hash=GENESIS)
        await db.execute(ins.on_conflict_do_nothing(index_elements=["chain"]))
        row = (await db.execute(_BUMP, {"b_chain": chain})).first()
        assert row is not None
    return int(row[0]), str(row[1])


async def record(
    db: Executor,
    *,
    org_id: str | None,
    actor: Actor,
    action: str,
    now: datetime,
    object_kind: str | None = None,
    object_id: str | None = None,
    details: dict[str, Any] | None = None,
) -> str:
    """Append one entry on the caller's transaction; returns its hash."""
    chain = org_id or INSTANCE
    seq, prev = await _bump_head(db, chain)
    entry: dict[str, Any] = {
        "chain": chain,
        "seq": seq,
        "at": now,
        "org_id": org_id,
        "actor_kind": actor.kind,
        "actor_id": actor.id,
        "action": action,
        "object_kind": object_kind,
        "object_id": object_id,
        "details": details,
    }
    digest = chain_hash(prev, entry)
    await db.execute(_APPEND, {"id": new_id(), "prev_hash": prev, "hash": digest, **entry})
    await db.execute(_MOVE_HEAD, {"b_chain": chain, "b_hash": digest})
    return digest


# What a failed verification names; docs/audit.md explains each.
CHANGED = "changed"  # an entry's content or link was edited
REMOVED = "removed"  # an entry is missing from the chain (a gap, or the rest renumbered over it)
INSERTED = "inserted"  # an entry pforte did not write sits in the chain
REORDERED = "reordered"  # entries were moved to other positions
TRUNCATED = "truncated"  # the newest entries were cut off
CHECKPOINT = "checkpoint"  # a signed checkpoint no longer fits the chain, or its signature does not count
HEAD = "head"  # the chain's head record is missing


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of walking one chain and its signed checkpoints."""

    chain: str
    entries: int  # entries confirmed before the first fault (all of them when ok)
    ok: bool
    first_bad_seq: int | None = None
    problem: str | None = None  # one sentence for the operator: numbers, ids, times, never content
    kind: str | None = None  # CHANGED, REMOVED, INSERTED, REORDERED, TRUNCATED, CHECKPOINT or HEAD
    entry_id: str | None = None  # the offending row, where there is one (a removed entry has none)
    checkpoints_ok: int = 0  # checkpoints that held: signature counts, head hash matches
    signed_seq: int | None = None  # the newest entry such a checkpoint covers
    signed_at: datetime | None = None  # when that checkpoint was signed


@dataclass(frozen=True)
class Fault:
    """The first thing wrong with a chain."""

    seq: int
    kind: str
    problem: str
    entry_id: str | None = None


async def _walk(db: Executor, chain: str, batch: int = 5000) -> AsyncGenerator[dict[str, Any], None]:
    """Every entry of a chain in sequence order (ties by id), one window of ``batch`` numbers per query.

    Windows of sequence numbers rather than LIMIT: rows sharing a number (possible only after someone
    dropped the unique constraint) come back together, and an empty window jumps to the next number
    that exists, so even a huge gap costs one query. Memory: one window.
    """
    t = table_of(AuditEvent)
    lowest = (await db.execute(select(func.min(t.c.seq)).where(t.c.chain == chain))).scalar()
    if lowest is None:
        return
    lo = min(int(lowest), 1) - 1
    while True:
        window = (
            select(t).where(t.c.chain == chain, t.c.seq > lo, t.c.seq <= lo + batch).order_by(t.c.seq, t.c.id)
        )
        result = await db.execute(window)
        names = list(result.keys())
        got = [dict(zip(names, r, strict=True)) for r in result.all()]  # faster than .mappings()
        if got:
            for r in got:
                yield r
            lo += batch
            continue
        following = (
            await db.execute(select(func.min(t.c.seq)).where(t.c.chain == chain, t.c.seq > lo))
        ).scalar()
        if following is None:
            return
        lo = int(following) - 1


async def _head(db: Executor, chain: str) -> tuple[int, str] | None:
    row = (await db.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.chain == chain))).first()
    return (int(row[0]), str(row[1])) if row is not None else None


async def _seq_of_hash(db: Executor, chain: str, digest: str) -> int | None:
    """Where in the chain an entry with this hash sits (only asked once something is wrong)."""
    t = table_of(AuditEvent)
    found = await db.execute(select(t.c.seq).where(t.c.chain == chain, t.c.hash == digest).limit(1))
    seq = found.scalar()
    return None if seq is None else int(seq)


async def _twin(
    db: Executor, chain: str, a: dict[str, Any], b: dict[str, Any], head: tuple[int, str] | None
) -> Fault:
    """Two entries share a sequence number: the one the chain goes on from is pforte's."""
    t = table_of(AuditEvent)
    seq = a["seq"]
    successors = set(
        (await db.execute(select(t.c.prev_hash).where(t.c.chain == chain, t.c.seq == seq + 1))).scalars()
    )
    if head is not None and head[0] == seq:
        successors.add(head[1])
    intruder = a if b["hash"] in successors and a["hash"] not in successors else b
    return Fault(seq, INSERTED, f"entry {seq} exists twice; one of the two was inserted", intruder["id"])


async def _check(
    db: Executor,
    chain: str,
    good: dict[str, Any] | None,
    r: dict[str, Any],
    n: dict[str, Any] | None,
    head: tuple[int, str] | None,
) -> Fault | None:
    """Judge entry ``r`` after the confirmed entry ``good`` and with the next entry ``n`` in view.

    The rules run in this order; each names the first entry that is out of place (docs/audit.md).
    """
    seq = r["seq"]
    want = good["seq"] + 1 if good else 1
    prev = good["hash"] if good else GENESIS
    if n is not None and n["seq"] == seq:
        return await _twin(db, chain, r, n, head)
    if seq < want:
        return Fault(seq, INSERTED, f"an entry numbered {seq} follows entry {want - 1}", r["id"])
    if seq > want:
        if good is not None and head is not None and good["seq"] >= head[0]:
            return Fault(
                seq, INSERTED, f"entry {seq} lies beyond the chain's head (entry {head[0]})", r["id"]
            )
        gone = f"entry {want} was" if seq == want + 1 else f"entries {want} to {seq - 1} were"
        return Fault(want, REMOVED, f"{gone} removed: the chain jumps from entry {want - 1} to {seq}")
    linked = r["prev_hash"] == prev
    if not linked and n is not None and r["prev_hash"] == n["hash"]:
        return Fault(seq, REORDERED, f"entries {seq} and {n['seq']} were swapped", r["id"])
    if n is not None and n["prev_hash"] == prev and n["prev_hash"] != r["hash"]:
        return Fault(
            seq,
            INSERTED,
            f"entry {seq} was inserted: the entry after it is chained to entry {want - 1}, past it",
            r["id"],
        )
    consistent = chain_hash(r["prev_hash"], r) == r["hash"]
    if linked and consistent:
        if head is not None and seq == head[0] and r["hash"] != head[1]:
            return Fault(seq, CHANGED, f"entry {seq} does not match the chain head's record of it", r["id"])
        return None
    if linked:
        return Fault(
            seq, CHANGED, f"entry {seq} was changed: its content no longer matches its hash", r["id"]
        )
    if chain_hash(prev, r) == r["hash"]:
        return Fault(
            seq, CHANGED, f"entry {seq} was changed: its link to entry {want - 1} was edited", r["id"]
        )
    where = await _seq_of_hash(db, chain, r["prev_hash"])
    if where is not None:
        return Fault(
            seq, REORDERED, f"entry {seq} is chained to entry {where}, not to entry {want - 1}", r["id"]
        )
    if consistent and good is not None:
        return Fault(
            good["seq"],
            CHANGED,
            f"entry {good['seq']} was changed and re-hashed: entry {seq} is chained to another version of it",
            good["id"],
        )
    return Fault(
        want,
        REMOVED,
        f"entry {want} was removed and the later entries renumbered: the entry now numbered {want} "
        "is chained to an entry that no longer exists",
    )


async def _ending(
    db: Executor,
    chain: str,
    last: dict[str, Any] | None,
    head: tuple[int, str] | None,
    beyond: dict[str, Any] | None,
    judge: Any,
) -> Fault | None:
    """After the last entry: nothing cut off behind it, nothing appended past the head."""
    end = last["seq"] if last else 0
    if head is not None and head[0] > end:
        gone = f"entry {end + 1} was" if head[0] == end + 1 else f"entries {end + 1} to {head[0]} were"
        return Fault(end + 1, TRUNCATED, f"{gone} cut off: the chain's head records {head[0]} entries")
    signed = await judge.first_beyond(end)
    if signed is None and beyond is None and (head is not None or end == 0):
        return None
    # Writers may have appended since the head was first read: only the head as it is now can say
    # whether entries (or a checkpoint) past the walk are missing or new.
    now_head = await _head(db, chain)
    if signed is not None and (now_head is None or now_head[0] < signed.seq):
        return Fault(
            end + 1,
            TRUNCATED,
            f"the chain ends at entry {end}, but a checkpoint signed on {signed.at:%Y-%m-%d %H:%M} UTC "
            f"covers entry {signed.seq}: the newest entries were cut off",
        )
    if now_head is None:
        return Fault(
            end, HEAD, f"the chain's head record is missing: its newest entry ({end}) cannot be confirmed"
        )
    if now_head[0] < end:
        first = now_head[0] + 1
        entry_id = beyond["id"] if beyond is not None and beyond["seq"] == first else None
        return Fault(first, INSERTED, f"entries {first} to {end} lie beyond the chain's head", entry_id)
    return None


async def verify(db: Executor, chain: str) -> VerifyResult:
    """Recompute a chain and judge its signed checkpoints; name the first entry that was changed,
    removed, inserted, reordered or cut off, or the first checkpoint that no longer fits.

    Streams the entries (one window of entries and one of checkpoints in memory) with one entry of
    look-ahead, which is what tells an edited entry from an inserted one; only once something is
    wrong does it ask the database more (where a stray link points). Safe beside concurrent writers:
    the head is read first, and entries appended during the walk are checked but never required.
    """
    from pforte.audit import checkpoints  # imported here: it uses crypto.signing, which imports us

    head = await _head(db, chain)
    judge = checkpoints.Judge(db, chain)
    good: dict[str, Any] | None = None
    confirmed = 0
    beyond: dict[str, Any] | None = None  # the first entry past the head read at the start
    fault: Fault | None = None

    async def step(r: dict[str, Any], n: dict[str, Any] | None) -> Fault | None:
        nonlocal good, confirmed, beyond
        found = await _check(db, chain, good, r, n, head) or await judge.entry(r)
        if found is None:
            good, confirmed = r, confirmed + 1
            if beyond is None and head is not None and r["seq"] > head[0]:
                beyond = r
        return found

    async with aclosing(_walk(db, chain)) as rows:
        cur: dict[str, Any] | None = None
        async for nxt in rows:
            if cur is not None and (fault := await step(cur, nxt)) is not None:
                break
            cur = nxt
        else:
            if cur is not None:
                fault = await step(cur, None)
    if fault is None:
        fault = await _ending(db, chain, good, head, beyond, judge)
    return VerifyResult(
        chain,
        confirmed,
        fault is None,
        first_bad_seq=fault.seq if fault else None,
        problem=fault.problem if fault else None,
        kind=fault.kind if fault else None,
        entry_id=fault.entry_id if fault else None,
        checkpoints_ok=judge.ok,
        signed_seq=judge.signed_seq,
        signed_at=judge.signed_at,
    )


@dataclass(frozen=True)
class Filters:
    """What a reader of the log selects; every field that is set must match."""

    action: str | None = None  # exact, or everything under it: "consent" finds "consent.given"
    actor_id: str | None = None
    actor_kind: str | None = None  # staff | system | cli | unknown
    object_id: str | None = None
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive

    def where(self, org_id: str) -> list[ColumnElement[bool]]:
        """The SQL conditions, scoped to the organisation's chain."""
        t = table_of(AuditEvent)
        conds: list[ColumnElement[bool]] = [t.c.chain == org_id]
        if self.action:
            conds.append(
                or_(t.c.action == self.action, t.c.action.startswith(self.action + ".", autoescape=True))
            )
        if self.actor_id:
            conds.append(t.c.actor_id == self.actor_id)
        if self.actor_kind:
            conds.append(t.c.actor_kind == self.actor_kind)
        if self.object_id:
            conds.append(t.c.object_id == self.object_id)
        if self.since is not None:
            conds.append(t.c.at >= self.since)
        if self.until is not None:
            conds.append(t.c.at < self.until)
        return conds

    def describe(self) -> dict[str, str]:
        """The filters that are set, as plain strings (ids and times only), for an audit entry."""
        out = {
            "action": self.action,
            "actor_id": self.actor_id,
            "actor_kind": self.actor_kind,
            "object_id": self.object_id,
            "since": self.since.astimezone(UTC).isoformat() if self.since else None,
            "until": self.until.astimezone(UTC).isoformat() if self.until else None,
        }
        return {k: v for k, v in out.items() if v}


async def list_(
    db: Executor,
    *,
    org_id: str,
    action: str | None = None,
    object_id: str | None = None,
    actor_id: str | None = None,
    limit: int = 200,
    before_seq: int | None = None,
    filters: Filters | None = None,
) -> list[AuditEvent]:
    """An organisation's entries, newest first, filtered (``filters`` and the single ones combine)."""
    f = filters or Filters()
    f = Filters(
        action=action or f.action,
        actor_id=actor_id or f.actor_id,
        actor_kind=f.actor_kind,
        object_id=object_id or f.object_id,
        since=f.since,
        until=f.until,
    )
    q = select(AuditEvent).where(*f.where(org_id))
    if before_seq:
        q = q.where(AuditEvent.seq < before_seq)
    q = q.order_by(AuditEvent.seq.desc()).limit(limit)
    if isinstance(db, AsyncSession):
        return list((await db.execute(q)).scalars())
    raise TypeError("list_ needs an ORM session")


@dataclass(frozen=True)
class Span:
    """The entries an export covers: ``after_seq < seq <= up_to_seq`` and matching its filters."""

    after_seq: int
    up_to_seq: int
    count: int
    truncated: bool  # more entries matched; the span holds the newest ``limit`` of them


async def span(db: Executor, *, org_id: str, filters: Filters, limit: int) -> Span:
    """Fix the newest ``limit`` matching entries now, so rows read later are exactly these.

    A chain's committed entries are always a gap-free prefix (a writer holds the head row until it
    commits), so bounding by sequence numbers read now gives a stable set, however long the reading takes.
    """
    t = table_of(AuditEvent)
    conds = filters.where(org_id)
    top = (await db.execute(select(func.max(t.c.seq)).where(*conds))).scalar_one_or_none()
    if top is None:
        return Span(0, 0, 0, False)
    conds.append(t.c.seq <= top)
    cut = (
        await db.execute(select(t.c.seq).where(*conds).order_by(t.c.seq.desc()).offset(limit).limit(1))
    ).scalar_one_or_none()
    if cut is not None:
        return Span(int(cut), int(top), limit, True)
    total = (await db.execute(select(func.count()).select_from(t).where(*conds))).scalar_one()
    return Span(0, int(top), int(total), False)


async def rows_in(
    db: Executor, *, org_id: str, filters: Filters, after_seq: int, up_to_seq: int, limit: int
) -> list[dict[str, Any]]:
    """Up to ``limit`` matching entries after ``after_seq`` (oldest first), hashes included."""
    t = table_of(AuditEvent)
    q = (
        select(t)
        .where(*filters.where(org_id), t.c.seq > after_seq, t.c.seq <= up_to_seq)
        .order_by(t.c.seq)
        .limit(limit)
    )
    return [dict(r) for r in (await db.execute(q)).mappings()]
