"""A template whose parameters in pforte no longer match Meta's: error 132000 surfaces plainly."""

from __future__ import annotations

from sqlalchemy import select
from tests.conftest import PNID
from tests.web.test_inbox import first_conversation_id, open_page, patient_writes

from pforte.conversations import service as conv
from pforte.conversations.models import Message, MessageTemplate


async def test_a_template_with_the_wrong_parameter_count_fails_with_a_clear_reason(world):
    # pforte believes the template takes two parameters; the provider's approved version takes one.
    world.sim.add_template(PNID, "befund_bereit", "de", body="Ihr Befund {{1}} ist da.", param_count=1)
    async with world.services.db.transaction() as s:
        tpl = MessageTemplate(
            org_id=world.org_id,
            name="befund_bereit",
            language="de",
            body="Ihr Befund {{1}} ist da, {{2}}.",
            param_count=2,
            created_at=world.services.clock.now(),
        )
        s.add(tpl)
        await s.flush()
        tpl_id = tpl.id
    await patient_writes(world, "Gibt es Neuigkeiten?")
    await world.login()
    cid = await first_conversation_id(world)
    async with world.services.db.transaction() as s:
        msg = await conv.send_template(
            session=s,
            keys=world.services.keys,
            org_id=world.org_id,
            conversation_id=cid,
            user_id=world.staff_id,
            template_id=tpl_id,
            params=["Labor", "Frau M."],
            now=world.services.clock.now(),
        )
    await world.settle()
    async with world.services.db.transaction() as s:
        row = (await s.execute(select(Message).where(Message.id == msg.id))).scalar_one()
    assert (row.status, row.error_code, row.error_reason) == ("failed", 132000, "invalid_request")
    assert not [m for m in world.sim.business_messages(PNID) if m.template]  # nothing reached the patient
    page = await open_page(world, cid)
    assert "falsche Vorlagen-Platzhalter" in page.text  # the reason, in the staff member's language
