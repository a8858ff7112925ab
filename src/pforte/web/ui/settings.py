"""The settings page (DSK I.12): every setting with its value, default, privacy effect and deviation.

Privacy by default means the defaults are the strictest that still work; an organisation may
loosen some of them, and this page says plainly where it did. Each setting has a direction: for a
switch, the stricter position; for a period, shorter is stricter; for keyword lists, a removed
default keyword makes it harder for patients to ask for the notice or to withdraw.

Admins only. Saving changes only what differs, through ``orgs.update_settings`` (audited); bad
input re-renders the page with a clear error and changes nothing. Error reporting is instance-wide
and lives in ``reporting``: after its change is committed this process applies it at once and the
other processes hear of it on the event bus.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from jinja2 import pass_context
from sqlalchemy.ext.asyncio import AsyncSession

from pforte.audit.service import Actor
from pforte.errors import ValidationError
from pforte.events import ERROR_REPORTING_CHANGED, LiveEvent
from pforte.orgs import service as orgs
from pforte.orgs.policy import SPECS, Spec, deviates
from pforte.orgs.service import DEFAULT_SETTINGS
from pforte.reporting import service as reporting
from pforte.staff.service import CurrentUser
from pforte.web.deps import DB, check_csrf, get_services
from pforte.web.ui.render import render, templates
from pforte.web.ui.routes import _commit, _form_text, admin_only

router = APIRouter()


@pass_context
def _error_reporting_state(context: Any) -> reporting.State:
    """What this process does now (for the banner in base.html)."""
    return context["request"].app.state.services.reporter.state  # type: ignore[no-any-return]


templates.env.globals["error_reporting_state"] = _error_reporting_state

MAX_KEYWORDS = 10
MAX_KEYWORD_LENGTH = 32
INSTANCE = "instance"  # the bus's "organisation" for instance-wide system events

EDITABLE = tuple(s for s in SPECS if s.editable)
_BY_NAME = {s.name: s for s in SPECS}


def _shown(spec: Spec, value: Any) -> Any:
    if spec.kind == "keywords":
        return ", ".join(value or ())
    if spec.kind == "days_map":
        return dict(value or {})
    return value


def _rows(org: Any) -> list[dict[str, Any]]:
    rows = []
    # A setting added later without a row here is still listed (read-only, no deviation marker).
    for spec in [_BY_NAME.get(name) or Spec(name, "other", editable=False) for name in DEFAULT_SETTINGS]:
        value, default = orgs.setting(org, spec.name), DEFAULT_SETTINGS[spec.name]
        if spec.fixed:
            value = spec.strict
        rows.append(
            {
                "spec": spec,
                "name": spec.name,
                "value": _shown(spec, value),
                "default": _shown(spec, default),
                "deviation": deviates(spec, value, default),
            }
        )
    return rows


def parse_keywords(raw: str) -> list[str]:
    """A comma-separated keyword list: trimmed, lower-case, unique, at least one, each short."""
    words: list[str] = []
    for part in raw.split(","):
        word = " ".join(part.split()).lower()
        if not word:
            continue
        if len(word) > MAX_KEYWORD_LENGTH:
            raise ValidationError("a keyword is too long", code="keyword_too_long")
        if word not in words:
            words.append(word)
    if not words:
        raise ValidationError("each keyword list needs at least one keyword", code="keywords_empty")
    if len(words) > MAX_KEYWORDS:
        raise ValidationError("too many keywords", code="keywords_too_many")
    return words


def parse_number(raw: str, spec: Spec) -> int:
    """A whole number within the setting's bounds."""
    raw = raw.strip()
    if not raw.isdigit() or not spec.minimum <= int(raw) <= spec.maximum:
        raise ValidationError("a number is out of range", code="bad_number")
    return int(raw)


async def _wanted(request: Request) -> dict[str, Any]:
    """Every editable setting as submitted (a switch that is not ticked is off)."""
    wanted: dict[str, Any] = {}
    for spec in EDITABLE:
        raw = await _form_text(request, spec.name, 1000)
        if spec.kind == "switch":
            wanted[spec.name] = raw == "on"
        elif spec.kind == "number":
            wanted[spec.name] = parse_number(raw, spec)
        else:
            wanted[spec.name] = parse_keywords(raw)
    if set(wanted["notice_keywords"]) & set(wanted["withdraw_keywords"]):
        raise ValidationError(
            "a keyword cannot both ask for the notice and withdraw", code="keywords_overlap"
        )
    return wanted


async def _page(
    request: Request,
    session: AsyncSession,
    user: CurrentUser,
    *,
    saved: str = "",
    error: ValidationError | None = None,
    form: dict[str, str] | None = None,
) -> Response:
    org = await orgs.get(session=session, org_id=user.org_id)
    state = await reporting.get(session=session)
    rows = _rows(org)
    await _commit(session)
    return render(
        request,
        "pages/admin_settings.html",
        {
            "rows": rows,
            "reporting": state,
            "deviations": sum(1 for r in rows if r["deviation"]) + (1 if state.enabled else 0),
            "saved": saved,
            "error": error,
            "form": form or {},
        },
        status_code=error.http_status if error else 200,
    )


@router.get("/admin/settings", name="admin_settings")
async def settings_page(
    request: Request, saved: str = "", user: CurrentUser = Depends(admin_only), session: AsyncSession = DB
) -> Response:
    """Every setting of the organisation and the instance's error reporting."""
    return await _page(request, session, user, saved=saved if saved in ("settings", "reporting") else "")


@router.post("/admin/settings", name="save_settings")
async def save_settings(
    request: Request, user: CurrentUser = Depends(admin_only), session: AsyncSession = DB
) -> Response:
    """Save the editable settings; only those that changed are written (and audited)."""
    await check_csrf(request, user)
    services = get_services(request)
    try:
        wanted = await _wanted(request)
    except ValidationError as exc:
        form = {k: str(v) for k, v in (await request.form()).items() if k != "csrf_token"}
        return await _page(request, session, user, error=exc, form=form)
    org = await orgs.get(session=session, org_id=user.org_id)
    changes = {name: value for name, value in wanted.items() if orgs.setting(org, name) != value}
    if changes:
        await orgs.update_settings(
            session=session,
            org_id=user.org_id,
            changes=changes,
            actor=Actor.staff(user.id),
            now=services.clock.now(),
        )
    await _commit(session)
    return RedirectResponse(
        str(request.app.url_path_for("admin_settings")) + "?saved=settings", status_code=303
    )


@router.post("/admin/settings/error-reporting", name="save_error_reporting")
async def save_error_reporting(
    request: Request, user: CurrentUser = Depends(admin_only), session: AsyncSession = DB
) -> Response:
    """Switch error reporting on with a DSN, or off; applied in every process after the commit."""
    await check_csrf(request, user)
    services = get_services(request)
    actor, now = Actor.staff(user.id), services.clock.now()
    try:
        if await _form_text(request, "action", 16) == "disable":
            state = await reporting.disable(session=session, actor=actor, now=now)
        else:
            dsn = await _form_text(request, "dsn", reporting.MAX_DSN + 100)
            state = await reporting.enable(session=session, dsn=dsn, actor=actor, now=now)
    except ValidationError as exc:  # raised before anything was written
        return await _page(request, session, user, error=exc)
    await _commit(session)
    await services.reporter.apply(state)
    services.bus.publish(LiveEvent(org_id=INSTANCE, type=ERROR_REPORTING_CHANGED))
    return RedirectResponse(
        str(request.app.url_path_for("admin_settings")) + "?saved=reporting", status_code=303
    )
