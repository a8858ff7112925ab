"""Privacy notice and consent in the chat (DSK I.1, Art. 9(2)(a)), on SQLite and PostgreSQL.

The patient is the simulator's; every answer goes through real signed webhooks, the ingest, the
privacy job and the outbox, and comes back to the simulator as a WhatsApp message.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update
from tests.conftest import PNID

from pforte.audit.models import AuditEvent
from pforte.audit.service import CLI
from pforte.contacts.models import Contact
from pforte.conversations import service as conv
from pforte.conversations.models import Conversation, Message
from pforte.orgs import service as orgs
from pforte.outbox.models import Job
from pforte.privacy import service as privacy
from pforte.privacy.models import ConsentEvent
from pforte.privacy.service import ConsentBlockedError

NOTICE_DE = "Verantwortlich ist das Klinikum Test. Wir verarbeiten Ihre Nachrichten zur Behandlung."
NOTICE_EN = "The controller is Klinikum Test. We process your messages for your treatment."


async def _privacy_on(world, *, publish: bool = True, **settings) -> None:
    async with world.services.db.transaction() as s:
        await orgs.update_settings(
            session=s,
            org_id=world.org_id,
            changes={"consent_required": True, **settings},
            actor=CLI,
            now=world.services.clock.now(),
        )
        if publish:
            await privacy.publish_notice(
                s,
                org_id=world.org_id,
                body_de=NOTICE_DE,
                body_en=NOTICE_EN,
                actor=CLI,
                now=world.services.clock.now(),
            )


async def _publish(world, suffix: str) -> None:
    async with world.services.db.transaction() as s:
        await privacy.publish_notice(
            s,
            org_id=world.org_id,
            body_de=NOTICE_DE + suffix,
            body_en=NOTICE_EN + suffix,
            actor=CLI,
            now=world.services.clock.now(),
        )


async def _writes(world, text: str) -> None:
    await world.sim.patient_send_text(user=world.patient, phone_number_id=PNID, text=text)
    await world.settle()


async def _taps(world, reply_id: str, title: str) -> None:
    request = [m for m in world.sim.business_messages(PNID) if m.interactive][-1]
    await world.sim.patient_send_interactive_reply(
        user=world.patient, phone_number_id=PNID, context_id=request.wamid, reply_id=reply_id, title=title
    )
    await world.settle()


def _out(world) -> list:
    return world.sim.business_messages(PNID)


def _buttons(msg) -> list[str]:
    return [o["id"] for o in msg.interactive["options"]]


async def _conversation_id(world) -> str:
    async with world.services.db.transaction() as s:
        return (await s.execute(select(Conversation.id))).scalar_one()


async def _contact(world) -> Contact:
    async with world.services.db.transaction() as s:
        return (await s.execute(select(Contact))).scalar_one()


async def _ledger(world) -> list[ConsentEvent]:
    async with world.services.db.transaction() as s:
        return list(
            (await s.execute(select(ConsentEvent).order_by(ConsentEvent.at, ConsentEvent.id))).scalars()
        )


async def _staff_send(world, text: str = "Ihr Befund ist unauffällig."):
    async with world.services.db.transaction() as s:
        return await conv.send_text(
            session=s,
            keys=world.services.keys,
            org_id=world.org_id,
            conversation_id=await _conversation_id(world),
            user_id=world.staff_id,
            text=text,
            now=world.services.clock.now(),
        )


async def _staff_blocked(world) -> str:
    before = len(_out(world))
    with pytest.raises(ConsentBlockedError) as err:
        await _staff_send(world)
    await world.settle()
    assert len(_out(world)) == before  # nothing went out
    async with world.services.db.transaction() as s:
        staff_rows = (
            (await s.execute(select(Message).where(Message.sender_user_id.is_not(None)))).scalars().all()
        )
    assert staff_rows == []  # and nothing was queued
    return err.value.code


@pytest.mark.dsk("I.1")
async def test_first_contact_gets_notice_and_consent_request_and_staff_wait_for_consent(world):
    """[I.1] notice as the first reply; [Art. 9(2)(a)] no staff message before explicit consent."""
    await _privacy_on(world)
    await _writes(world, "Guten Tag, ich habe eine Frage zu meinem Befund.")
    (notice,) = [m for m in _out(world) if not m.interactive]
    (request,) = [m for m in _out(world) if m.interactive]
    assert "Version 1" in notice.text and NOTICE_DE in notice.text
    assert "https://testserver/privacy/klinikum" in notice.text
    assert request.type == "interactive"
    assert _buttons(request) == ["pforte:consent:yes:1", "pforte:consent:no:1"]
    assert [(e.state, e.notice_version) for e in await _ledger(world)] == [
        ("notice_sent", 1),
        ("requested", 1),
    ]
    assert await _staff_blocked(world) == "consent_pending"

    await _taps(world, "pforte:consent:yes:1", "Ja, einverstanden")
    given = (await _ledger(world))[-1]
    contact = await _contact(world)
    assert (given.state, given.notice_version, given.via) == ("given", 1, "button")
    assert (
        given.external_id is not None
        and given.message_id is not None
        and given.channel_id == world.channel_id
    )
    assert (contact.consent_state, contact.consent_version) == ("given", 1)
    assert "Einwilligung ist gespeichert" in _out(world)[-1].text
    msg = await _staff_send(world)
    await world.settle()
    assert _out(world)[-1].text == "Ihr Befund ist unauffällig."
    async with world.services.db.transaction() as s:
        assert (await s.get(Message, msg.id)).status == "delivered"
        actions = set((await s.execute(select(AuditEvent.action))).scalars())
    assert {
        "privacy.notice_published",
        "consent.notice_sent",
        "consent.requested",
        "consent.given",
    } <= actions


async def test_a_second_message_before_answering_sends_nothing_new(world):
    await _privacy_on(world)
    await _writes(world, "Hallo")
    await _writes(world, "Hallo? Ist da jemand?")
    assert len(_out(world)) == 2  # notice and one request, not repeated
    assert [e.state for e in await _ledger(world)] == ["notice_sent", "requested"]


async def test_withdrawal_blocks_staff_confirms_and_starts_the_retention_clock(world):
    await _privacy_on(world)
    await _writes(world, "Hallo")
    await _taps(world, "pforte:consent:yes:1", "Ja, einverstanden")
    await _writes(world, "STOP")
    states = [e.state for e in await _ledger(world)]
    assert states[-1] == "withdrawn"
    assert "Widerruf ist gespeichert" in _out(world)[-1].text
    assert await _staff_blocked(world) == "consent_withdrawn"
    async with world.services.db.transaction() as s:
        clock_at = (await s.execute(select(Conversation.retention_clock_at))).scalar_one()
    assert clock_at is not None


async def test_a_patient_who_withdrew_and_writes_again_is_asked_again_once_a_day(world):
    await _privacy_on(world)
    await _writes(world, "Hallo")
    await _taps(world, "pforte:consent:yes:1", "Ja, einverstanden")
    await _writes(world, "Widerruf")
    sent = len(_out(world))
    await _writes(world, "Noch eine Frage")  # stored, but not asked again within the day
    assert len(_out(world)) == sent
    async with world.services.db.transaction() as s:
        assert (await s.execute(select(Message).where(Message.direction == "in"))).scalars().all()[
            -1
        ] is not None
        await s.execute(update(Contact).values(consent_at=world.services.clock.now() - timedelta(hours=25)))
    await _writes(world, "Und noch eine")
    (request,) = _out(world)[sent:]
    assert _buttons(request)[0] == "pforte:consent:yes:1"
    assert await _staff_blocked(world) == "consent_pending"
    await _taps(world, "pforte:consent:yes:1", "Ja, einverstanden")
    assert (await _contact(world)).consent_state == "given"
    async with world.services.db.transaction() as s:
        assert (await s.execute(select(Conversation.retention_clock_at))).scalar_one() is None
    await _staff_send(world)


async def test_a_consent_answer_for_an_outdated_notice_is_not_counted(world):
    await _privacy_on(world)
    await _writes(world, "Hallo")
    await _publish(world, " Neu: Aufbewahrung 90 Tage.")
    await _taps(world, "pforte:consent:yes:1", "Ja, einverstanden")  # the button of version 1
    contact = await _contact(world)
    assert contact.consent_state == "requested" and contact.consent_version == 2
    assert "given" not in [e.state for e in await _ledger(world)]
    latest = _out(world)[-3:]  # three separate sends: their order at the provider is not guaranteed
    (request,) = [m for m in latest if m.interactive]
    assert _buttons(request) == ["pforte:consent:yes:2", "pforte:consent:no:2"]
    texts = [m.text for m in latest if not m.interactive]
    assert any("Version 2" in t and "Neu: Aufbewahrung" in t for t in texts)  # the new notice
    assert any("geändert" in t and "Neu: Aufbewahrung" not in t for t in texts)  # and why it is asked again
    assert await _staff_blocked(world) == "consent_pending"
    await _taps(world, "pforte:consent:yes:2", "Ja, einverstanden")
    contact = await _contact(world)
    assert (contact.consent_state, contact.consent_version) == ("given", 2)


async def test_plain_text_yes_and_no_count_while_a_request_is_open(world):
    await _privacy_on(world)
    await _writes(world, "Hallo")
    await _writes(world, "nein")
    assert (await _contact(world)).consent_state == "refused"
    assert "keine Gesundheitsinformationen" in _out(world)[-1].text
    assert await _staff_blocked(world) == "consent_refused"
    async with world.services.db.transaction() as s:
        await s.execute(update(Contact).values(consent_at=world.services.clock.now() - timedelta(hours=25)))
    await _writes(world, "Doch, ich möchte Nachrichten bekommen")
    await _writes(world, "Ja")
    contact = await _contact(world)
    assert (contact.consent_state, contact.consent_version) == ("given", 1)
    assert (await _ledger(world))[-1].via == "text"


@pytest.mark.dsk("I.1")
async def test_the_notice_keyword_sends_the_notice_again(world):
    await _privacy_on(world)
    await _writes(world, "Hallo")
    await _taps(world, "pforte:consent:yes:1", "Ja, einverstanden")
    before = len(_out(world))
    await _writes(world, "Datenschutz")
    (again,) = _out(world)[before:]
    assert NOTICE_DE in again.text
    assert (await _contact(world)).consent_state == "given"  # asking for the notice changes nothing else


@pytest.mark.dsk("I.1")
async def test_a_new_notice_version_is_sent_with_the_next_message(world):
    await _privacy_on(world)
    await _writes(world, "Hallo")
    await _taps(world, "pforte:consent:yes:1", "Ja, einverstanden")
    await _publish(world, " Geändert.")
    before = len(_out(world))
    await _writes(world, "Wann ist mein Termin?")
    (notice,) = _out(world)[before:]
    assert "Version 2" in notice.text
    assert (await _contact(world)).notice_version_sent == 2


async def test_a_new_organisation_requires_consent_even_before_a_notice_is_published(world):
    async with world.services.db.transaction() as s:
        fresh = await orgs.create(
            session=s, keys=world.services.keys, name="Neu", slug="neu", now=world.services.clock.now()
        )
        assert orgs.setting(fresh, "consent_required") is True  # the strict default
    await _privacy_on(world, publish=False)
    await _writes(world, "Hallo")
    (request,) = _out(world)  # no notice to send, but the consent question goes out
    assert _buttons(request) == ["pforte:consent:yes:0", "pforte:consent:no:0"]
    assert await _staff_blocked(world) == "consent_pending"


@pytest.mark.dsk("II.1")
async def test_own_server_only_blocks_whatsapp_with_the_reason(world):
    """[II.1] an organisation can refuse channels whose encryption ends at the provider."""
    async with world.services.db.transaction() as s:
        await orgs.update_settings(
            session=s,
            org_id=world.org_id,
            changes={"own_server_encryption_only": True},
            actor=CLI,
            now=world.services.clock.now(),
        )
    await _writes(world, "Hallo")
    assert await _staff_blocked(world) == "channel_not_own_server"


async def test_switching_the_consent_step_off_lets_staff_write_and_is_audited(world):
    await _privacy_on(world)
    await _writes(world, "Hallo")
    async with world.services.db.transaction() as s:
        await orgs.update_settings(
            session=s,
            org_id=world.org_id,
            changes={"consent_required": False},
            actor=CLI,
            now=world.services.clock.now(),
        )
        audits = (
            (await s.execute(select(AuditEvent).where(AuditEvent.action == "settings.update")))
            .scalars()
            .all()
        )
    assert audits[-1].details["after"] == {"consent_required": False}
    await _staff_send(world)


async def test_bad_settings_are_refused_and_change_nothing(world):
    from pforte.errors import ValidationError

    async with world.services.db.transaction() as s:
        with pytest.raises(ValidationError):
            await orgs.update_settings(
                session=s,
                org_id=world.org_id,
                changes={"consent_required": "yes"},
                actor=CLI,
                now=world.services.clock.now(),
            )
        with pytest.raises(ValidationError):
            await orgs.update_settings(
                session=s,
                org_id=world.org_id,
                changes={"no_such_setting": 1},
                actor=CLI,
                now=world.services.clock.now(),
            )
    async with world.services.db.transaction() as s:
        org = await orgs.get(session=s, org_id=world.org_id)
        assert orgs.setting(org, "consent_required") is False


async def test_privacy_jobs_are_only_made_when_a_message_may_need_an_answer(world):
    """The hot path stays lean: a consented patient's ordinary messages make no privacy job."""
    await _privacy_on(world)
    await _writes(world, "Hallo")
    await _taps(world, "pforte:consent:yes:1", "Ja, einverstanden")
    async with world.services.db.transaction() as s:
        before = len((await s.execute(select(Job).where(Job.kind == "privacy_reply"))).scalars().all())
    await _writes(world, "Danke für die Nachricht")
    await _writes(world, "Bis morgen")
    async with world.services.db.transaction() as s:
        after = len((await s.execute(select(Job).where(Job.kind == "privacy_reply"))).scalars().all())
    assert after == before
    await _writes(world, "Datenschutz")
    async with world.services.db.transaction() as s:
        jobs = (await s.execute(select(Job).where(Job.kind == "privacy_reply"))).scalars().all()
    assert len(jobs) == before + 1 and all(j.state == "done" for j in jobs)


async def test_after_a_withdrawal_retention_counts_from_it_even_if_the_patient_writes_later(world):
    """[I.7] the withdrawal starts the retention clock; later messages do not restart it."""
    from pforte.retention import sweeper

    await _privacy_on(world)
    await _writes(world, "Hallo")
    await _taps(world, "pforte:consent:yes:1", "Ja, einverstanden")
    await _writes(world, "STOP")
    await _writes(world, "Noch eine Frage")
    now = world.services.clock.now()
    s = world.services
    dry = await sweeper.run(s.db, s.eraser, s.settings, now + timedelta(days=100))
    assert dry.conversations == 0  # 180 days by default: not yet
    async with s.db.transaction() as session:  # the patient wrote again 100 days after withdrawing
        await session.execute(update(Conversation).values(last_activity_at=now + timedelta(days=100)))
    report = await sweeper.run(s.db, s.eraser, s.settings, now + timedelta(days=181))
    assert report.conversations == 1
    async with s.db.transaction() as session:
        assert (await session.execute(select(Conversation))).scalars().all() == []


async def test_the_patients_data_export_contains_the_consent_ledger(world):
    """Art. 15: the patient sees what was asked, answered and when."""
    from pforte.contacts import export

    await _privacy_on(world)
    await _writes(world, "Hallo")
    await _taps(world, "pforte:consent:yes:1", "Ja, einverstanden")
    contact = await _contact(world)
    async with world.services.db.transaction() as s:
        data = await export.collect(
            session=s,
            keys=world.services.keys,
            org_id=world.org_id,
            contact_id=contact.id,
            now=world.services.clock.now(),
        )
    doc = export.document(data, {}, lang="de")
    assert [(e["state"], e["notice_version"]) for e in doc["consent"]] == [
        ("notice_sent", 1),
        ("requested", 1),
        ("given", 1),
    ]
    assert doc["consent"][-1]["via"] == "button" and doc["consent"][-1]["external_id"]
