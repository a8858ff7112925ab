"""The patient phone page: a person plays the patient in a browser.

Server-rendered (Jinja2, autoescape); ``static/phone.js`` polls the chat partial every second and
posts forms with fetch. Plain form posts work without JavaScript too (303 back to the page).
Opening the chat (and sending from it) marks business messages read, which emits status webhooks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.datastructures import UploadFile

from pforte.channels.simulator.state import MEDIA_KINDS, SimMessage, Simulator, SimUser, media_kind_for

TEMPLATES_DIR = Path(__file__).parent / "templates"
MAX_PATIENT_TEXT = 65536
_STATUS_LABEL = {"received": "✓", "read": "✓✓ gelesen (read)"}


def build_phone_router(sim: Simulator) -> APIRouter:
    """Routes under /phone bound to this simulator."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)), autoescape=True)
    templates = Jinja2Templates(env=env)
    router = APIRouter(prefix="/phone")

    def pick(user_id: str | None, pnid: str | None) -> tuple[SimUser | None, str | None]:
        user = sim.users.get(user_id) if user_id else None
        if pnid not in sim.numbers:
            pnid = next(iter(sim.numbers), None) if len(sim.numbers) == 1 else None
        return user, pnid

    def page_url(request: Request, user: SimUser | None, pnid: str | None) -> str:
        query = {k: v for k, v in (("user", user.user_id if user else None), ("number", pnid)) if v}
        base = str(request.url_for("phone_page").path)
        return f"{base}?{urlencode(query)}" if query else base

    def view(request: Request, message: SimMessage) -> dict[str, Any]:
        mine = message.direction == "in"
        media_url = (
            str(request.url_for("phone_media", media_id=message.media_id).path) if message.media_id else None
        )
        options: list[dict[str, str]] = []
        if not mine and message.interactive:
            kind = "list_reply" if message.interactive.get("type") == "list" else "button_reply"
            options = [
                {"id": o["id"], "title": o["title"], "kind": kind} for o in message.interactive["options"]
            ]
        if not mine and message.template:
            template = sim.number(message.phone_number_id).templates.get(
                (message.template["name"], message.template["language"])
            )
            if template is not None:
                options = [{"id": q, "title": q, "kind": "button"} for q in template.quick_replies]
        is_image = bool(message.mime_type and message.mime_type.startswith("image/"))
        status = ""
        if mine:
            status = _STATUS_LABEL["read"] if message.read_by_business else _STATUS_LABEL["received"]
        elif message.status == "failed":
            status = "nicht zugestellt (not delivered)"
        return {
            "wamid": message.wamid,
            "mine": mine,
            "type": message.type,
            "text": message.text or "",
            "image_url": media_url if is_image else None,
            "file_url": media_url if media_url and not is_image else message.link,
            "filename": message.filename or "Anhang (attachment)",
            "time": message.created.strftime("%H:%M"),
            "status": status,
            "failed": message.status == "failed",
            "is_reply": bool(message.context_id) and message.type != "reaction",
            "options": options,
        }

    def chat_views(request: Request, user: SimUser, pnid: str) -> list[dict[str, Any]]:
        return [view(request, m) for m in sim.conversation(pnid, user)]

    def wants_json(request: Request) -> bool:
        return "application/json" in request.headers.get("accept", "")

    async def form_target(request: Request) -> tuple[Any, SimUser, str]:
        form = await request.form(max_files=2, max_fields=20)
        user = sim.users.get(str(form.get("user", "")))
        pnid = str(form.get("number", ""))
        if user is None or pnid not in sim.numbers:
            raise PhoneFormError("Unbekannte Patient:in oder Nummer (unknown patient or number)")
        return form, user, pnid

    def done(request: Request, user: SimUser, pnid: str, data: dict[str, Any]) -> Response:
        if wants_json(request):
            return JSONResponse(data)
        return RedirectResponse(page_url(request, user, pnid), status_code=303)

    @router.get("", name="phone_page", response_class=HTMLResponse)
    async def phone_page(request: Request, user: str | None = None, number: str | None = None) -> Response:
        sim_user, pnid = pick(user, number)
        context: dict[str, Any] = {
            "users": list(sim.users.values()),
            "numbers": list(sim.numbers.values()),
            "user": sim_user,
            "number": sim.numbers.get(pnid) if pnid else None,
            "messages": chat_views(request, sim_user, pnid) if sim_user and pnid else [],
        }
        if sim_user and pnid:
            query = urlencode({"user": sim_user.user_id, "number": pnid})
            context["chat_url"] = f"{request.url_for('phone_chat').path}?{query}"
            context["window_open"] = sim.window_open(pnid, sim_user.user_id)
            context["chat_user_id"] = sim_user.user_id
            context["chat_pnid"] = pnid
        return templates.TemplateResponse(request, "phone.html", context)

    @router.get("/chat", name="phone_chat", response_class=HTMLResponse)
    async def phone_chat(request: Request, user: str, number: str) -> Response:
        sim_user, pnid = pick(user, number)
        if sim_user is None or pnid is None:
            return HTMLResponse("", status_code=404)
        return templates.TemplateResponse(
            request,
            "_chat.html",
            {
                "messages": chat_views(request, sim_user, pnid),
                "chat_user_id": sim_user.user_id,
                "chat_pnid": pnid,
            },
        )

    @router.get("/api/chat", name="phone_api_chat")
    async def phone_api_chat(request: Request, user: str, number: str) -> JSONResponse:
        sim_user, pnid = pick(user, number)
        if sim_user is None or pnid is None:
            return JSONResponse({"detail": "unknown patient or number"}, status_code=404)
        return JSONResponse(
            {
                "user": sim_user.public(),
                "phone_number_id": pnid,
                "window_open": sim.window_open(pnid, sim_user.user_id),
                "messages": chat_views(request, sim_user, pnid),
            }
        )

    @router.post("/users", name="phone_create_user")
    async def phone_create_user(request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=10)
        name = str(form.get("name", "")).strip()[:80]
        if not name:
            return JSONResponse({"detail": "name is required"}, status_code=400)
        phone = str(form.get("phone", "")).strip() or None
        username = str(form.get("username", "")).strip()[:35] or None
        if phone and not any(ch.isdigit() for ch in phone):
            return JSONResponse({"detail": "phone must contain digits"}, status_code=400)
        user = sim.add_user(name=name, wa_id=phone, username=username)
        pnid = str(form.get("number", "")) or None
        _, pnid = pick(None, pnid)
        return done(request, user, pnid or "", {"user": user.public()})

    @router.post("/send", name="phone_send")
    async def phone_send(request: Request) -> Response:
        form, user, pnid = await form_target(request)
        text = str(form.get("text", "")).strip()
        if not text or len(text) > MAX_PATIENT_TEXT:
            return JSONResponse({"detail": "text is required"}, status_code=400)
        await sim.patient_read(user=user, phone_number_id=pnid)
        wamid = await sim.patient_send_text(user=user, phone_number_id=pnid, text=text)
        return done(request, user, pnid, {"wamid": wamid})

    @router.post("/photo", name="phone_photo")
    async def phone_photo(request: Request) -> Response:
        form, user, pnid = await form_target(request)
        upload = form.get("photo")
        if not isinstance(upload, UploadFile):
            return JSONResponse({"detail": "photo is required"}, status_code=400)
        data = await upload.read()
        mime = (upload.content_type or "").split(";")[0].strip().lower()
        kind = media_kind_for(mime)
        if not data or kind not in MEDIA_KINDS:
            return JSONResponse({"detail": "unsupported file type"}, status_code=400)
        caption = str(form.get("caption", "")).strip() or None
        await sim.patient_read(user=user, phone_number_id=pnid)
        wamid = await sim.patient_send_media(
            user=user,
            phone_number_id=pnid,
            kind=kind,  # type: ignore[arg-type]
            data=data,
            mime_type=mime,
            filename=upload.filename,
            caption=caption,
        )
        return done(request, user, pnid, {"wamid": wamid})

    @router.post("/reply", name="phone_reply")
    async def phone_reply(request: Request) -> Response:
        form, user, pnid = await form_target(request)
        context_id = str(form.get("context_id", ""))
        reply_id, title = str(form.get("reply_id", "")), str(form.get("title", ""))
        kind = str(form.get("kind", "button_reply"))
        target = sim.message(context_id)
        if target is None or target.direction != "out" or not reply_id or not title:
            return JSONResponse({"detail": "unknown message or option"}, status_code=400)
        await sim.patient_read(user=user, phone_number_id=pnid)
        if kind == "button":
            wamid = await sim.patient_send_button(
                user=user, phone_number_id=pnid, context_id=context_id, text=title, payload=reply_id
            )
        else:
            wamid = await sim.patient_send_interactive_reply(
                user=user,
                phone_number_id=pnid,
                context_id=context_id,
                reply_id=reply_id,
                title=title,
                kind="list_reply" if kind == "list_reply" else "button_reply",
            )
        return done(request, user, pnid, {"wamid": wamid})

    @router.post("/read", name="phone_read")
    async def phone_read(request: Request) -> Response:
        _, user, pnid = await form_target(request)
        read = await sim.patient_read(user=user, phone_number_id=pnid)
        return done(request, user, pnid, {"read": read})

    @router.get("/media/{media_id}", name="phone_media")
    async def phone_media(media_id: str) -> Response:
        media = sim.media_bytes(media_id)
        if media is None:
            return Response("Not Found", status_code=404, media_type="text/plain")
        headers = {
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'",
        }
        if not media.mime_type.startswith("image/"):
            headers["Content-Disposition"] = "attachment"
        return Response(media.data, media_type=media.mime_type, headers=headers)

    return router


class PhoneFormError(Exception):
    """A bad form post from the phone page."""


def phone_error_response(exc: PhoneFormError) -> JSONResponse:
    """400 for a form naming an unknown patient or number."""
    return JSONResponse({"detail": str(exc)}, status_code=400)
