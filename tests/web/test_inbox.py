"""The staff inbox through the ASGI app, with the WhatsApp simulator on the other side (SQLite and PG)."""

from __future__ import annotations

import asyncio
import re
import zlib
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import select, update

from pforte.channels import service as channels
from pforte.conversations.models import Conversation, Message
from pforte.web.ui import sse

PNID = "106540352242922"
PASSWORD = "correct horse battery"
HTML = {"accept": "text/html"}


def csrf_of(html: str) -> str:
    """The CSRF token a page carries in its meta tag."""
    return re.search(r'<meta name="csrf-token" content="([^"]*)"', html).group(1)


def htmx(token: str) -> dict[str, str]:
    """Headers htmx sends (with the CSRF header app.js adds)."""
    return {"hx-request": "true", "x-csrf-token": token, "accept": "text/html"}


def png(width: int = 2, height: int = 2) -> bytes:
    """A small valid PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x02\x00\x00\x00"
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


async def patient_writes(world, text: str) -> None:
    await world.sim.patient_send_text(user=world.patient, phone_number_id=PNID, text=text)
    await world.settle()


async def first_conversation_id(world) -> str:
    inbox = await world.client.get("/", headers=HTML)
    assert inbox.status_code == 200
    return re.search(r'<li class="conv[^"]*" data-conversation-id="(\w+)"', inbox.text).group(1)


async def open_page(world, conversation_id: str) -> httpx.Response:
    page = await world.client.get(f"/conversations/{conversation_id}", headers=HTML)
    assert page.status_code == 200
    return page


def message_statuses(html: str) -> list[str]:
    return re.findall(
        r'class="msg msg-out[^"]*"\s+id="msg-\w+" data-message-id="\w+" data-status="(\w+)"', html
    )


async def test_patient_message_is_listed_unread_and_opening_clears_it(world):
    await patient_writes(world, "Ich habe eine Frage zum Termin")
    await world.login()
    inbox = await world.client.get("/", headers=HTML)
    assert "Erika Mustermann" in inbox.text
    assert "Station 3" in inbox.text
    assert 'data-unread="1"' in inbox.text
    assert re.search(r'data-count="unread">Ungelesen <b>1</b>', inbox.text)
    conversation_id = await first_conversation_id(world)
    page = await open_page(world, conversation_id)
    assert "Ich habe eine Frage zum Termin" in page.text
    assert "24-Stunden-Fenster offen bis" in page.text
    after = await world.client.get("/", headers=HTML)
    assert "data-unread=" not in after.text
    assert re.search(r'data-count="unread">Ungelesen <b>0</b>', after.text)
    partial = await world.client.get("/partials/conversations", headers={"hx-request": "true"})
    assert partial.status_code == 200
    assert "<html" not in partial.text
    assert 'id="counts" class="counts" hx-swap-oob="true"' in partial.text


async def test_reply_is_sent_and_shows_delivered_then_read(world):
    await patient_writes(world, "Hallo")
    await world.login()
    conversation_id = await first_conversation_id(world)
    token = csrf_of((await open_page(world, conversation_id)).text)
    sent = await world.client.post(
        f"/conversations/{conversation_id}/messages", data={"text": "Wir rufen Sie an."}, headers=htmx(token)
    )
    assert sent.status_code == 200
    assert "<html" not in sent.text and "Wir rufen Sie an." in sent.text
    assert message_statuses(sent.text) == ["queued"]
    await world.settle()
    got = world.sim.business_messages(PNID, world.patient)
    assert [(m.type, m.text) for m in got] == [("text", "Wir rufen Sie an.")]
    page = await open_page(world, conversation_id)
    assert message_statuses(page.text) == ["delivered"]
    assert "tick-delivered" in page.text
    await world.sim.patient_read(user=world.patient, phone_number_id=PNID)
    await world.settle()
    page = await open_page(world, conversation_id)
    assert message_statuses(page.text) == ["read"]
    assert 'class="tick tick-read"' in page.text
    listed = await world.client.get("/", headers=HTML)
    assert 'data-last-status="read"' in listed.text


async def test_reply_quotes_the_message_it_answers(world):
    await patient_writes(world, "Wann ist mein Termin?")
    await world.login()
    conversation_id = await first_conversation_id(world)
    page = await open_page(world, conversation_id)
    quoted = re.search(r'data-reply-to="(\w+)"', page.text).group(1)
    with_reply = await world.client.get(f"/conversations/{conversation_id}?reply_to={quoted}", headers=HTML)
    assert f'name="reply_to_message_id" value="{quoted}"' in with_reply.text
    resp = await world.client.post(
        f"/conversations/{conversation_id}/messages",
        headers=htmx(csrf_of(page.text)),
        data={"text": "Am Montag.", "reply_to_message_id": quoted},
    )
    assert resp.status_code == 200
    assert (
        '<blockquote class="quote"><span class="sr">Antwort auf:</span>Wann ist mein Termin?</blockquote>'
        in resp.text
    )
    await world.settle()
    [sent] = world.sim.business_messages(PNID, world.patient)
    assert sent.context_id is not None


async def test_the_outbox_is_woken_after_the_commit(world):
    """With a 60 s poll interval, only a wake after the commit makes the send happen within seconds."""
    await patient_writes(world, "Hallo")
    world.services.outbox.poll = 60.0
    await world.services.outbox.start()
    await world.login()
    conversation_id = await first_conversation_id(world)
    await asyncio.sleep(0.2)  # let the worker finish its first round and go to sleep
    token = csrf_of((await open_page(world, conversation_id)).text)
    resp = await world.client.post(
        f"/conversations/{conversation_id}/messages", data={"text": "Sofort bitte", "csrf_token": token}
    )
    assert resp.status_code == 303
    for _ in range(100):
        if world.sim.business_messages(PNID):
            break
        await asyncio.sleep(0.05)
    assert [m.text for m in world.sim.business_messages(PNID)] == ["Sofort bitte"]


async def test_patient_markup_is_shown_as_text(world):
    await patient_writes(world, "<script>alert(1)</script> und <b>fett</b>")
    await world.login()
    page = await open_page(world, await first_conversation_id(world))
    assert "&lt;script&gt;alert(1)&lt;/script&gt; und &lt;b&gt;fett&lt;/b&gt;" in page.text
    assert "<script>alert(1)" not in page.text
    assert "<b>fett</b>" not in page.text


async def test_closed_window_refuses_free_text_and_offers_templates(world):
    await patient_writes(world, "Hallo")
    await world.login()
    conversation_id = await first_conversation_id(world)
    async with world.services.db.transaction() as s:
        await s.execute(
            update(Conversation)
            .where(Conversation.id == conversation_id)
            .values(last_inbound_at=world.services.clock.now() - timedelta(hours=25))
        )
    page = await open_page(world, conversation_id)
    token = csrf_of(page.text)
    assert "24-Stunden-Fenster geschlossen" in page.text
    assert 'data-window="closed"' in page.text
    assert 'name="text"' not in page.text
    assert re.search(r'<textarea id="reply-text-disabled"[^>]*disabled', page.text)
    assert 'data-template="termin_erinnerung"' in page.text
    refused = await world.client.post(
        f"/conversations/{conversation_id}/messages", data={"text": "Freitext"}, headers=htmx(token)
    )
    assert refused.status_code == 409
    assert 'data-error-code="needs_template"' in refused.text
    assert "Bitte verwenden Sie eine freigegebene Vorlage." in refused.text
    missing = await world.client.post(
        f"/conversations/{conversation_id}/template",
        data={"template_id": world.template_id, "params": ""},
        headers=htmx(token),
    )
    assert missing.status_code == 400
    assert 'data-error-code="template_params"' in missing.text
    ok = await world.client.post(
        f"/conversations/{conversation_id}/template",
        data={"template_id": world.template_id, "params": "Frau Mustermann"},
        headers=htmx(token),
    )
    assert ok.status_code == 200
    assert "Guten Tag Frau Mustermann, bitte melden Sie sich bei uns." in ok.text
    await world.settle()
    sent = world.sim.business_messages(PNID, world.patient)
    assert [m.type for m in sent] == ["template"]
    assert sent[0].template["name"] == "termin_erinnerung"
    async with world.services.db.transaction() as s:
        types = (await s.execute(select(Message.type).where(Message.direction == "out"))).scalars().all()
    assert types == ["template"]
    # The live refresh swaps the composer in when the window state it knows is out of date.
    partial = await world.client.get(
        f"/conversations/{conversation_id}/messages?window=open", headers={"hx-request": "true"}
    )
    assert 'id="composer" class="composer" data-window="closed" hx-swap-oob="true"' in partial.text
    same = await world.client.get(
        f"/conversations/{conversation_id}/messages?window=closed", headers={"hx-request": "true"}
    )
    assert 'id="composer"' not in same.text


async def test_patient_image_is_stored_and_served(world):
    image = png()
    await world.sim.patient_send_media(
        user=world.patient,
        phone_number_id=PNID,
        kind="image",
        data=image,
        mime_type="image/png",
        caption="Mein Ausschlag",
    )
    await world.settle()
    await world.login()
    page = await open_page(world, await first_conversation_id(world))
    assert 'data-attachment-state="stored"' in page.text
    assert "Mein Ausschlag" in page.text
    attachment_id = re.search(r'<img src="/attachments/(\w+)"', page.text).group(1)
    resp = await world.client.get(f"/attachments/{attachment_id}")
    assert resp.status_code == 200
    assert resp.content == image
    assert resp.headers["content-type"] == "image/png"
    assert resp.headers["cache-control"] == "no-store"
    assert resp.headers["content-disposition"].startswith("inline;")
    download = await world.client.get(f"/attachments/{attachment_id}?download=1")
    assert download.headers["content-disposition"].startswith("attachment;")


async def test_staff_sends_a_file_and_wrong_types_are_refused(world):
    await patient_writes(world, "Bitte schicken Sie mir den Befund")
    await world.login()
    conversation_id = await first_conversation_id(world)
    token = csrf_of((await open_page(world, conversation_id)).text)
    url = f"/conversations/{conversation_id}/media"
    bad = await world.client.post(
        url, headers=htmx(token), files={"file": ("x.html", b"<html></html>", "text/html")}
    )
    assert bad.status_code == 400
    assert 'data-error-code="media_type"' in bad.text
    empty = await world.client.post(url, headers=htmx(token), files={"file": ("leer.txt", b"", "text/plain")})
    assert 'data-error-code="empty"' in empty.text
    ok = await world.client.post(
        url,
        headers=htmx(token),
        data={"caption": "Ihr Befund"},
        files={"file": ("befund.pdf", b"%PDF-1.4 test", "application/pdf")},
    )
    assert ok.status_code == 200
    assert "befund.pdf" in ok.text
    await world.settle()
    [sent] = world.sim.business_messages(PNID, world.patient)
    assert sent.type == "document"


async def test_review_message_can_be_marked_as_not_sent(world):
    await patient_writes(world, "Hallo")
    await world.login()
    conversation_id = await first_conversation_id(world)
    token = csrf_of((await open_page(world, conversation_id)).text)
    await world.client.post(
        f"/conversations/{conversation_id}/messages", data={"text": "Unklar?"}, headers=htmx(token)
    )
    async with world.services.db.transaction() as s:
        await s.execute(
            update(Message)
            .where(Message.direction == "out")
            .values(status="review", review_reason="outcome_unknown")
        )
    page = await open_page(world, conversation_id)
    assert message_statuses(page.text) == ["review"]
    assert re.search(r'data-count="review">Zu prüfen <b>1</b>', page.text)
    message_id = re.search(r"/messages/(\w+)/review", page.text).group(1)
    resp = await world.client.post(
        f"/conversations/{conversation_id}/messages/{message_id}/review",
        data={"action": "discard"},
        headers=htmx(token),
    )
    assert resp.status_code == 200
    assert message_statuses(resp.text) == ["failed"]
    assert "Nach Prüfung als nicht gesendet markiert." in resp.text


async def test_failure_reason_is_shown_in_words(world):
    await patient_writes(world, "Hallo")
    await world.login()
    conversation_id = await first_conversation_id(world)
    token = csrf_of((await open_page(world, conversation_id)).text)
    await world.client.post(
        f"/conversations/{conversation_id}/messages", data={"text": "x"}, headers=htmx(token)
    )
    async with world.services.db.transaction() as s:
        await s.execute(
            update(Message)
            .where(Message.direction == "out")
            .values(status="failed", error_reason="undeliverable", error_code=131026)
        )
    page = await open_page(world, conversation_id)
    assert message_statuses(page.text) == ["failed"]
    assert "WhatsApp konnte die Nachricht an diese Nummer nicht zustellen" in page.text


async def test_another_organisation_gets_404(world):
    await world.sim.patient_send_media(
        user=world.patient, phone_number_id=PNID, kind="image", data=png(), mime_type="image/png"
    )
    await world.settle()
    await world.login()
    conversation_id = await first_conversation_id(world)
    page = await open_page(world, conversation_id)
    attachment_id = re.search(r'<img src="/attachments/(\w+)"', page.text).group(1)
    await world.add_other_org("b@praxis.test", role="admin")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=world.app), base_url="https://testserver"
    ) as c:
        await c.get("/login")
        assert (
            await c.post("/login", data={"email": "b@praxis.test", "password": PASSWORD})
        ).status_code == 303
        inbox = await c.get("/", headers=HTML)
        assert "Erika" not in inbox.text
        token = csrf_of(inbox.text)
        for path in (
            f"/conversations/{conversation_id}",
            f"/conversations/{conversation_id}/messages",
            f"/attachments/{attachment_id}",
        ):
            assert (await c.get(path, headers=HTML)).status_code == 404, path
        for path, data in (
            (f"/conversations/{conversation_id}/messages", {"text": "fremd"}),
            (f"/conversations/{conversation_id}/template", {"template_id": world.template_id, "params": "x"}),
            (f"/admin/channels/{world.channel_id}/token", {"access_token": "stolen"}),
        ):
            assert (await c.post(path, data={**data, "csrf_token": token})).status_code == 404, path
    await world.settle()
    assert world.sim.business_messages(PNID) == []


async def test_admin_sees_a_down_channel_and_enters_a_new_token(world):
    async with world.services.db.transaction() as s:
        await channels.set_state(
            session=s,
            channel_id=world.channel_id,
            state="DOWN",
            reason="channel_down:190",
            now=world.services.clock.now(),
        )
    await world.login()
    staff_inbox = await world.client.get("/", headers=HTML)
    assert "Kanal „Station 3“ ist zurzeit gestört." in staff_inbox.text
    assert "Fehler 190" not in staff_inbox.text
    assert (await world.client.get("/admin/channels", headers=HTML)).status_code == 403
    await world.client.post("/logout", data={"csrf_token": csrf_of(staff_inbox.text)})
    await world.login(world.admin_email)
    inbox = await world.client.get("/", headers=HTML)
    assert "Kanal „Station 3“ ist gestört." in inbox.text
    assert "WhatsApp hat den Zugriffstoken abgelehnt (Fehler 190)" in inbox.text
    admin = await world.client.get("/admin/channels", headers=HTML)
    assert admin.status_code == 200
    assert "gestört" in admin.text
    resp = await world.client.post(
        f"/admin/channels/{world.channel_id}/token",
        data={"access_token": "new-token", "csrf_token": csrf_of(admin.text)},
    )
    assert resp.status_code == 303
    async with world.services.db.transaction() as s:
        runtime = await channels.runtime(session=s, keys=world.services.keys, channel_id=world.channel_id)
    assert (runtime.state, runtime.access_token) == ("UP", "new-token")
    assert "ist gestört" not in (await world.client.get("/", headers=HTML)).text


# -- live updates ----------------------------------------------------------------------------------


class Stream:
    """GET /events driven at the ASGI level (httpx's ASGI transport would buffer the endless body)."""

    def __init__(self, app: Any, cookie: str) -> None:
        self.app = app
        self.cookie = cookie
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.gone = asyncio.Event()
        self.buffer = ""
        self.task: asyncio.Task[None] | None = None

    async def open(self) -> dict[str, Any]:
        asked = False

        async def receive() -> dict[str, Any]:
            nonlocal asked
            if not asked:
                asked = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await self.gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            await self.messages.put(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "https",
            "path": "/events",
            "raw_path": b"/events",
            "query_string": b"",
            "root_path": "",
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 443),
            "headers": [
                (b"host", b"testserver"),
                (b"accept", b"text/event-stream"),
                (b"cookie", f"pforte_session={self.cookie}".encode()),
            ],
        }
        self.task = asyncio.create_task(self.app(scope, receive, send))
        return await asyncio.wait_for(self.messages.get(), 5)

    async def read_until(self, needle: str, timeout: float = 5.0) -> str:
        async def _read() -> str:
            while needle not in self.buffer:
                message = await self.messages.get()
                self.buffer += message.get("body", b"").decode()
            return self.buffer

        return await asyncio.wait_for(_read(), timeout)

    async def close(self) -> None:
        self.gone.set()
        await asyncio.wait_for(self.task, 5)


def live_subscribers(world) -> float:
    return world.services.metrics.registry.get_sample_value("pforte_live_subscribers") or 0.0


async def test_event_stream_reports_a_new_patient_message(world):
    await world.login()
    stream = Stream(world.app, world.client.cookies["pforte_session"])
    start = await stream.open()
    assert start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream")
    await stream.read_until(": connected")
    assert live_subscribers(world) == 1.0
    await patient_writes(world, "Live?")
    text = await stream.read_until("event: conversation")
    async with world.services.db.transaction() as s:
        conversation_id = (await s.execute(select(Conversation.id))).scalar_one()
    assert f'event: conversation\ndata: {{"conversation_id": "{conversation_id}"}}\n\n' in text
    assert "Live?" not in text  # ids only, never content
    await stream.close()
    assert live_subscribers(world) == 0.0


async def test_event_stream_is_org_scoped_heartbeats_and_ends_with_the_session(world, monkeypatch):
    monkeypatch.setattr(sse, "HEARTBEAT_SECONDS", 0.2)
    await world.add_other_org("b@praxis.test", role="staff")
    await world.login("b@praxis.test")
    stream = Stream(world.app, world.client.cookies["pforte_session"])
    await stream.open()
    await patient_writes(world, "Nicht für Praxis B")
    text = await stream.read_until(": heartbeat")
    assert "event: conversation" not in text
    page = await world.client.get("/", headers=HTML)
    await world.client.post("/logout", data={"csrf_token": csrf_of(page.text)})
    await stream.read_until("event: logout")
    await stream.close()
    assert live_subscribers(world) == 0.0


async def test_event_stream_needs_a_session(world):
    resp = await world.client.get("/events", headers={"accept": "text/event-stream"})
    assert resp.status_code == 401
