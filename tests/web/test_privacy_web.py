"""The privacy notice pages, the consent state on the conversation page, channel honesty (I.1, II.1)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from tests.conftest import PNID
from tests.web.test_inbox import HTML, csrf_of, first_conversation_id, htmx, patient_writes

from pforte.audit.service import CLI
from pforte.conversations.models import Message
from pforte.orgs import service as orgs
from pforte.privacy import service as privacy
from pforte.privacy.models import PrivacyNotice


async def _as(world, email):
    await world.login(email)
    return csrf_of((await world.client.get("/", headers=HTML)).text)


async def _versions(world) -> int:
    async with world.services.db.transaction() as s:
        return int((await s.execute(select(func.count()).select_from(PrivacyNotice))).scalar_one())


async def _publish(world, de: str, en: str) -> None:
    async with world.services.db.transaction() as s:
        await privacy.publish_notice(
            s, org_id=world.org_id, body_de=de, body_en=en, actor=CLI, now=world.services.clock.now()
        )


@pytest.mark.dsk("I.1")
async def test_the_public_notice_needs_no_login_and_keeps_every_version(world):
    """[I.1] reachable at any time at a public address, in German and English."""
    assert (await world.client.get("/privacy/klinikum", headers=HTML)).status_code == 404
    await _publish(world, "Erste Fassung <b>ohne</b> HTML.", "First version.")
    await _publish(world, "Zweite Fassung.", "Second version.")
    page = await world.client.get("/privacy/klinikum", headers=HTML)
    assert page.status_code == 200
    assert "Zweite Fassung." in page.text and "Fassung 2" in page.text  # German by default
    assert "WhatsApp Business Platform" in page.text and "Meta Platforms Ireland" in page.text
    en = await world.client.get("/privacy/klinikum?lang=en", headers=HTML)
    assert "Second version." in en.text
    old = await world.client.get("/privacy/klinikum?version=1", headers=HTML)
    assert "Erste Fassung &lt;b&gt;ohne&lt;/b&gt; HTML." in old.text and "frühere Fassung" in old.text
    assert (await world.client.get("/privacy/unbekannt", headers=HTML)).status_code == 404
    assert (await world.client.get("/privacy/klinikum?version=9", headers=HTML)).status_code == 404


@pytest.mark.dsk("I.1")
async def test_every_staff_page_links_to_the_notice(world):
    await _publish(world, "Hinweis.", "Notice.")
    await _as(world, world.staff_email)
    inbox = await world.client.get("/", headers=HTML)
    assert 'href="/privacy"' in inbox.text
    r = await world.client.get("/privacy", headers=HTML)
    assert r.status_code == 303 and r.headers["location"] == "/privacy/klinikum"


async def test_admins_publish_a_new_version_and_bad_input_changes_nothing(world):
    token = await _as(world, world.admin_email)
    page = await world.client.get("/admin/privacy-notice", headers=HTML)
    assert page.status_code == 200 and "Vorlage" in page.text  # a template to adapt, not yet published
    r = await world.client.post(
        "/admin/privacy-notice",
        data={"csrf_token": token, "body_de": "Unser Hinweis.", "body_en": "Our notice."},
    )
    assert r.status_code == 303 and await _versions(world) == 1
    same = await world.client.post(
        "/admin/privacy-notice",
        data={"csrf_token": token, "body_de": "Unser Hinweis.", "body_en": "Our notice."},
        headers=htmx(token),
    )
    assert same.status_code == 409
    empty = await world.client.post(
        "/admin/privacy-notice",
        data={"csrf_token": token, "body_de": " ", "body_en": "x"},
        headers=htmx(token),
    )
    assert empty.status_code == 400
    no_csrf = await world.client.post("/admin/privacy-notice", data={"body_de": "A", "body_en": "B"})
    assert no_csrf.status_code == 403
    assert await _versions(world) == 1


async def test_staff_cannot_edit_the_notice(world):
    token = await _as(world, world.staff_email)
    assert (await world.client.get("/admin/privacy-notice", headers=HTML)).status_code == 403
    r = await world.client.post(
        "/admin/privacy-notice",
        data={"csrf_token": token, "body_de": "A", "body_en": "B"},
        headers=htmx(token),
    )
    assert r.status_code == 403 and await _versions(world) == 0


async def test_the_conversation_shows_consent_and_the_composer_says_why_it_is_blocked(world):
    async with world.services.db.transaction() as s:
        await orgs.update_settings(
            session=s,
            org_id=world.org_id,
            changes={"consent_required": True},
            actor=CLI,
            now=world.services.clock.now(),
        )
    await _publish(world, "Hinweis.", "Notice.")
    await patient_writes(world, "Hallo")
    token = await _as(world, world.staff_email)
    cid = await first_conversation_id(world)
    page = await world.client.get(f"/conversations/{cid}", headers=HTML)
    assert 'id="consent-state"' in page.text and "Einwilligung angefragt" in page.text
    assert 'data-send-block="consent_pending"' in page.text
    assert 'name="text"' not in page.text  # no reply form while blocked
    r = await world.client.post(
        f"/conversations/{cid}/messages", data={"csrf_token": token, "text": "Befund"}, headers=htmx(token)
    )
    assert r.status_code == 409
    async with world.services.db.transaction() as s:
        staff_rows = (
            await s.execute(select(func.count()).where(Message.sender_user_id.is_not(None)))
        ).scalar_one()
    assert staff_rows == 0
    req = [m for m in world.sim.business_messages(PNID) if m.interactive][-1]
    await world.sim.patient_send_interactive_reply(
        user=world.patient,
        phone_number_id=PNID,
        context_id=req.wamid,
        reply_id="pforte:consent:yes:1",
        title="Ja",
    )
    await world.settle()
    page = await world.client.get(f"/conversations/{cid}", headers=HTML)
    assert "Einwilligung erteilt" in page.text and 'name="text"' in page.text


@pytest.mark.dsk("II.1")
async def test_the_channels_page_says_where_encryption_ends(world):
    """[II.1] the WhatsApp Cloud API ends encryption at Meta, said plainly with the storage mode."""
    await _as(world, world.admin_email)
    page = await world.client.get("/admin/channels", headers=HTML)
    assert 'data-encryption-ends="provider"' in page.text
    assert "Meta Platforms Ireland" in page.text and "Standardspeicherung" in page.text
    async with world.services.db.transaction() as s:
        await orgs.update_settings(
            session=s,
            org_id=world.org_id,
            changes={"own_server_encryption_only": True},
            actor=CLI,
            now=world.services.clock.now(),
        )
    page = await world.client.get("/admin/channels", headers=HTML)
    assert "kann das Team deshalb nichts senden" in page.text
