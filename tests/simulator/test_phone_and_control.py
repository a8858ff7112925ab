"""The patient phone page, its JSON/partial endpoints, and the control API."""

from __future__ import annotations

import re

import pytest
from simkit import PNID, Env

pytestmark = pytest.mark.asyncio

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
JSON = {"Accept": "application/json"}


async def test_phone_page_renders_without_inline_code(env: Env) -> None:
    response = await env.client.get("/phone")
    assert response.status_code == 200
    html = response.text
    assert "Patienten-Telefon" in html
    assert "Änne Müller" in html
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)
    assert "<style" not in html and "style=" not in html and " on" + "click" not in html
    assert "/_sim/static/phone.js" in html
    assert (await env.client.get("/_sim/static/phone.js")).status_code == 200
    assert (await env.client.get("/_sim/static/phone.css")).status_code == 200


async def test_phone_chat_escapes_and_shows_both_sides(env: Env) -> None:
    await env.send_text("<b>Befund</b> ist da")
    params = {"user": env.patient.user_id, "number": PNID}
    page = await env.client.get("/phone", params=params)
    assert "&lt;b&gt;Befund&lt;/b&gt; ist da" in page.text
    assert "<b>Befund</b>" not in page.text
    assert "Hallo Praxis" in page.text
    partial = await env.client.get("/phone/chat", params=params)
    assert partial.status_code == 200
    assert partial.text.strip().startswith('<ol class="messages">')
    data = (await env.client.get("/phone/api/chat", params=params)).json()
    assert data["window_open"] is True
    assert [(m["mine"], m["text"]) for m in data["messages"]] == [
        (True, "Hallo Praxis"),
        (False, "<b>Befund</b> ist da"),
    ]


async def test_phone_send_text_photo_and_read(env: Env) -> None:
    wamid = (await env.send_text("Bitte Foto schicken")).json()["messages"][0]["id"]
    form = {"user": env.patient.user_id, "number": PNID}
    read = await env.client.post("/phone/read", data=form, headers=JSON)
    assert read.json() == {"read": [wamid]}
    sent = await env.client.post("/phone/send", data=form | {"text": "Kommt gleich"}, headers=JSON)
    assert sent.status_code == 200
    photo = await env.client.post(
        "/phone/photo",
        data=form | {"caption": "Knie"},
        files={"photo": ("knie.png", PNG, "image/png")},
        headers=JSON,
    )
    assert photo.status_code == 200, photo.text
    await env.sim.drain()
    assert env.receiver.statuses(wamid)[-1]["status"] == "read"
    text, image = env.receiver.messages()
    assert text["text"]["body"] == "Kommt gleich"
    assert (image["type"], image["image"]["caption"], image["image"]["mime_type"]) == (
        "image",
        "Knie",
        "image/png",
    )
    chat = (await env.client.get("/phone/api/chat", params=form)).json()["messages"]
    assert chat[-1]["image_url"].startswith("/phone/media/")
    assert (await env.client.get(chat[-1]["image_url"])).content == PNG
    redirect = await env.client.post("/phone/send", data=form | {"text": "ohne JS"})
    assert redirect.status_code == 303
    assert redirect.headers["location"].startswith("/phone?user=")


async def test_phone_reply_button_and_create_user(env: Env) -> None:
    body = {
        "messaging_product": "whatsapp",
        "to": f"+{env.patient.wa_id}",
        "type": "interactive",
        "interactive": {
            "type": "button",
            "body": {"text": "Termin morgen?"},
            "action": {"buttons": [{"type": "reply", "reply": {"id": "ok", "title": "Passt"}}]},
        },
    }
    wamid = (await env.send(body)).json()["messages"][0]["id"]
    params = {"user": env.patient.user_id, "number": PNID}
    page = await env.client.get("/phone", params=params)
    assert ">Passt</button>" in page.text
    reply = await env.client.post(
        "/phone/reply",
        headers=JSON,
        data=params | {"context_id": wamid, "reply_id": "ok", "title": "Passt", "kind": "button_reply"},
    )
    assert reply.status_code == 200
    await env.sim.drain()
    message = env.receiver.messages()[-1]
    assert message["interactive"]["button_reply"] == {"id": "ok", "title": "Passt"}
    assert message["context"]["id"] == wamid

    created = await env.client.post(
        "/phone/users", data={"name": "Neu", "phone": "+49 170 1111111", "number": PNID}, headers=JSON
    )
    user = created.json()["user"]
    assert (user["name"], user["wa_id"]) == ("Neu", "491701111111")
    assert user["user_id"].startswith("DE.")
    bad = await env.client.post("/phone/send", data={"user": "DE.nobody", "number": PNID, "text": "x"})
    assert bad.status_code == 400


async def test_control_api_roundtrip(env: Env) -> None:
    number = await env.client.post(
        "/_sim/numbers",
        json={
            "phone_number_id": "555",
            "display_phone_number": "+49 40 555",
            "access_token": "tok2",
            "app_secret": "sec2",
            "webhook_url": "https://pforte.test/hook2",
            "verify_token": "v2",
        },
    )
    assert number.status_code == 201
    assert "access_token" not in number.json() and "app_secret" not in number.json()
    template = await env.client.post(
        "/_sim/templates",
        json={"phone_number_id": "555", "name": "hallo", "language": "de", "body": "Hallo {{1}}"},
    )
    assert template.json()["param_count"] == 1
    user = (await env.client.post("/_sim/users", json={"name": "Ctl", "wa_id": "491709999"})).json()
    sent = await env.client.post(
        f"/_sim/users/{user['user_id']}/send", json={"phone_number_id": "555", "text": "Hallo aus der API"}
    )
    assert sent.status_code == 201
    reply = await env.client.post(
        "/v23.0/555/messages",
        headers={"Authorization": "Bearer tok2"},
        json={
            "messaging_product": "whatsapp",
            "to": "+491709999",
            "type": "text",
            "text": {"body": "Antwort"},
        },
    )
    assert reply.status_code == 200
    listed = (await env.client.get("/_sim/numbers/555/messages")).json()
    assert [(m["type"], m["text"], m["status"]) for m in listed] == [("text", "Antwort", "sent")]
    assert (await env.client.get("/_sim/numbers/nope/messages")).status_code == 404
    assert (await env.client.post("/_sim/users", json={})).status_code == 400
    await env.sim.drain()
    hooks = (await env.client.get("/_sim/webhooks")).json()
    assert {h["phone_number_id"] for h in hooks} >= {"555"}
    assert all(h["state"] == "delivered" for h in hooks)
    assert all(len(h["attempted_at"]) == len(h["status_codes"]) >= 1 for h in hooks)


async def test_lifespan_starts_and_stops_delivery_loop() -> None:
    from pforte.channels.simulator import SimulatorConfig, create_simulator_app

    app = create_simulator_app(SimulatorConfig())
    sim = app.state.sim
    assert not sim.queue.running
    async with app.router.lifespan_context(app):
        assert sim.queue.running
    assert not sim.queue.running
