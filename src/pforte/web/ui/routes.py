"""Staff web inbox: login, conversation list and view, sending, attachments, live updates, channel admin.

Transactions: every route runs in the request's transaction (``deps.db_session``). FastAPI closes
that dependency only after the response has been sent, so a browser could follow a redirect (or
the outbox could look for a job) before the commit. Routes therefore load everything they render,
then call ``_commit`` *before* building the response; side effects (waking the outbox, live
events) happen after that commit, never before (DESIGN 3).
"""

from __future__ import annotations

import contextlib
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from jinja2 import pass_context
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.datastructures import UploadFile
from starlette.staticfiles import StaticFiles

from pforte import documents
from pforte.audit.service import Actor
from pforte.bootstrap import Services
from pforte.channels import service as channels
from pforte.channels.kinds import STORAGE_MODES, kind_of
from pforte.conversations import service as conv
from pforte.errors import (
    AuthenticationError,
    PayloadTooLarge,
    PermissionDenied,
    ValidationError,
)
from pforte.events import LiveEvent
from pforte.i18n import LOCALES
from pforte.orgs import service as orgs
from pforte.privacy import service as privacy
from pforte.staff import service as staff
from pforte.staff.service import CurrentUser
from pforte.web.deps import (
    BACKGROUND_HEADER,
    DB,
    SESSION_COOKIE,
    check_csrf,
    current_user,
    get_services,
    require_role,
)
from pforte.web.ui import sse
from pforte.web.ui.render import render, templates

STATIC_DIR = Path(__file__).parent / "static"
# Times are shown in the clinic's local time; organisations have no time-zone setting yet.
DISPLAY_TZ = ZoneInfo("Europe/Berlin")
LANG_COOKIE = "lang"
MAX_TEXT_FIELD = 8192

router = APIRouter()
router.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

can_send = require_role("admin", "staff")
admin_only = require_role("admin")


# -- template helpers ------------------------------------------------------------------------------


@pass_context
def _path_for(context: Any, name: str, /, **params: Any) -> str:
    """A same-origin path for a named route (relative, so proxies and schemes never matter)."""
    return str(context["request"].app.url_path_for(name, **params))


def _local(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(DISPLAY_TZ)


@pass_context
def _when(context: Any, dt: datetime | None) -> str:
    """Time today, else day and time, in the display time zone."""
    local = _local(dt)
    if local is None:
        return ""
    today = datetime.now(DISPLAY_TZ).date()
    if local.date() == today:
        return local.strftime("%H:%M")
    if context.get("lang") == "de":
        return local.strftime("%d.%m.%Y %H:%M")
    return local.strftime("%Y-%m-%d %H:%M")


def _iso(dt: datetime | None) -> str:
    local = _local(dt)
    return local.isoformat() if local else ""


templates.env.globals["path_for"] = _path_for
# A fresh one-time key per composer form: the same form arriving twice queues one message.
templates.env.globals["new_client_key"] = lambda: secrets.token_urlsafe(18)
templates.env.filters["when"] = _when
templates.env.filters["iso"] = _iso
templates.env.filters["filesize"] = documents.filesize


# -- small helpers ---------------------------------------------------------------------------------


async def _commit(session: AsyncSession) -> None:
    """Commit the request's transaction now, before the response leaves (see the module docstring)."""
    await session.commit()


def _htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def _check_same_origin(request: Request) -> None:
    """CSRF defence where there is no session yet (login, language): the browser must say same-origin."""
    origin = request.headers.get("origin")
    # "null" is what browsers send under Referrer-Policy: no-referrer; Sec-Fetch-Site then decides.
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host", ""):
        raise PermissionDenied("cross-origin request refused", code="csrf")
    if request.headers.get("sec-fetch-site") not in (None, "same-origin", "none"):
        raise PermissionDenied("cross-origin request refused", code="csrf")


def _safe_next(value: str | None, default: str = "/") -> str:
    """Only local paths, never another host (no open redirects)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return default
    return value


async def _form_text(request: Request, name: str, limit: int = MAX_TEXT_FIELD) -> str:
    value = (await request.form()).get(name)
    if not isinstance(value, str):
        return ""
    if len(value) > limit:
        raise ValidationError("the text is too long", code="too_long")
    return value


async def _client_key(request: Request) -> str | None:
    """The composer form's one-time key (see ``conv.DuplicateSubmission``)."""
    return (await _form_text(request, "client_key", 64)).strip() or None


async def _optional_user(request: Request, session: AsyncSession) -> CurrentUser | None:
    if not request.cookies.get(SESSION_COOKIE):
        return None
    try:
        return await current_user(request, session)
    except AuthenticationError:
        return None


async def _sidebar(session: AsyncSession, services: Services, user: CurrentUser) -> dict[str, Any]:
    """What every inbox page shows around the conversation: list, counts, channel problems."""
    now = services.clock.now()
    rows = await conv.list_(session=session, keys=services.keys, org_id=user.org_id, now=now)
    counts = await conv.counts(session=session, org_id=user.org_id)
    down = [c for c in await channels.list_(session=session, org_id=user.org_id) if c.state != "UP"]
    return {"rows": rows, "counts": counts, "down_channels": down, "now": now}


async def _thread_context(
    session: AsyncSession, services: Services, user: CurrentUser, conversation_id: str
) -> dict[str, Any]:
    view = await conv.get(
        session=session,
        keys=services.keys,
        org_id=user.org_id,
        conversation_id=conversation_id,
        now=services.clock.now(),
    )
    consent = await privacy.consent_view(
        session, org_id=user.org_id, contact_id=view.contact_id, channel_id=view.channel_id
    )
    return {
        "view": view,
        "consent": consent,
        "composer_state": ("open" if view.window_open else "closed")
        + (f"-{consent.block.code}" if consent.block else ""),
        "can_send": user.role in ("admin", "staff"),
        "can_delete": user.role == "admin",
    }


async def _after_send(
    request: Request, session: AsyncSession, user: CurrentUser, conversation_id: str
) -> Response:
    """Commit the queued message, wake the outbox, answer with the fresh thread (htmx) or a redirect."""
    services = get_services(request)
    await _commit(session)
    services.outbox.wake()
    services.bus.publish(LiveEvent(org_id=user.org_id, type="conversation", conversation_id=conversation_id))
    if not _htmx(request):
        return RedirectResponse(
            request.app.url_path_for("conversation", conversation_id=conversation_id), status_code=303
        )
    async with services.db.transaction() as fresh:
        ctx = await _thread_context(fresh, services, user, conversation_id)
    return render(request, "partials/messages.html", ctx)


# -- login, logout, language -----------------------------------------------------------------------


@router.get("/login", name="login")
async def login_page(request: Request) -> Response:
    """The login form."""
    return render(request, "pages/login.html", {"email": "", "failed": False})


@router.post("/login")
async def login(request: Request, session: AsyncSession = DB) -> Response:
    """Check e-mail and password; on success set the session cookie and go to the inbox."""
    _check_same_origin(request)
    services = get_services(request)
    settings = services.settings
    email = (await _form_text(request, "email", 254)).strip()
    password = await _form_text(request, "password", 1024)
    now = services.clock.now()
    ip = request.client.host if request.client else None
    try:
        token, _user = await staff.login(
            session=session,
            email=email,
            password=password,
            now=now,
            idle=timedelta(minutes=settings.session_idle_minutes),
            absolute=timedelta(hours=settings.session_absolute_hours),
            ip=ip,
            user_agent=request.headers.get("user-agent"),
        )
    except AuthenticationError as exc:
        # One message for unknown e-mail and wrong password alike; throttling says so.
        await staff.record_failed_login(session=session, email=email, ip=ip, now=now)
        await _commit(session)
        throttled = exc.code == "login_throttled"
        return render(
            request,
            "pages/login.html",
            {"email": email, "failed": not throttled, "throttled": throttled},
            status_code=429 if throttled else 401,
        )
    await _commit(session)
    resp = RedirectResponse(request.app.url_path_for("inbox"), status_code=303)
    resp.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=settings.session_absolute_hours * 3600,
        path="/",
        httponly=True,
        secure=settings.cookie_secure,
        samesite="lax",
    )
    return resp


@router.post("/logout", name="logout")
async def logout(
    request: Request, user: CurrentUser = Depends(current_user), session: AsyncSession = DB
) -> Response:
    """End the session and forget the cookie."""
    await check_csrf(request, user)
    await staff.logout(session=session, user=user, now=get_services(request).clock.now())
    await _commit(session)
    resp = RedirectResponse(request.app.url_path_for("login"), status_code=303)
    resp.delete_cookie(
        SESSION_COOKIE,
        path="/",
        httponly=True,
        samesite="lax",
        secure=get_services(request).settings.cookie_secure,
    )
    return resp


@router.post("/lang", name="set_lang")
async def set_lang(request: Request, session: AsyncSession = DB) -> Response:
    """Switch the interface language (a cookie; logged-in users must send their CSRF token)."""
    user = await _optional_user(request, session)
    if user is not None:
        await check_csrf(request, user)
    else:
        _check_same_origin(request)
    lang = await _form_text(request, "lang", 8)
    if lang not in LOCALES:
        raise ValidationError("unknown language")
    await _commit(session)
    resp = RedirectResponse(_safe_next(await _form_text(request, "next", 2000)), status_code=303)
    resp.set_cookie(
        LANG_COOKIE,
        lang,
        max_age=365 * 24 * 3600,
        path="/",
        httponly=True,
        secure=get_services(request).settings.cookie_secure,
        samesite="lax",
    )
    return resp


# -- inbox -----------------------------------------------------------------------------------------


@router.get("/", name="inbox")
async def inbox(
    request: Request,
    deleted: str | None = None,
    user: CurrentUser = Depends(current_user),
    session: AsyncSession = DB,
) -> Response:
    """The conversation list (with a note after a deletion)."""
    ctx = await _sidebar(session, get_services(request), user)
    await _commit(session)
    note = deleted if deleted in ("conversation", "contact") else None
    return render(request, "pages/inbox.html", {**ctx, "active": None, "deleted": note})


@router.get("/partials/conversations", name="conversation_list")
async def conversation_list(
    request: Request,
    active: str | None = None,
    user: CurrentUser = Depends(current_user),
    session: AsyncSession = DB,
) -> Response:
    """The conversation list fragment (with the header counts and channel banner out of band)."""
    ctx = await _sidebar(session, get_services(request), user)
    await _commit(session)
    return render(request, "partials/conversation_list.html", {**ctx, "active": active, "oob": True})


@router.get("/conversations/{conversation_id}", name="conversation")
async def conversation_page(
    request: Request,
    conversation_id: str,
    reply_to: str | None = None,
    user: CurrentUser = Depends(current_user),
    session: AsyncSession = DB,
) -> Response:
    """One conversation; opening it clears its unread count (auditors' reading changes nothing).

    Every opening is audited, the auditor's too (who saw what, DSK I.11).
    """
    services = get_services(request)
    thread = await _thread_context(session, services, user, conversation_id)
    await conv.record_opened(
        session=session,
        org_id=user.org_id,
        conversation_id=conversation_id,
        contact_id=thread["view"].contact_id,
        actor=Actor.staff(user.id),
        now=services.clock.now(),
    )
    if user.role != "auditor":
        await conv.mark_seen(
            session=session,
            org_id=user.org_id,
            conversation_id=conversation_id,
            now=services.clock.now(),
            shown=thread["view"].unread_count,
        )
    ctx = await _sidebar(session, services, user)
    from pforte.web.ui.lifecycle import conversation_extras

    extras = await conversation_extras(session, user, conversation_id, thread["view"].contact_id)
    await _commit(session)
    reply_msg = next((m for m in thread["view"].messages if m.id == reply_to), None)
    return render(
        request,
        "pages/conversation.html",
        {**ctx, **thread, **extras, "active": conversation_id, "reply_to": reply_msg},
    )


@router.get("/conversations/{conversation_id}/messages", name="messages")
async def messages_partial(
    request: Request,
    conversation_id: str,
    seen: bool = False,
    window: str | None = None,
    user: CurrentUser = Depends(current_user),
    session: AsyncSession = DB,
) -> Response:
    """The messages of a conversation (live refresh); ``seen=1`` when the staff member is looking.

    A live refresh (app.js marks it with the background header) shows what the open page already
    showed and is not audited; fetched any other way, the thread counts as opened.
    """
    services = get_services(request)
    thread = await _thread_context(session, services, user, conversation_id)
    if request.headers.get(BACKGROUND_HEADER) != "1":
        await conv.record_opened(
            session=session,
            org_id=user.org_id,
            conversation_id=conversation_id,
            contact_id=thread["view"].contact_id,
            actor=Actor.staff(user.id),
            now=services.clock.now(),
        )
    if seen and user.role != "auditor":
        await conv.mark_seen(
            session=session,
            org_id=user.org_id,
            conversation_id=conversation_id,
            now=services.clock.now(),
            shown=thread["view"].unread_count,
        )
    await _commit(session)
    # The composer is replaced only when the window or the consent state changed, so typed text is not lost.
    stale = window is not None and window != thread["composer_state"]
    return render(
        request, "partials/messages.html", {**thread, "oob": True, "composer_oob": stale, "reply_to": None}
    )


@router.post("/conversations/{conversation_id}/messages", name="send_text")
async def send_text(
    request: Request,
    conversation_id: str,
    user: CurrentUser = Depends(can_send),
    session: AsyncSession = DB,
) -> Response:
    """Queue a free-text reply (optionally quoting a message)."""
    await check_csrf(request, user)
    services = get_services(request)
    text = await _form_text(request, "text", conv.TEXT_LIMIT)  # longer than a channel takes: sent in parts
    reply_to = (await _form_text(request, "reply_to_message_id", 64)).strip() or None
    try:
        await conv.send_text(
            session=session,
            keys=services.keys,
            org_id=user.org_id,
            conversation_id=conversation_id,
            user_id=user.id,
            text=text,
            now=services.clock.now(),
            reply_to_message_id=reply_to,
            client_key=await _client_key(request),
        )
    except conv.DuplicateSubmission:
        pass  # the first submission is queued; show the thread as it is
    return await _after_send(request, session, user, conversation_id)


@router.post("/conversations/{conversation_id}/template", name="send_template")
async def send_template(
    request: Request,
    conversation_id: str,
    user: CurrentUser = Depends(can_send),
    session: AsyncSession = DB,
) -> Response:
    """Queue an approved template with its parameters (works with the window closed)."""
    await check_csrf(request, user)
    services = get_services(request)
    form = await request.form()
    params = [p for p in form.getlist("params") if isinstance(p, str)]
    if any(len(p) > 1024 for p in params):
        raise ValidationError("a template parameter is too long", code="too_long")
    try:
        await conv.send_template(
            session=session,
            keys=services.keys,
            org_id=user.org_id,
            conversation_id=conversation_id,
            user_id=user.id,
            template_id=await _form_text(request, "template_id", 64),
            params=params,
            now=services.clock.now(),
            client_key=await _client_key(request),
        )
    except conv.DuplicateSubmission:
        pass  # the first submission is queued; show the thread as it is
    return await _after_send(request, session, user, conversation_id)


@router.post("/conversations/{conversation_id}/media", name="send_media")
async def send_media(
    request: Request,
    conversation_id: str,
    user: CurrentUser = Depends(can_send),
    session: AsyncSession = DB,
) -> Response:
    """Queue an image or document upload (JPEG, PNG, PDF, plain text)."""
    services = get_services(request)
    limit = services.settings.upload_max_bytes
    with contextlib.suppress(ValueError):
        if int(request.headers.get("content-length", "0")) > limit + 64 * 1024:
            raise PayloadTooLarge("the file is too large", code="too_large")
    await check_csrf(request, user)
    await conv.ensure(session=session, org_id=user.org_id, conversation_id=conversation_id)
    upload = (await request.form()).get("file")
    if not isinstance(upload, UploadFile) or not upload.filename:
        raise ValidationError("choose a file to send", code="empty")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ValidationError("the file is too large", code="too_large")
    mime = (upload.content_type or "").split(";")[0].strip().lower()
    if mime == "image/jpg":
        mime = "image/jpeg"
    try:
        await conv.send_media(
            session=session,
            keys=services.keys,
            blobs=services.blobs,
            org_id=user.org_id,
            conversation_id=conversation_id,
            user_id=user.id,
            data=data,
            mime_type=mime,
            filename=Path(upload.filename).name,
            caption=await _form_text(request, "caption", 2048),
            now=services.clock.now(),
            max_bytes=limit,
            client_key=await _client_key(request),
        )
    except conv.DuplicateSubmission:
        pass  # the first submission is queued; show the thread as it is
    return await _after_send(request, session, user, conversation_id)


@router.post("/conversations/{conversation_id}/messages/{message_id}/review", name="resolve_review")
async def resolve_review(
    request: Request,
    conversation_id: str,
    message_id: str,
    user: CurrentUser = Depends(can_send),
    session: AsyncSession = DB,
) -> Response:
    """A message whose send outcome is unknown: send it again, or mark it as not sent."""
    await check_csrf(request, user)
    services = get_services(request)
    await conv.resolve_review(
        session=session,
        org_id=user.org_id,
        conversation_id=conversation_id,
        message_id=message_id,
        action=await _form_text(request, "action", 16),
        now=services.clock.now(),
    )
    return await _after_send(request, session, user, conversation_id)


# -- attachments -----------------------------------------------------------------------------------

# Shown in the page; everything else is offered as a download only.
INLINE_TYPES = frozenset(
    {
        "image/jpeg",
        "image/png",
        "image/webp",
        "image/gif",
        "video/mp4",
        "video/3gpp",
        "audio/ogg",
        "audio/mpeg",
        "audio/mp4",
        "audio/aac",
        "audio/amr",
    }
)


def _content_disposition(kind: str, filename: str | None, fallback: str) -> str:
    name = (filename or fallback).replace("\r", "").replace("\n", "")
    ascii_name = "".join(c if c.isascii() and c.isprintable() and c not in '"\\;' else "_" for c in name)
    return f"{kind}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name, safe='')}"


@router.get("/attachments/{attachment_id}", name="attachment")
async def attachment(
    request: Request,
    attachment_id: str,
    download: bool = False,
    user: CurrentUser = Depends(current_user),
    session: AsyncSession = DB,
) -> Response:
    """A stored attachment, decrypted, never cached by the browser; every fetch is audited."""
    services = get_services(request)
    data, mime, filename = await conv.read_attachment(
        session=session,
        keys=services.keys,
        blobs=services.blobs,
        org_id=user.org_id,
        attachment_id=attachment_id,
    )
    base = mime.split(";")[0].strip().lower()
    kind = "inline" if base in INLINE_TYPES and not download else "attachment"
    await conv.record_attachment_opened(
        session=session,
        org_id=user.org_id,
        attachment_id=attachment_id,
        disposition="inline" if kind == "inline" else "download",
        actor=Actor.staff(user.id),
        now=services.clock.now(),
    )
    await _commit(session)
    return Response(
        data,
        media_type=mime,
        headers={
            "Content-Disposition": _content_disposition(kind, filename, f"attachment-{attachment_id[-6:]}"),
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'none'; sandbox",
        },
    )


# -- data-subject export ---------------------------------------------------------------------------


@router.post("/conversations/{conversation_id}/export", name="contact_export")
async def contact_export(
    request: Request,
    conversation_id: str,
    user: CurrentUser = Depends(admin_only),
    session: AsyncSession = DB,
) -> Response:
    """This conversation's patient's data as a ZIP download (GDPR Art. 15/20), audited.

    Admins only: an export is the complete, unencrypted history of a patient in one file, the largest
    disclosure the inbox can make, so as few people as possible may make one (and each is audited).
    """
    from fastapi.responses import StreamingResponse

    from pforte.contacts import export as subject_export
    from pforte.contacts import service as contacts
    from pforte.web.ui.render import language

    await check_csrf(request, user)
    services = get_services(request)
    now = services.clock.now()
    contact = await contacts.get_by_conversation(
        session=session, org_id=user.org_id, conversation_id=conversation_id
    )
    export = await subject_export.collect(
        session=session, keys=services.keys, org_id=user.org_id, contact_id=contact.id, now=now
    )
    await subject_export.record(session, export, actor=Actor.staff(user.id), now=now)
    await _commit(session)
    # The archive is produced while it is sent (never on the server's disk), after the commit.
    return StreamingResponse(
        subject_export.stream(export, blobs=services.blobs, lang=language(request), tz=DISPLAY_TZ),
        media_type="application/zip",
        headers={
            "Content-Disposition": _content_disposition("attachment", export.archive_name, "export.zip"),
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'none'; sandbox",
        },
    )


# -- live updates ----------------------------------------------------------------------------------


@router.get("/events", name="events")
async def events(request: Request) -> Response:
    """Server-Sent Events for the logged-in user's organisation (ids only, never content)."""
    return await sse.stream(request)


# -- channel administration ------------------------------------------------------------------------


@router.get("/admin/channels", name="admin_channels")
async def admin_channels(
    request: Request,
    saved: bool = False,
    user: CurrentUser = Depends(admin_only),
    session: AsyncSession = DB,
) -> Response:
    """Channels of the organisation with their state; admins can enter a new access token."""
    ctx = await _sidebar(session, get_services(request), user)
    chans = await channels.list_(session=session, org_id=user.org_id)
    org = await orgs.get(session=session, org_id=user.org_id)
    await _commit(session)
    # II.1: where each channel's encryption ends and how its provider stores content, said plainly.
    honesty = {c.id: (kind_of(c.kind), STORAGE_MODES.get(c.storage_region)) for c in chans}
    return render(
        request,
        "pages/admin_channels.html",
        {
            **ctx,
            "channels": chans,
            "saved": saved,
            "honesty": honesty,
            "own_server_only": orgs.setting(org, "own_server_encryption_only"),
        },
    )


@router.post("/admin/channels/{channel_id}/token", name="channel_token")
async def channel_token(
    request: Request,
    channel_id: str,
    user: CurrentUser = Depends(admin_only),
    session: AsyncSession = DB,
) -> Response:
    """Replace a channel's access token and bring it back UP."""
    await check_csrf(request, user)
    services = get_services(request)
    token = await _form_text(request, "access_token", 4096)
    await channels.update_token(
        session=session,
        keys=services.keys,
        org_id=user.org_id,
        channel_id=channel_id,
        access_token=token,
        now=services.clock.now(),
    )
    await _commit(session)
    services.channels.invalidate(channel_id)
    services.bus.publish(LiveEvent(org_id=user.org_id, type="channel"))
    services.outbox.wake()
    return RedirectResponse(str(request.app.url_path_for("admin_channels")) + "?saved=1", status_code=303)
