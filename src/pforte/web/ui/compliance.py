"""The compliance report page (DSK I.11, IV.4): every catalog row with status, evidence and tests.

Admins only, like the other admin pages. The page builds the report of the admin's organisation
as it stands now and compares it with the newest saved one ("changed since"); the save button
stores the current report (trigger ``web``). The JSON and the standalone HTML page are downloads of
the same report; the HTML page carries its own strict Content-Security-Policy (an inline style
sheet allowed by hash, nothing else), replacing the site-wide one that would block its style.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.ext.asyncio import AsyncSession

from pforte.compliance import render as report_render
from pforte.compliance import service as compliance
from pforte.compliance.catalog import SECTIONS
from pforte.compliance.schemas import Diff, Report
from pforte.staff.service import CurrentUser
from pforte.web.deps import DB, check_csrf, get_services
from pforte.web.ui.render import language, render
from pforte.web.ui.routes import _commit, admin_only

router = APIRouter()


async def _current(
    request: Request, session: AsyncSession, user: CurrentUser, *, saving: bool = False
) -> Report:
    services = get_services(request)
    return await compliance.build(
        session,
        org_id=user.org_id,
        settings=services.settings,
        now=services.clock.now(),
        key_provider=services.keys.provider,
        saving=saving,
    )


async def _with_changes(request: Request, session: AsyncSession, user: CurrentUser) -> tuple[Report, Diff]:
    """The report now and what changed since the newest saved one."""
    report = await _current(request, session, user)
    previous = await compliance.latest(session, org_id=user.org_id)
    return report, compliance.diff(previous.report if previous else None, report)


def _filename(report: Report, ext: str) -> str:
    return f"compliance-{report.org_slug}-{report.generated_at:%Y%m%d-%H%M}.{ext}"


@router.get("/admin/compliance", name="admin_compliance")
async def compliance_page(
    request: Request, saved: str = "", user: CurrentUser = Depends(admin_only), session: AsyncSession = DB
) -> Response:
    """The report now, the newest saved report's date, and the rows changed since then."""
    report = await _current(request, session, user)
    previous = await compliance.latest(session, org_id=user.org_id)
    saved_count = await compliance.count(session, org_id=user.org_id)
    await _commit(session)
    lang = language(request)
    return render(
        request,
        "pages/admin_compliance.html",
        {
            "report": report,
            "previous": previous,
            "saved_count": saved_count,
            "changes": compliance.diff(previous.report if previous else None, report),
            "sections": [
                (key, title.get(lang), [r for r in report.rows if r.section == key])
                for key, title in SECTIONS.items()
            ],
            "saved": saved == "1",
        },
    )


@router.post("/admin/compliance/save", name="save_compliance")
async def save_report(
    request: Request, user: CurrentUser = Depends(admin_only), session: AsyncSession = DB
) -> Response:
    """Store the report as it stands now; the page then compares later states with it."""
    await check_csrf(request, user)
    report = await _current(request, session, user, saving=True)
    await compliance.save(session, org_id=user.org_id, report=report, trigger="web")
    await _commit(session)
    return RedirectResponse(str(request.app.url_path_for("admin_compliance")) + "?saved=1", status_code=303)


@router.get("/admin/compliance.json", name="compliance_json")
async def download_json(
    request: Request, user: CurrentUser = Depends(admin_only), session: AsyncSession = DB
) -> Response:
    """The report as JSON (with the changes since the newest saved one)."""
    report, changes = await _with_changes(request, session, user)
    await _commit(session)
    return Response(
        report_render.to_json(report, changes),
        media_type="application/json",
        headers={"content-disposition": f'attachment; filename="{_filename(report, "json")}"'},
    )


@router.get("/admin/compliance.html", name="compliance_html")
async def download_html(
    request: Request, user: CurrentUser = Depends(admin_only), session: AsyncSession = DB
) -> Response:
    """The report as one standalone, printable HTML page in the admin's language."""
    report, changes = await _with_changes(request, session, user)
    await _commit(session)
    return Response(
        report_render.to_html(report, lang=language(request), changes=changes),
        media_type="text/html",
        headers={
            "content-disposition": f'attachment; filename="{_filename(report, "html")}"',
            "content-security-policy": report_render.CSP,
        },
    )
