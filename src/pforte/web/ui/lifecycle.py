"""Inbox routes for the data lifecycle: delete, erase, tag, hold, and the privacy settings page.

Deleting and holds are for admins; tagging is for everyone who may write. Each route runs in the
request's transaction, records its audit entry there (inside the services) and commits before it
answers, like the other inbox routes.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy.ext.asyncio import AsyncSession

from pforte.audit.service import Actor
from pforte.deletion import service as deletion
from pforte.errors import ValidationError
from pforte.events import LiveEvent
from pforte.orgs import service as orgs
from pforte.retention import service as retention
from pforte.retention import sweeper
from pforte.retention.service import METADATA_CLASSES
from pforte.staff.service import CurrentUser
from pforte.web.deps import DB, check_csrf, get_services
from pforte.web.ui.render import render
from pforte.web.ui.routes import _commit, _form_text, _htmx, _sidebar, _thread_context, admin_only, can_send

router = APIRouter()


def _reason(value: str) -> str:
    return value if value in ("staff", "erasure_request") else "staff"


async def conversation_extras(
    session: AsyncSession, user: CurrentUser, conversation_id: str, contact_id: str
) -> dict[str, Any]:
    """Tags and active holds shown on the conversation page."""
    holds = await retention.holds(session, org_id=user.org_id, target_ids=[conversation_id, contact_id])
    return {
        "tags": await retention.tags_of(session, conversation_id),
        "holds": holds,
        "can_delete": user.role == "admin",
    }


async def _thread_or_redirect(
    request: Request, session: AsyncSession, user: CurrentUser, conversation_id: str
) -> Response:
    services = get_services(request)
    await _commit(session)
    services.bus.publish(LiveEvent(org_id=user.org_id, type="conversation", conversation_id=conversation_id))
    if not _htmx(request):
        return RedirectResponse(
            request.app.url_path_for("conversation", conversation_id=conversation_id), status_code=303
        )
    async with services.db.transaction() as fresh:
        ctx = await _thread_context(fresh, services, user, conversation_id)
    return render(request, "partials/messages.html", ctx)


@router.post("/conversations/{conversation_id}/messages/{message_id}/delete", name="delete_message")
async def delete_message(
    request: Request,
    conversation_id: str,
    message_id: str,
    user: CurrentUser = Depends(admin_only),
    session: AsyncSession = DB,
) -> Response:
    """Delete one message (and its attachments) for good."""
    await check_csrf(request, user)
    services = get_services(request)
    await deletion.delete_message(
        session,
        services.eraser,
        org_id=user.org_id,
        message_id=message_id,
        actor=Actor.staff(user.id),
        reason="staff",
        now=services.clock.now(),
    )
    return await _thread_or_redirect(request, session, user, conversation_id)


@router.post("/conversations/{conversation_id}/attachments/{attachment_id}/delete", name="delete_attachment")
async def delete_attachment(
    request: Request,
    conversation_id: str,
    attachment_id: str,
    user: CurrentUser = Depends(admin_only),
    session: AsyncSession = DB,
) -> Response:
    """Delete one attachment's file; the message shows that it was deleted."""
    await check_csrf(request, user)
    services = get_services(request)
    await deletion.delete_attachment(
        session,
        services.eraser,
        org_id=user.org_id,
        attachment_id=attachment_id,
        actor=Actor.staff(user.id),
        reason="staff",
        now=services.clock.now(),
    )
    return await _thread_or_redirect(request, session, user, conversation_id)


@router.post("/conversations/{conversation_id}/delete", name="delete_conversation")
async def delete_conversation(
    request: Request,
    conversation_id: str,
    user: CurrentUser = Depends(admin_only),
    session: AsyncSession = DB,
) -> Response:
    """Delete the whole conversation; the patient stays (other conversations, new messages)."""
    await check_csrf(request, user)
    services = get_services(request)
    if await _form_text(request, "confirm", 8) != "yes":
        raise ValidationError("please confirm that the conversation is to be deleted")
    await deletion.delete_conversation(
        session,
        services.eraser,
        org_id=user.org_id,
        conversation_id=conversation_id,
        actor=Actor.staff(user.id),
        reason=_reason(await _form_text(request, "reason", 32)),
        now=services.clock.now(),
    )
    await _commit(session)
    services.bus.publish(LiveEvent(org_id=user.org_id, type="conversation", conversation_id=conversation_id))
    return RedirectResponse(str(request.app.url_path_for("inbox")) + "?deleted=conversation", status_code=303)


@router.post("/conversations/{conversation_id}/erase-contact", name="erase_contact")
async def erase_contact(
    request: Request,
    conversation_id: str,
    user: CurrentUser = Depends(admin_only),
    session: AsyncSession = DB,
) -> Response:
    """Erase the patient of this conversation (Art. 17): key destroyed now, rows removed right after."""
    await check_csrf(request, user)
    services = get_services(request)
    if await _form_text(request, "confirm", 8) != "yes":
        raise ValidationError("please confirm that the patient's data is to be erased")
    thread = await _thread_context(session, services, user, conversation_id)
    await deletion.erase_contact(
        session,
        services.eraser,
        org_id=user.org_id,
        contact_id=thread["view"].contact_id,
        actor=Actor.staff(user.id),
        reason=_reason(await _form_text(request, "reason", 32)),
        now=services.clock.now(),
    )
    await _commit(session)
    await sweeper.purge_erased(services.db, services.eraser, report=sweeper.SweepReport())
    services.bus.publish(LiveEvent(org_id=user.org_id, type="conversation", conversation_id=conversation_id))
    return RedirectResponse(str(request.app.url_path_for("inbox")) + "?deleted=contact", status_code=303)


@router.post("/conversations/{conversation_id}/tags", name="set_tags")
async def set_tags(
    request: Request, conversation_id: str, user: CurrentUser = Depends(can_send), session: AsyncSession = DB
) -> Response:
    """Replace the conversation's tags (comma-separated)."""
    await check_csrf(request, user)
    services = get_services(request)
    raw = await _form_text(request, "tags", 1400)
    await retention.set_tags(
        session,
        org_id=user.org_id,
        conversation_id=conversation_id,
        tags=raw.split(","),
        actor=Actor.staff(user.id),
        now=services.clock.now(),
    )
    await _commit(session)
    return RedirectResponse(
        request.app.url_path_for("conversation", conversation_id=conversation_id), status_code=303
    )


@router.post("/conversations/{conversation_id}/holds", name="place_hold")
async def place_hold(
    request: Request,
    conversation_id: str,
    user: CurrentUser = Depends(admin_only),
    session: AsyncSession = DB,
) -> Response:
    """Place a legal hold on the conversation or on the patient."""
    await check_csrf(request, user)
    services = get_services(request)
    target = await _form_text(request, "target", 16)
    thread = await _thread_context(session, services, user, conversation_id)
    target_id = thread["view"].contact_id if target == "contact" else conversation_id
    await retention.place_hold(
        session,
        org_id=user.org_id,
        target_kind="contact" if target == "contact" else "conversation",
        target_id=target_id,
        kind="legal",
        actor=Actor.staff(user.id),
        now=services.clock.now(),
    )
    await _commit(session)
    return RedirectResponse(
        request.app.url_path_for("conversation", conversation_id=conversation_id), status_code=303
    )


@router.post("/conversations/{conversation_id}/holds/{hold_id}/release", name="release_hold")
async def release_hold(
    request: Request,
    conversation_id: str,
    hold_id: str,
    user: CurrentUser = Depends(admin_only),
    session: AsyncSession = DB,
) -> Response:
    """Release a hold."""
    await check_csrf(request, user)
    services = get_services(request)
    await retention.release_hold(
        session, org_id=user.org_id, hold_id=hold_id, actor=Actor.staff(user.id), now=services.clock.now()
    )
    await _commit(session)
    return RedirectResponse(
        request.app.url_path_for("conversation", conversation_id=conversation_id), status_code=303
    )


# -- the privacy settings page ---------------------------------------------------------------------


@router.get("/admin/privacy", name="admin_privacy")
async def privacy_page(
    request: Request, saved: bool = False, user: CurrentUser = Depends(admin_only), session: AsyncSession = DB
) -> Response:
    """Retention, metadata kept and for how long, and the latest deletions (ids and reasons only)."""
    services = get_services(request)
    ctx = await _sidebar(session, services, user)
    org = await orgs.get(session=session, org_id=user.org_id)
    policy = await retention.load_policy(session, user.org_id)
    rules = await retention.rules(session, user.org_id)
    due = await sweeper.plan(session, user.org_id, services.clock.now(), limit=1000)
    tombs = await deletion.tombstones(session, org_id=user.org_id, limit=50)
    s = services.settings
    meta = dict(orgs.setting(org, "metadata_days"))
    await _commit(session)
    metadata_rows = [
        {"name": name, "days": meta.get(name, 7), "editable": True} for name in METADATA_CLASSES
    ] + [
        {"name": "session_network", "days": s.session_metadata_days, "editable": False},
        {"name": "failed_logins", "days": s.failed_login_days, "editable": False},
    ]
    return render(
        request,
        "pages/admin_privacy.html",
        {
            **ctx,
            "policy": policy,
            "rules": rules,
            "due_count": sum(1 for i in due if i.goes),
            "held_count": sum(1 for i in due if i.holds),
            "metadata_rows": metadata_rows,
            "tombstones": tombs,
            "saved": saved,
        },
    )


@router.post("/admin/privacy/retention", name="save_retention")
async def save_retention(
    request: Request, user: CurrentUser = Depends(admin_only), session: AsyncSession = DB
) -> Response:
    """Switch retention on or off and set the default number of days."""
    await check_csrf(request, user)
    services = get_services(request)
    enabled = await _form_text(request, "enabled", 8) == "on"
    raw_days = (await _form_text(request, "days", 8)).strip()
    if not raw_days.isdigit():
        raise ValidationError("the retention period must be a whole number of days")
    await retention.set_org_retention(
        session,
        org_id=user.org_id,
        enabled=enabled,
        days=int(raw_days),
        actor=Actor.staff(user.id),
        now=services.clock.now(),
    )
    await _commit(session)
    return RedirectResponse(str(request.app.url_path_for("admin_privacy")) + "?saved=1", status_code=303)


@router.post("/admin/privacy/metadata", name="save_metadata")
async def save_metadata(
    request: Request, user: CurrentUser = Depends(admin_only), session: AsyncSession = DB
) -> Response:
    """Set the days each class of metadata is kept."""
    await check_csrf(request, user)
    services = get_services(request)
    values = {}
    for name in METADATA_CLASSES:
        raw = (await _form_text(request, name, 8)).strip()
        if not raw.isdigit():
            raise ValidationError("each period must be a whole number of days")
        values[name] = int(raw)
    await retention.set_metadata_days(
        session, org_id=user.org_id, values=values, actor=Actor.staff(user.id), now=services.clock.now()
    )
    await _commit(session)
    return RedirectResponse(str(request.app.url_path_for("admin_privacy")) + "?saved=1", status_code=303)
