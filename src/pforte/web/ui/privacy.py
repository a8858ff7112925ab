"""The privacy notice: its public page (no login), the link on every staff page, and the admin editor.

Publishing makes a new version; the old ones stay readable (``?version=N``), because a patient's
consent names the version it was given for.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.ext.asyncio import AsyncSession

from pforte.audit.service import Actor
from pforte.channels import service as channels
from pforte.channels.kinds import STORAGE_MODES, kind_of
from pforte.errors import NotFoundError
from pforte.orgs import service as orgs
from pforte.privacy import service as privacy
from pforte.privacy import texts
from pforte.privacy.jobs import public_url
from pforte.staff.service import CurrentUser
from pforte.web.deps import DB, check_csrf, current_user, get_services
from pforte.web.ui.render import language, render
from pforte.web.ui.routes import _commit, _form_text, _sidebar, admin_only

router = APIRouter()


@router.get("/privacy/{slug}", name="privacy_notice")
async def public_notice(
    request: Request,
    slug: str,
    lang: str | None = None,
    version: int | None = None,
    session: AsyncSession = DB,
) -> Response:
    """The organisation's privacy notice for everyone (patients follow the link sent in the chat)."""
    org = await orgs.find_by_slug(session=session, slug=slug)
    if org is None:
        raise NotFoundError("no such privacy notice")
    notices = await privacy.list_notices(session, org_id=org.id)
    shown = next((n for n in notices if n.version == version), None) if version else next(iter(notices), None)
    if shown is None:
        raise NotFoundError("no such privacy notice")
    show_lang = lang if lang in ("de", "en") else language(request)
    chans = await channels.list_(session=session, org_id=org.id)
    await _commit(session)
    return render(
        request,
        "pages/privacy_notice.html",
        {
            "org": org,
            "notice": shown,
            "current": notices[0],
            "versions": [n.version for n in notices],
            "body": shown.body_en if show_lang == "en" else shown.body_de,
            "show_lang": show_lang,
            "channels": [(c, kind_of(c.kind), STORAGE_MODES.get(c.storage_region)) for c in chans],
        },
    )


@router.get("/privacy", name="own_privacy_notice")
async def own_notice(
    request: Request, user: CurrentUser = Depends(current_user), session: AsyncSession = DB
) -> Response:
    """The link on every staff page: the notice of the staff member's organisation."""
    org = await orgs.get(session=session, org_id=user.org_id)
    await _commit(session)
    return RedirectResponse(request.app.url_path_for("privacy_notice", slug=org.slug), status_code=303)


@router.get("/admin/privacy-notice", name="admin_notice")
async def notice_page(
    request: Request, saved: bool = False, user: CurrentUser = Depends(admin_only), session: AsyncSession = DB
) -> Response:
    """Edit and publish the notice; see every version and the consent settings."""
    services = get_services(request)
    ctx = await _sidebar(session, services, user)
    org = await orgs.get(session=session, org_id=user.org_id)
    notices = await privacy.list_notices(session, org_id=user.org_id)
    await _commit(session)
    current = notices[0] if notices else None
    return render(
        request,
        "pages/admin_notice.html",
        {
            **ctx,
            "org": org,
            "notices": notices,
            "body_de": current.body_de if current else texts.DEFAULT_NOTICE_DE.format(org=org.name),
            "body_en": current.body_en if current else texts.DEFAULT_NOTICE_EN.format(org=org.name),
            "public_url": public_url(services.settings.base_url, org.slug),
            "consent_required": orgs.setting(org, "consent_required"),
            "notice_keywords": orgs.setting(org, "notice_keywords"),
            "withdraw_keywords": orgs.setting(org, "withdraw_keywords"),
            "saved": saved,
        },
    )


@router.post("/admin/privacy-notice", name="publish_notice")
async def publish(
    request: Request, user: CurrentUser = Depends(admin_only), session: AsyncSession = DB
) -> Response:
    """Publish the edited texts as a new version (patients get it with their next message)."""
    await check_csrf(request, user)
    services = get_services(request)
    await privacy.publish_notice(
        session,
        org_id=user.org_id,
        body_de=await _form_text(request, "body_de", privacy.NOTICE_MAX + 1000),
        body_en=await _form_text(request, "body_en", privacy.NOTICE_MAX + 1000),
        actor=Actor.staff(user.id),
        now=services.clock.now(),
    )
    await _commit(session)
    return RedirectResponse(str(request.app.url_path_for("admin_notice")) + "?saved=1", status_code=303)
