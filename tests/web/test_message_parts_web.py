"""Message x of y (DSK II.2) in the inbox: one bubble per split message, assembled incoming parts,
gaps after the wait, and the content hash in the detail view (SQLite and PG)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, update
from tests.unit.test_parts import long_text
from tests.web.test_inbox import HTML, PNID, csrf_of, first_conversation_id, htmx, open_page, patient_writes

from pforte.clock import SystemClock
from pforte.contacts.models import Contact
from pforte.conversations.models import Message
from pforte.outbox.models import Job


class ShiftedClock(SystemClock):
    """The real clock moved forward by a fixed amount (time passes without waiting)."""

    def __init__(self, ahead: timedelta) -> None:
        self.ahead = ahead

    def now(self) -> datetime:
        """Real time plus the shift."""
        return super().now() + self.ahead


async def _ready(world, first_text: str = "Hallo") -> tuple[str, str]:
    """The patient wrote and consented, staff are logged in; (conversation id, CSRF token)."""
    await patient_writes(world, first_text)
    async with world.services.db.transaction() as s:
        await s.execute(update(Contact).values(consent_state="given"))
    await world.login()
    cid = await first_conversation_id(world)
    return cid, csrf_of((await open_page(world, cid)).text)


def _bubble(html: str, message_id: str) -> str:
    start = html.index(f'id="msg-{message_id}"')
    return html[start : html.index("</details>", html.index('class="msg-details"', start))]


@pytest.mark.dsk("II.2")
async def test_a_long_reply_is_one_bubble_that_counts_its_delivered_parts(world, db_kind):
    cid, token = await _ready(world)
    text = long_text()
    sent = await world.client.post(f"/conversations/{cid}/messages", data={"text": text}, headers=htmx(token))
    assert sent.status_code == 200
    (split_id,) = re.findall(
        r'id="msg-(\w+)" data-message-id="\w+" data-status="sending" data-parts="3"', sent.text
    )
    assert "In 3 Teilen gesendet: 0 von 3 zugestellt" in sent.text
    await world.settle()
    page = (await open_page(world, cid)).text
    bubble = _bubble(page, split_id)
    assert 'data-status="complete"' in bubble and 'data-delivered="3"' in bubble
    assert "In 3 Teilen gesendet: 3 von 3 zugestellt" in bubble
    assert "tick-complete" in bubble and "Alle Teile zugestellt" in bubble
    # The parts are listed in the details, not as bubbles of their own.
    assert bubble.count("Teil 1 von 3") == 1 and "Teil 3 von 3" in bubble
    assert "(1/3) " not in page and "(2/3) " not in page
    async with world.services.db.transaction() as s:
        part_ids = (await s.execute(select(Message.id).where(Message.parent_id == split_id))).scalars().all()
    assert len(part_ids) == 3 and not any(f'id="msg-{p}"' in page for p in part_ids)
    listed = await world.client.get("/", headers=HTML)
    assert 'data-last-status="complete"' in listed.text


@pytest.mark.dsk("II.2")
async def test_a_failed_part_is_shown_with_its_reason(world, db_kind):
    cid, token = await _ready(world)
    world.sim.fail_next_send(PNID, 131026)
    await world.client.post(f"/conversations/{cid}/messages", data={"text": long_text()}, headers=htmx(token))
    await world.settle()
    page = (await open_page(world, cid)).text
    (split_id,) = re.findall(
        r'id="msg-(\w+)" data-message-id="\w+" data-status="failed" data-parts="3"', page
    )
    bubble = _bubble(page, split_id)
    assert re.search(r"Teil [123] von 3 wurde nicht gesendet:", bubble)
    assert "WhatsApp konnte die Nachricht an diese Nummer nicht zustellen" in bubble


async def test_texts_beyond_the_maximum_are_refused_and_nothing_is_queued(world, db_kind):
    cid, token = await _ready(world)

    async def counts() -> tuple[int, int]:
        async with world.services.db.transaction() as s:
            return len((await s.execute(select(Job.id))).all()), len(
                (await s.execute(select(Message.id))).all()
            )

    before = await counts()
    refused = await world.client.post(
        f"/conversations/{cid}/messages", data={"text": "x " * 10_001}, headers=htmx(token)
    )
    assert refused.status_code == 400
    assert "höchstens 20.000 Zeichen" in refused.text
    assert await counts() == before


@pytest.mark.dsk("II.2")
async def test_incoming_parts_out_of_order_and_twice_are_shown_as_one_message(world, db_kind):
    for text in ("(2/3) die Schmerzen", "(1/3) Seit gestern habe ich", "(2/3) die Schmerzen"):
        await world.sim.patient_send_text(user=world.patient, phone_number_id=PNID, text=text)
        await world.settle()
    await world.login()
    cid = await first_conversation_id(world)
    page = (await open_page(world, cid)).text
    (waiting,) = re.findall(r'<div class="assembled" data-parts="3" data-missing="3" data-gap="no">', page)
    assert waiting and "Warte auf die übrigen Teile (es fehlt: 3)." in page
    await world.sim.patient_send_text(user=world.patient, phone_number_id=PNID, text="im Knie. (3/3)")
    await world.settle()
    page = (await open_page(world, cid)).text
    assert page.count('class="msg msg-in') == 1  # four messages, one bubble
    assert '<div class="assembled" data-parts="3" data-missing="" data-gap="no">' in page
    texts = re.findall(
        r'<p class="text part" data-part="(\d)"><span class="part-marker">[^<]*</span> ([^<]*)</p>', page
    )
    assert texts == [("1", "Seit gestern habe ich"), ("2", "die Schmerzen"), ("3", "im Knie.")]
    assert "Nachricht in 3 Teilen: Alle Teile sind angekommen." in page
    assert "Ein Teil kam mehrfach an; er wird nur einmal angezeigt." in page


@pytest.mark.dsk("II.2")
async def test_a_missing_part_is_flagged_as_a_gap_once_the_wait_is_over(world, db_kind):
    for text in ("(1/3) Seit gestern", "(3/3) im Knie."):
        await world.sim.patient_send_text(user=world.patient, phone_number_id=PNID, text=text)
    await world.settle()
    await world.login()
    cid = await first_conversation_id(world)
    page = (await open_page(world, cid)).text
    assert 'data-missing="2" data-gap="no"' in page and "Lücke" not in page
    world.services.clock = ShiftedClock(timedelta(minutes=11))  # the default wait is 10 minutes
    page = (await open_page(world, cid)).text
    assert 'data-missing="2" data-gap="yes"' in page
    assert "Lücke: Nicht alle Teile dieser Nachricht aus 3 Teilen sind angekommen. Es fehlt: 2" in page


@pytest.mark.dsk("II.2")
async def test_the_detail_view_shows_the_content_hash_and_that_it_matches(world, db_kind):
    cid, token = await _ready(world, "Ich habe eine Frage")
    await world.client.post(
        f"/conversations/{cid}/messages", data={"text": "Wir rufen Sie an."}, headers=htmx(token)
    )
    await world.settle()
    page = (await open_page(world, cid)).text
    async with world.services.db.transaction() as s:
        rows = (await s.execute(select(Message).where(Message.type == "text"))).scalars().all()
        contact = (await s.execute(select(Contact))).scalar_one()
        cipher = await world.services.keys.cipher(s, contact.dek_id)
    assert len(rows) >= 2
    for row in rows:
        digest = cipher.open_text(row.content_hash_enc, "messages", "content_hash", row.id)
        bubble = _bubble(page, row.id)
        assert "Prüfsumme des Inhalts (SHA-256)" in bubble
        assert f'<code class="sha256">{digest}</code>' in bubble
        assert 'data-hash-state="match"' in bubble and "passt zum gespeicherten Inhalt" in bubble
