"""The "Export patient data (Art. 15)" button: admins download a ZIP, audited; others get 403/404."""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile

import pytest
from sqlalchemy import select
from tests.integration.test_subject_export import IMAGE, MARKUP, REPLY, patient_story
from tests.web.test_inbox import HTML, csrf_of

from pforte.audit import service as audit
from pforte.audit.service import Actor
from pforte.deletion import service as deletion
from pforte.staff.models import StaffUser


async def export_entries(world):
    async with world.services.db.transaction() as s:
        return await audit.list_(s, org_id=world.org_id, action="contact.export")


async def page_token(world, conversation_id: str) -> tuple[str, str]:
    page = await world.client.get(f"/conversations/{conversation_id}", headers=HTML)
    assert page.status_code == 200
    return page.text, csrf_of(page.text)


async def test_admin_downloads_the_export_and_it_is_audited(world):
    story = await patient_story(world)
    await world.login(world.admin_email)
    html, token = await page_token(world, story.conversation_id)
    action = f"/conversations/{story.conversation_id}/export"
    assert re.search(rf'<form method="post" action="{action}"[^>]*>', html)
    assert "Patientendaten exportieren (Art. 15)" in html
    resp = await world.client.post(action, data={"csrf_token": token}, headers=HTML)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/zip"
    assert resp.headers["cache-control"] == "no-store"
    disposition = resp.headers["content-disposition"]
    assert disposition.startswith(f'attachment; filename="patient-export-{story.contact_id}-')
    assert "Erika" not in disposition and "4915112345678" not in disposition
    zf = zipfile.ZipFile(io.BytesIO(resp.content))
    assert zf.testzip() is None
    doc = json.loads(zf.read("data.json"))
    texts = [m["text"] for m in doc["conversations"][0]["messages"]]
    assert MARKUP in texts and REPLY in texts and len(texts) == 6
    [image] = [
        a for m in doc["conversations"][0]["messages"] for a in m["attachments"] if a["kind"] == "image"
    ]
    assert zf.read(image["path"]) == IMAGE and image["sha256"] == hashlib.sha256(IMAGE).hexdigest()
    transcript = zf.read("transcript.html").decode()
    assert "&lt;script&gt;" in transcript and "<script" not in transcript
    assert "Export der Patientendaten" in transcript  # the admin's browser asks for German

    async with world.services.db.transaction() as s:
        admin_id = (
            await s.execute(select(StaffUser.id).where(StaffUser.email == world.admin_email))
        ).scalar_one()
    [entry] = await export_entries(world)
    assert (entry.actor_kind, entry.actor_id) == ("staff", admin_id)
    assert (entry.object_kind, entry.object_id) == ("contact", story.contact_id)
    assert entry.details == {"messages": 6, "attachments": 2}


async def test_the_transcript_is_in_the_users_language(world):
    story = await patient_story(world)
    await world.login(world.admin_email)
    _, token = await page_token(world, story.conversation_id)
    switched = await world.client.post(
        "/lang", data={"lang": "en", "next": "/", "csrf_token": token}, headers=HTML
    )
    assert switched.status_code == 303
    resp = await world.client.post(
        f"/conversations/{story.conversation_id}/export", data={"csrf_token": token}, headers=HTML
    )
    assert resp.status_code == 200
    zf = zipfile.ZipFile(io.BytesIO(resp.content))
    assert "Patient data export" in zf.read("transcript.html").decode()
    assert json.loads(zf.read("data.json"))["language"] == "en"


async def test_staff_see_no_button_and_get_403(world):
    story = await patient_story(world)
    await world.login()  # the staff user
    html, token = await page_token(world, story.conversation_id)
    assert "/export" not in html and "Patientendaten exportieren" not in html
    resp = await world.client.post(
        f"/conversations/{story.conversation_id}/export", data={"csrf_token": token}, headers=HTML
    )
    assert resp.status_code == 403
    assert 'data-error-code="forbidden"' in resp.text
    assert await export_entries(world) == []


async def test_export_without_the_csrf_token_is_refused(world):
    story = await patient_story(world)
    await world.login(world.admin_email)
    resp = await world.client.post(f"/conversations/{story.conversation_id}/export", data={}, headers=HTML)
    assert resp.status_code == 403
    assert await export_entries(world) == []


async def test_another_organisations_admin_gets_404(world):
    story = await patient_story(world)
    await world.add_other_org("admin@andere.test", role="admin")
    await world.login("admin@andere.test")
    token = csrf_of((await world.client.get("/", headers=HTML)).text)
    resp = await world.client.post(
        f"/conversations/{story.conversation_id}/export", data={"csrf_token": token}, headers=HTML
    )
    assert resp.status_code == 404
    assert "Erika" not in resp.text and "PK\x03\x04" not in resp.text
    assert await export_entries(world) == []


@pytest.mark.dsk("I.7")
async def test_an_erased_patient_cannot_be_exported(world):
    story = await patient_story(world)
    await world.login(world.admin_email)
    _, token = await page_token(world, story.conversation_id)
    async with world.services.db.transaction() as s:
        await deletion.erase_contact(
            s,
            world.services.eraser,
            org_id=world.org_id,
            contact_id=story.contact_id,
            actor=Actor.staff(world.staff_id),
            reason="erasure_request",
            now=world.services.clock.now(),
        )
    resp = await world.client.post(
        f"/conversations/{story.conversation_id}/export", data={"csrf_token": token}, headers=HTML
    )
    assert resp.status_code == 404
    assert await export_entries(world) == []
