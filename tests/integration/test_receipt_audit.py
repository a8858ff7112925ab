"""What arrived is in the audit log: one entry per organisation and ingest transaction, counts only."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from tests.conftest import APP_SECRET, PNID
from tests.helpers import fixture_bytes, post_webhook

from pforte.audit import service as audit
from pforte.audit.models import AuditEvent

pytestmark = pytest.mark.dsk("II.2")


async def _receipts(world) -> list[AuditEvent]:
    async with world.services.db.sessionmaker() as s:
        rows = await s.execute(
            select(AuditEvent).where(AuditEvent.action == "webhook.received").order_by(AuditEvent.seq)
        )
        return list(rows.scalars())


async def test_a_stored_webhook_leaves_one_entry_with_counts_and_no_content(world):
    body = fixture_bytes("batch_2entries_2changes_mixed.json", PNID)
    assert (await post_webhook(world.client, world.channel_id, body, APP_SECRET)).status_code == 200
    (entry,) = await _receipts(world)
    assert entry.org_id == world.org_id
    assert entry.actor_kind == "system"
    assert entry.details["channels"] == [world.channel_id]
    assert entry.details["messages"] >= 1
    text = repr(entry.details)
    assert "wa_id" not in text and "body" not in text  # counts and ids only
    async with world.services.db.sessionmaker() as s:
        assert (await audit.verify(s, world.org_id)).ok


async def test_a_replayed_webhook_adds_no_receipt_entry(world):
    body = fixture_bytes("message_text.json", PNID)
    assert (await post_webhook(world.client, world.channel_id, body, APP_SECRET)).status_code == 200
    assert (await post_webhook(world.client, world.channel_id, body, APP_SECRET)).status_code == 200
    (entry,) = await _receipts(world)
    assert entry.details["messages"] == 1


async def test_receipts_can_be_switched_off(world):
    world.services.ingest.ingestor.audit_receipts = False
    body = fixture_bytes("message_text.json", PNID)
    assert (await post_webhook(world.client, world.channel_id, body, APP_SECRET)).status_code == 200
    assert await _receipts(world) == []
