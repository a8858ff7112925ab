"""The inbox side of the data lifecycle: deleting, erasing, tags, holds, the privacy page, logins."""

from __future__ import annotations

from sqlalchemy import func, select
from tests.conftest import PNID
from tests.web.test_inbox import HTML, csrf_of, first_conversation_id, htmx, patient_writes

from pforte.audit.models import AuditEvent
from pforte.contacts.models import Contact
from pforte.conversations.models import Message
from pforte.deletion.models import Tombstone
from pforte.retention.models import Hold


async def _count(world, model, *where) -> int:
    async with world.services.db.transaction() as s:
        return int((await s.execute(select(func.count()).select_from(model).where(*where))).scalar_one())


async def _as(world, email):
    await world.login(email)
    return csrf_of((await world.client.get("/", headers=HTML)).text)


async def test_admin_deletes_a_message_from_the_thread(world):
    await patient_writes(world, "Bitte löschen")
    await patient_writes(world, "Bitte behalten")
    token = await _as(world, world.admin_email)
    cid = await first_conversation_id(world)
    async with world.services.db.transaction() as s:
        mid = (
            (
                await s.execute(
                    select(Message.id).where(Message.direction == "in").order_by(Message.created_at)
                )
            )
            .scalars()
            .first()
        )
    page = await world.client.get(f"/conversations/{cid}", headers=HTML)
    assert f"/conversations/{cid}/messages/{mid}/delete" in page.text
    r = await world.client.post(
        f"/conversations/{cid}/messages/{mid}/delete", data={"csrf_token": token}, headers=htmx(token)
    )
    assert r.status_code == 200
    assert "Bitte löschen" not in r.text and "Bitte behalten" in r.text
    assert await _count(world, Tombstone, Tombstone.object_id == mid) == 1
    assert await _count(world, AuditEvent, AuditEvent.action == "message.delete") == 1


async def test_staff_may_tag_but_not_delete_or_hold(world):
    await patient_writes(world, "Hallo")
    token = await _as(world, world.staff_email)
    cid = await first_conversation_id(world)
    page = await world.client.get(f"/conversations/{cid}", headers=HTML)
    assert "/delete" not in page.text and "/holds" not in page.text
    r = await world.client.post(f"/conversations/{cid}/delete", data={"csrf_token": token, "confirm": "yes"})
    assert r.status_code == 403
    r = await world.client.post(
        f"/conversations/{cid}/holds", data={"csrf_token": token, "target": "contact"}
    )
    assert r.status_code == 403
    r = await world.client.post(
        f"/conversations/{cid}/tags", data={"csrf_token": token, "tags": "Befund, Labor"}
    )
    assert r.status_code == 303
    page = await world.client.get(f"/conversations/{cid}", headers=HTML)
    assert 'value="befund, labor"' in page.text
    assert await _count(world, Message) == 1


async def test_admin_holds_then_erasure_is_refused_until_released(world):
    await patient_writes(world, "Akte")
    token = await _as(world, world.admin_email)
    cid = await first_conversation_id(world)
    r = await world.client.post(
        f"/conversations/{cid}/holds", data={"csrf_token": token, "target": "contact"}
    )
    assert r.status_code == 303
    page = await world.client.get(f"/conversations/{cid}", headers=HTML)
    assert "data-hold-id" in page.text
    refused = await world.client.post(
        f"/conversations/{cid}/erase-contact",
        data={"csrf_token": token, "confirm": "yes", "reason": "erasure_request"},
    )
    assert refused.status_code == 409 and "legal" in refused.text
    assert await _count(world, Contact, Contact.erased_at.is_(None)) == 1
    async with world.services.db.transaction() as s:
        hold_id = (await s.execute(select(Hold.id))).scalar_one()
    r = await world.client.post(f"/conversations/{cid}/holds/{hold_id}/release", data={"csrf_token": token})
    assert r.status_code == 303
    missing_confirm = await world.client.post(
        f"/conversations/{cid}/erase-contact", data={"csrf_token": token}
    )
    assert missing_confirm.status_code == 400
    done = await world.client.post(
        f"/conversations/{cid}/erase-contact",
        data={"csrf_token": token, "confirm": "yes", "reason": "erasure_request"},
    )
    assert done.status_code == 303 and done.headers["location"].endswith("?deleted=contact")
    assert await _count(world, Contact) == 0 and await _count(world, Message) == 0
    inbox = await world.client.get("/?deleted=contact", headers=HTML)
    assert "Akte" not in inbox.text


async def test_privacy_page_lists_metadata_and_shows_retention_off_as_a_deviation(world):
    token = await _as(world, world.admin_email)
    page = await world.client.get("/admin/privacy", headers=HTML)
    assert page.status_code == 200
    for cls in ("delivery_timestamps", "webhook_metadata", "job_records", "session_network", "failed_logins"):
        assert f'data-metadata-class="{cls}"' in page.text
    assert "Abweichung" not in page.text
    r = await world.client.post("/admin/privacy/retention", data={"csrf_token": token, "days": "90"})
    assert r.status_code == 303
    page = await world.client.get("/admin/privacy", headers=HTML)
    assert "weicht" in page.text and 'value="90"' in page.text  # German: "Das weicht … ab"
    bad = await world.client.post(
        "/admin/privacy/metadata", data={"csrf_token": token, "delivery_timestamps": "x"}
    )
    assert bad.status_code == 400
    await world.login(world.staff_email)
    assert (await world.client.get("/admin/privacy", headers=HTML)).status_code == 403


async def test_failed_logins_are_throttled_and_audited(world):
    for _ in range(5):
        r = await world.client.post("/login", data={"email": world.staff_email, "password": "falsch-falsch"})
        assert r.status_code == 401
    r = await world.login()  # the right password, but too many failures just now
    assert r.status_code == 429 and "login_throttled" in r.text
    assert await _count(world, AuditEvent, AuditEvent.action == "login.failure") == 6
    assert await _count(world, AuditEvent, AuditEvent.action == "login.success") == 0


async def test_a_reply_form_sent_twice_queues_one_message(world):
    """The composer's one-time key: a browser resending after a lost answer does not double-send."""
    await patient_writes(world, "Wann ist mein Termin?")
    token = await _as(world, world.staff_email)
    cid = await first_conversation_id(world)
    page = await world.client.get(f"/conversations/{cid}", headers=HTML)
    key = page.text.split('name="client_key" value="', 1)[1].split('"', 1)[0]
    assert len(key) >= 20
    form = {"csrf_token": token, "text": "Morgen um 9 Uhr", "client_key": key}
    first = await world.client.post(f"/conversations/{cid}/messages", data=form, headers=htmx(token))
    again = await world.client.post(f"/conversations/{cid}/messages", data=form, headers=htmx(token))
    assert first.status_code == again.status_code == 200
    assert await _count(world, Message, Message.direction == "out") == 1
    form["client_key"] = key + "x"  # the next message has a new key
    await world.client.post(f"/conversations/{cid}/messages", data=form, headers=htmx(token))
    assert await _count(world, Message, Message.direction == "out") == 2
    await world.settle()
    assert len(world.sim.business_messages(PNID)) == 2  # the simulator got each message once
