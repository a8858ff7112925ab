"""Web pages for the exports feature (issue 6): the signed conversation export download.

Admins and auditors (read-only reviewers, who check the record) may export; staff get 403 and
another organisation's conversation is 404. The download is a GET so that it is a plain link; it
changes nothing but the audit log, whose ``conversation.export`` entry commits before the archive
is sent.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncSession

from pforte.audit.service import Actor
from pforte.exports import service as exports
from pforte.staff.service import CurrentUser
from pforte.web.deps import DB, get_services, require_role
from pforte.web.ui.render import language

router = APIRouter()

reviewers = require_role("admin", "auditor")


@router.get("/conversations/{conversation_id}/export.zip", name="conversation_export")
async def conversation_export(
    request: Request,
    conversation_id: str,
    first: str | None = Query(None, alias="from"),
    last: str | None = Query(None, alias="to"),
    user: CurrentUser = Depends(reviewers),
    session: AsyncSession = DB,
) -> Response:
    """The conversation (optionally the days from..to) as a signed ZIP, audited."""
    services = get_services(request)
    since, until = exports.day_range(first, last)
    made = await exports.create(
        session,
        services.keys,
        services.blobs,
        org_id=user.org_id,
        conversation_id=conversation_id,
        actor=Actor.staff(user.id),
        now=services.clock.now(),
        since=since,
        until=until,
        lang=language(request),
    )
    await session.commit()  # the audit entry is committed before the archive leaves
    return Response(
        made.data,
        media_type="application/zip",
        headers={
            "Content-Disposition": f'attachment; filename="{made.archive_name}"',
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'none'; sandbox",
        },
    )
