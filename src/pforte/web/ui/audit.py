"""The audit viewer (DSK I.11): an organisation's log for its admins and auditors, and its export.

Who may look: admins and auditors (the auditor role is read-only everywhere else). Everything is
scoped to the reader's organisation: its chain is the only one read.

Reading the page is not itself audited: it shows ids, action names and staff accounts, never patient
data. An export is audited (``audit.export``) in the request's transaction, before any byte is sent.
The export first fixes the entries it covers (``audit.span``: a range of sequence numbers, read in
that transaction), then commits, then streams them in batches, each read in its own short
transaction, so a large download never holds a transaction open and its count is exact.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse
from sqlalchemy.ext.asyncio import AsyncSession

from pforte.audit import service as audit
from pforte.audit.service import Actor, Filters, Span
from pforte.bootstrap import Services
from pforte.errors import ValidationError
from pforte.staff import service as staff
from pforte.staff.models import StaffUser
from pforte.staff.service import CurrentUser
from pforte.web.deps import DB, get_services, require_role
from pforte.web.ui.render import render
from pforte.web.ui.routes import _commit, _content_disposition

router = APIRouter()
can_audit = require_role("admin", "auditor")

PAGE_SIZE = 100
EXPORT_LIMIT = 100_000  # rows per export; more matching entries: the newest ones, and it says so
EXPORT_BATCH = 1000
EXPORT_FORMAT = "pforte.audit-export/1"
# The fields an entry's hash covers, then the chain links; ``actor_email`` is a reading aid only.
FIELDS = (
    "seq",
    "at",
    "chain",
    "org_id",
    "actor_kind",
    "actor_id",
    "action",
    "object_kind",
    "object_id",
    "details",
    "prev_hash",
    "hash",
    "actor_email",
)
ACTOR_KINDS = ("system", "cli", "unknown")  # typed into the actor filter instead of an e-mail address


@dataclass(frozen=True)
class Search:
    """The viewer's filter form as typed (also the query string of its links)."""

    action: str = ""
    actor: str = ""
    object_id: str = ""
    date_from: str = ""
    date_to: str = ""

    def query(self, **extra: Any) -> str:
        """The query string selecting the same entries (empty fields left out)."""
        pairs = {
            "action": self.action,
            "actor": self.actor,
            "object": self.object_id,
            "from": self.date_from,
            "to": self.date_to,
            **extra,
        }
        return urlencode({k: v for k, v in pairs.items() if v not in ("", None)})


def _search(
    action: str = "",
    actor: str = "",
    object_id: str = Query("", alias="object"),
    date_from: str = Query("", alias="from"),
    date_to: str = Query("", alias="to"),
) -> Search:
    """The filter fields of the request, trimmed (the form's own limits, checked again here)."""
    fields = (action.strip().lower(), actor.strip(), object_id.strip(), date_from.strip(), date_to.strip())
    if any(len(f) > 254 for f in fields):
        raise ValidationError("a filter is too long", code="too_long")
    return Search(*fields)


def _day(value: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValidationError("a date must look like 2026-11-02", code="bad_date") from None


async def _filters(session: AsyncSession, user: CurrentUser, search: Search) -> Filters:
    """What the form selects; an actor is a staff e-mail of this organisation, or system/cli/unknown."""
    actor_id = actor_kind = None
    if search.actor.lower() in ACTOR_KINDS:
        actor_kind = search.actor.lower()
    elif search.actor:
        found = await staff.get_by_email(session=session, email=search.actor)
        if found is None or found.org_id != user.org_id:
            raise ValidationError(
                "no staff member of this organisation has this e-mail", code="unknown_actor"
            )
        actor_id = found.id
    start, end = _day(search.date_from), _day(search.date_to)
    return Filters(
        action=search.action or None,
        actor_id=actor_id,
        actor_kind=actor_kind,
        object_id=search.object_id or None,
        since=datetime.combine(start, time(), tzinfo=UTC) if start else None,
        until=datetime.combine(end + timedelta(days=1), time(), tzinfo=UTC) if end else None,
    )


async def _staff_of(session: AsyncSession, org_id: str, rows: Iterable[Any]) -> dict[str, StaffUser]:
    """The staff accounts that acted in these entries, by id."""
    ids = {r.actor_id for r in rows if r.actor_kind == "staff" and r.actor_id}
    return {u.id: u for u in await staff.list_(session=session, org_id=org_id, ids=ids)}


def _compact(value: Any) -> str:
    """JSON without spaces, keys sorted (as the hash covers it)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _utc(at: datetime) -> str:
    """An entry's time exactly as its hash covers it."""
    return at.astimezone(UTC).isoformat(timespec="microseconds")


@router.get("/audit", name="audit_log")
async def audit_page(
    request: Request,
    before: int | None = None,
    search: Search = Depends(_search),
    user: CurrentUser = Depends(can_audit),
    session: AsyncSession = DB,
) -> Response:
    """The organisation's audit log, newest first, 100 entries a page, with filters and export links."""
    error: ValidationError | None = None
    entries: list[Any] = []
    try:
        filters = await _filters(session, user, search)
    except ValidationError as exc:
        error = exc
    else:
        entries = await audit.list_(
            session, org_id=user.org_id, filters=filters, limit=PAGE_SIZE + 1, before_seq=before
        )
    older = entries[PAGE_SIZE - 1].seq if len(entries) > PAGE_SIZE else None
    entries = entries[:PAGE_SIZE]
    actors = await _staff_of(session, user.org_id, entries)
    await _commit(session)
    rows = [
        {
            "seq": e.seq,
            "at": e.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
            "at_iso": _utc(e.at),
            "actor_kind": e.actor_kind,
            "actor_id": e.actor_id,
            "actor": actors.get(e.actor_id or ""),
            "action": e.action,
            "object_kind": e.object_kind,
            "object_id": e.object_id,
            "details": "" if e.details is None else _compact(e.details),
        }
        for e in entries
    ]
    base = str(request.app.url_path_for("audit_log"))
    export = str(request.app.url_path_for("audit_export"))
    return render(
        request,
        "pages/audit.html",
        {
            "search": search,
            "rows": rows,
            "error": error,
            "older_url": f"{base}?{search.query(before=older)}" if older else None,
            "newest_url": f"{base}?{search.query()}" if before else None,
            "filter_url": lambda **kw: f"{base}?{Search(**kw).query()}",
            "csv_url": f"{export}?{search.query(format='csv')}",
            "json_url": f"{export}?{search.query(format='json')}",
            "export_limit": EXPORT_LIMIT,
        },
        status_code=error.http_status if error else 200,
    )


@router.get("/audit/export", name="audit_export")
async def audit_export(
    request: Request,
    format: str = "csv",
    search: Search = Depends(_search),
    user: CurrentUser = Depends(can_audit),
    session: AsyncSession = DB,
) -> Response:
    """The filtered entries as CSV or JSON, with sequence numbers and hashes; the export is audited."""
    if format not in ("csv", "json"):
        raise ValidationError("the format must be csv or json", code="bad_format")
    services = get_services(request)
    now = services.clock.now()
    filters = await _filters(session, user, search)
    covered = await audit.span(session, org_id=user.org_id, filters=filters, limit=EXPORT_LIMIT)
    await audit.record(
        session,
        org_id=user.org_id,
        actor=Actor.staff(user.id),
        action="audit.export",
        now=now,
        details={
            "format": format,
            "count": covered.count,
            "truncated": covered.truncated,
            "filters": filters.describe(),
        },
    )
    await _commit(session)
    batches = _batches(services, user.org_id, filters, covered)
    if format == "csv":
        body, media = _csv(batches), "text/csv; charset=utf-8"
    else:
        head = {
            "format": EXPORT_FORMAT,
            "org_id": user.org_id,
            "exported_at": _utc(now),
            "filters": filters.describe(),
            "count": covered.count,
            "limit": EXPORT_LIMIT,
            "truncated": covered.truncated,
        }
        body, media = _json(head, batches), "application/json"
    name = f"audit-{now.astimezone(UTC):%Y%m%d-%H%M%S}.{format}"
    return StreamingResponse(
        body,
        media_type=media,
        headers={
            "Content-Disposition": _content_disposition("attachment", name, name),
            "Cache-Control": "no-store",
            "X-Audit-Count": str(covered.count),
            "X-Audit-Truncated": "true" if covered.truncated else "false",
            "X-Audit-Limit": str(EXPORT_LIMIT),
        },
    )


async def _batches(
    services: Services, org_id: str, filters: Filters, covered: Span
) -> AsyncIterator[list[dict[str, Any]]]:
    """The covered entries, oldest first, a batch per short transaction."""
    after = covered.after_seq
    while after < covered.up_to_seq:
        async with services.db.transaction() as session:
            rows = await audit.rows_in(
                session,
                org_id=org_id,
                filters=filters,
                after_seq=after,
                up_to_seq=covered.up_to_seq,
                limit=EXPORT_BATCH,
            )
            ids = {r["actor_id"] for r in rows if r["actor_kind"] == "staff" and r["actor_id"]}
            emails = {u.id: u.email for u in await staff.list_(session=session, org_id=org_id, ids=ids)}
        if not rows:
            return
        yield [{**r, "at": _utc(r["at"]), "actor_email": emails.get(r["actor_id"] or "")} for r in rows]
        after = rows[-1]["seq"]


def _cell(value: str | None) -> str:
    """A spreadsheet must not read a cell as a formula."""
    if value and value[0] in "=+-@\t\r":
        return "'" + value
    return value or ""


async def _csv(batches: AsyncIterator[list[dict[str, Any]]]) -> AsyncIterator[bytes]:
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(FIELDS)
    yield buf.getvalue().encode()
    async for rows in batches:
        buf.seek(0)
        buf.truncate()
        for r in rows:
            # details always as JSON ("null" when there are none); any other empty cell is null
            cells = {**r, "details": _compact(r["details"]), "actor_email": _cell(r["actor_email"])}
            out.writerow(["" if cells[f] is None else cells[f] for f in FIELDS])
        yield buf.getvalue().encode()


async def _json(head: dict[str, Any], batches: AsyncIterator[list[dict[str, Any]]]) -> AsyncIterator[bytes]:
    opening = json.dumps(head, ensure_ascii=False)
    yield (opening[:-1] + ', "entries": [').encode()
    first = True
    async for rows in batches:
        parts = []
        for r in rows:
            parts.append(("\n" if first else ",\n") + json.dumps({f: r[f] for f in FIELDS}))
            first = False
        yield "".join(parts).encode()
    yield b"\n]}\n"
