async def test_patient_text_is_stored(world):
    await world.sim.patient_send_text(user=world.patient, phone_number_id="106540352242922", text="Hallo Praxis")
    await world.settle()
    from pforte.conversations import service as conv
    async with world.services.db.transaction() as s:
        rows = await conv.list_(session=s, keys=world.services.keys, org_id=world.org_id, now=world.services.clock.now())
        assert len(rows) == 1
        view = await conv.get(session=s, keys=world.services.keys, org_id=world.org_id, conversation_id=rows[0].id, now=world.services.clock.now())
    assert [m.text for m in view.messages] == ["Hallo Praxis"]
