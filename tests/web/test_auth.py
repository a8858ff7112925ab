"""Login, logout, CSRF, session expiry, roles and language through the ASGI app (SQLite and PostgreSQL)."""

from __future__ import annotations

import re
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select, update

from pforte.conversations.models import Message
from pforte.staff import service as staff
from pforte.staff.models import StaffSession

PNID = "106540352242922"
PASSWORD = "correct horse battery"
HTML = {"accept": "text/html"}


def csrf_of(html: str) -> str:
    """The CSRF token a page carries in its meta tag."""
    found = re.search(r'<meta name="csrf-token" content="([^"]*)"', html)
    assert found, "page has no csrf meta tag"
    return found.group(1)


async def open_conversation(world) -> tuple[str, str]:
    """The patient writes, staff logs in and opens the conversation: (conversation id, csrf token)."""
    await world.sim.patient_send_text(user=world.patient, phone_number_id=PNID, text="Guten Morgen")
    await world.settle()
    assert (await world.login()).status_code == 303
    inbox = await world.client.get("/", headers=HTML)
    conversation_id = re.search(r'data-conversation-id="(\w+)"', inbox.text).group(1)
    page = await world.client.get(f"/conversations/{conversation_id}", headers=HTML)
    assert page.status_code == 200
    return conversation_id, csrf_of(page.text)


@pytest.mark.dsk("I.2")
async def test_login_sets_a_strict_session_cookie(world):
    resp = await world.login()
    assert resp.status_code == 303
    assert resp.headers["location"] == "/"
    cookie = resp.headers["set-cookie"]
    assert cookie.startswith("pforte_session=")
    flags = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in flags
    assert "secure" in flags
    assert "samesite=lax" in flags
    assert "path=/" in flags
    inbox = await world.client.get("/", headers=HTML)
    assert inbox.status_code == 200
    assert "Dr. Weiss" in inbox.text


async def test_wrong_password_and_unknown_user_get_the_same_error_and_no_session(world):
    await world.client.get("/login")
    wrong = await world.client.post(
        "/login", data={"email": world.staff_email, "password": "not the password"}
    )
    unknown = await world.client.post("/login", data={"email": "nobody@klinikum.test", "password": PASSWORD})
    for resp in (wrong, unknown):
        assert resp.status_code == 401
        assert "pforte_session" not in resp.headers.get("set-cookie", "")
    error = re.compile(r'<p class="error"[^>]*>(.*?)</p>', re.S)
    assert error.search(wrong.text).group(1) == error.search(unknown.text).group(1)
    assert "E-Mail-Adresse oder Passwort ist falsch." in wrong.text
    assert "pforte_session" not in world.client.cookies
    assert (await world.client.get("/", headers=HTML)).headers["location"] == "/login"


async def test_login_from_another_origin_is_refused(world):
    # Under Referrer-Policy: no-referrer browsers send "Origin: null"; Sec-Fetch-Site tells the truth.
    for headers in ({"origin": "null", "sec-fetch-site": "cross-site"}, {"sec-fetch-site": "same-site"}):
        resp = await world.client.post(
            "/login", data={"email": world.staff_email, "password": PASSWORD}, headers=headers
        )
        assert resp.status_code == 403
    ok = await world.client.post(
        "/login",
        data={"email": world.staff_email, "password": PASSWORD},
        headers={"origin": "null", "sec-fetch-site": "same-origin"},
    )
    assert ok.status_code == 303
    resp = await world.client.post(
        "/login",
        data={"email": world.staff_email, "password": PASSWORD},
        headers={"origin": "https://evil.example"},
    )
    assert resp.status_code == 403
    assert "pforte_session" not in resp.headers.get("set-cookie", "")


@pytest.mark.dsk("I.2")
async def test_logout_ends_the_session(world):
    await world.login()
    page = await world.client.get("/", headers=HTML)
    token = world.client.cookies["pforte_session"]
    refused = await world.client.post("/logout", data={}, headers=HTML)
    assert refused.status_code == 403
    assert (await world.client.get("/", headers=HTML)).status_code == 200
    resp = await world.client.post("/logout", data={"csrf_token": csrf_of(page.text)})
    assert resp.status_code == 303
    assert resp.headers["location"] == "/login"
    assert "pforte_session" not in world.client.cookies
    # The old cookie is worthless now, even if someone kept a copy.
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=world.app),
        base_url="https://testserver",
        cookies={"pforte_session": token},
    ) as other:
        assert (await other.get("/", headers=HTML)).headers["location"] == "/login"


async def test_send_without_or_with_wrong_csrf_is_refused_and_nothing_is_sent(world):
    conversation_id, token = await open_conversation(world)
    url = f"/conversations/{conversation_id}/messages"
    missing = await world.client.post(url, data={"text": "no token"})
    wrong = await world.client.post(url, data={"text": "wrong token", "csrf_token": "x" * len(token)})
    wrong_header = await world.client.post(
        url, data={"text": "wrong header"}, headers={"x-csrf-token": "nope"}
    )
    cross = await world.client.post(
        url, data={"text": "cross", "csrf_token": token}, headers={"origin": "https://evil.example"}
    )
    for resp in (missing, wrong, wrong_header, cross):
        assert resp.status_code == 403
        assert resp.json()["error"] == "csrf"
    await world.settle()
    async with world.services.db.transaction() as s:
        outgoing = (await s.execute(select(Message).where(Message.direction == "out"))).scalars().all()
    assert outgoing == []
    assert world.sim.business_messages(PNID) == []
    ok = await world.client.post(url, data={"text": "with token", "csrf_token": token})
    assert ok.status_code == 303
    await world.settle()
    assert [m.text for m in world.sim.business_messages(PNID)] == ["with token"]


@pytest.mark.dsk("I.2")
async def test_idle_session_expires(world):
    await world.login()
    assert (await world.client.get("/", headers=HTML)).status_code == 200
    idle = timedelta(minutes=world.services.settings.session_idle_minutes + 1)
    async with world.services.db.transaction() as s:
        await s.execute(update(StaffSession).values(last_seen_at=world.services.clock.now() - idle))
    resp = await world.client.get("/", headers=HTML)
    assert resp.status_code == 303
    assert resp.headers["location"] == "/login"
    api = await world.client.get("/partials/conversations", headers={"hx-request": "true"})
    assert api.status_code == 401
    # Still refused later (activity after expiry does not revive the session).
    assert (await world.client.get("/", headers=HTML)).status_code == 303


async def test_german_by_default_and_english_on_request(world):
    de = await world.client.get("/login", headers={"accept-language": "de-DE,de;q=0.9"})
    en = await world.client.get("/login", headers={"accept-language": "en-US,en;q=0.8"})
    other = await world.client.get("/login", headers={"accept-language": "fr-FR"})
    assert '<html lang="de">' in de.text and "Passwort" in de.text and "Anmelden" in de.text
    assert '<html lang="en">' in en.text and "Password" in en.text and "Passwort" not in en.text
    assert '<html lang="de">' in other.text
    switched = await world.client.post("/lang", data={"lang": "en", "next": "/login"})
    assert switched.status_code == 303 and switched.headers["location"] == "/login"
    assert "Password" in (await world.client.get("/login")).text
    evil = await world.client.post("/lang", data={"lang": "en", "next": "//evil.example/"})
    assert evil.headers["location"] == "/"


async def test_auditor_reads_but_cannot_send(world):
    conversation_id, _ = await open_conversation(world)
    async with world.services.db.transaction() as s:
        await staff.create(
            session=s,
            org_id=world.org_id,
            email="audit@klinikum.test",
            display_name="Audit",
            password=PASSWORD,
            role="auditor",
            now=world.services.clock.now(),
        )
    await world.client.post("/logout", data={"csrf_token": csrf_of((await world.client.get("/")).text)})
    await world.login("audit@klinikum.test")
    page = await world.client.get(f"/conversations/{conversation_id}", headers=HTML)
    assert page.status_code == 200
    assert "Guten Morgen" in page.text
    assert 'name="text"' not in page.text
    token = csrf_of(page.text)
    for path, data in (
        (f"/conversations/{conversation_id}/messages", {"text": "hi"}),
        (f"/conversations/{conversation_id}/template", {"template_id": world.template_id}),
        ("/admin/channels/x/token", {"access_token": "t"}),
    ):
        resp = await world.client.post(path, data={**data, "csrf_token": token})
        assert resp.status_code == 403, path
    assert (await world.client.get("/admin/channels", headers=HTML)).status_code == 403
    await world.settle()
    assert world.sim.business_messages(PNID) == []
