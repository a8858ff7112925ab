"""The webhook edge on SQLite and PostgreSQL: every recorded payload, and every kind of bad input."""

from __future__ import annotations

import asyncio
import json

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine
from tests.conftest import APP_SECRET, PNID
from tests.helpers import (
    all_rows,
    count_items,
    fixture_bytes,
    fixture_names,
    metric,
    post_webhook,
    staff_reply,
)

from pforte.channels.whatsapp.routes import WebhookEdge
from pforte.conversations.models import Attachment, Message
from pforte.outbox.models import Job
from pforte.web.security import CSP

MESSAGE_FIXTURES = [n for n in fixture_names() if n.startswith("message_")]


@pytest.mark.parametrize("name", fixture_names())
async def test_every_recorded_payload_is_accepted_and_stored(world, name):
    body = fixture_bytes(name, PNID)
    r = await post_webhook(world.client, world.channel_id, body, APP_SECRET)
    assert r.status_code == 200, r.text
    n_msgs, _ = count_items(body)
    if "109876543210988" in body.decode():  # a second number in the batch we do not know: not stored
        doc = json.loads(body)
        n_msgs = sum(
            len(c["value"].get("messages", []))
            for e in doc["entry"]
            for c in e["changes"]
            if c["value"]["metadata"]["phone_number_id"] == PNID and c.get("field") == "messages"
        )
    msgs = await all_rows(world.services, Message)
    assert len(msgs) == n_msgs


@pytest.mark.parametrize("name", MESSAGE_FIXTURES)
async def test_replayed_webhook_stores_nothing_twice(world, name):
    body = fixture_bytes(name, PNID)
    assert (await post_webhook(world.client, world.channel_id, body, APP_SECRET)).status_code == 200
    first = await all_rows(world.services, Message)
    assert (await post_webhook(world.client, world.channel_id, body, APP_SECRET)).status_code == 200
    second = await all_rows(world.services, Message)
    assert [m.id for m in first] == [m.id for m in second]
    assert metric(world.services, "pforte_webhook_updates_total", result="duplicate") == len(first)


async def test_unknown_type_is_kept_as_unsupported_with_raw_payload(world):
    body = fixture_bytes("message_unknown_future_type.json", PNID)
    assert (await post_webhook(world.client, world.channel_id, body, APP_SECRET)).status_code == 200
    (msg,) = await all_rows(world.services, Message)
    assert msg.type == "unsupported"
    assert msg.raw_enc is not None  # kept, encrypted


async def test_inbound_media_creates_pending_attachment_and_download_job(world):
    body = fixture_bytes("message_image.json", PNID)
    assert (await post_webhook(world.client, world.channel_id, body, APP_SECRET)).status_code == 200
    (att,) = await all_rows(world.services, Attachment)
    assert att.state == "pending" and att.media_id == "1400000000000005"
    jobs = await all_rows(world.services, Job)
    assert [(j.kind, j.payload) for j in jobs] == [("download_media", {"attachment_id": att.id})]


@pytest.mark.parametrize(
    ("secret", "headers", "status"),
    [
        ("wrong-secret", {}, 403),
        (None, {}, 401),
        (None, {"x-hub-signature-256": "sha1=abc"}, 403),
    ],
)
async def test_forged_or_missing_signature_is_rejected_and_nothing_stored(world, secret, headers, status):
    body = fixture_bytes("message_text.json", PNID)
    r = await post_webhook(world.client, world.channel_id, body, secret, headers)
    assert r.status_code == status
    assert await all_rows(world.services, Message) == []
    assert metric(world.services, "pforte_webhook_updates_total", result="rejected") == 1


async def test_signature_is_checked_over_raw_bytes_not_reserialised_json(world):
    raw = fixture_bytes("unicode_escaped.json", PNID)
    reserialised = json.dumps(json.loads(raw), ensure_ascii=False).encode()
    from tests.helpers import sign

    r = await world.client.post(
        f"/webhooks/whatsapp/{world.channel_id}",
        content=raw,
        headers={"x-hub-signature-256": sign(reserialised, APP_SECRET)},
    )
    assert r.status_code == 403
    assert (await post_webhook(world.client, world.channel_id, raw, APP_SECRET)).status_code == 200


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'{"object":"page","entry":[]}', b""])
async def test_malformed_payload_is_400_and_writes_nothing(world, body):
    r = await post_webhook(world.client, world.channel_id, body, APP_SECRET)
    assert r.status_code == 400
    assert await all_rows(world.services, Message) == []


async def test_body_over_3_mb_is_413(world):
    body = b'{"object":"whatsapp_business_account","entry":[],"pad":"' + b"x" * (3 * 1024 * 1024) + b'"}'
    r = await post_webhook(world.client, world.channel_id, body, APP_SECRET)
    assert r.status_code == 413
    assert await all_rows(world.services, Message) == []


async def test_webhook_answers_carry_the_security_headers_and_errors_their_code(world):
    text = fixture_bytes("message_text.json", PNID)
    ok = await post_webhook(world.client, world.channel_id, text, APP_SECRET)
    bad = await post_webhook(world.client, world.channel_id, b"{not json", APP_SECRET)
    forged = await post_webhook(world.client, world.channel_id, b"{}", "not-the-secret")
    assert (ok.status_code, ok.text) == (200, "OK")
    assert (bad.status_code, bad.json()["error"]) == (400, "malformed_json")
    assert (forged.status_code, forged.json()["error"]) == (403, "signature_invalid")
    for r in (ok, bad, forged):
        assert r.headers["content-security-policy"] == CSP
        assert r.headers["x-content-type-options"] == "nosniff"
        assert int(r.headers["content-length"]) == len(r.content)


async def test_a_client_that_leaves_before_its_body_arrives_gets_no_answer_and_stores_nothing(world):
    sent: list[dict] = []
    passed_on: list[str] = []

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    async def inner(scope, receive, send) -> None:
        passed_on.append(scope["path"])

    edge = WebhookEdge(inner, services=world.services)
    scope = {
        "type": "http",
        "method": "POST",
        "path": f"/webhooks/whatsapp/{world.channel_id}",
        "headers": [(b"content-type", b"application/json")],
    }
    await edge(scope, receive, send)
    assert sent == []
    assert passed_on == []
    assert await all_rows(world.services, Message) == []


@pytest.mark.parametrize("path", ["/webhooks/whatsapp/", "/webhooks/whatsapp/a/b", "/webhooks/whatsappX"])
async def test_posts_beside_the_webhook_path_go_to_the_app(world, path):
    r = await world.client.post(path, content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code in (404, 405)
    assert "content-security-policy" in r.headers  # answered by the app, through its middleware


async def test_unknown_channel_is_404(world):
    body = fixture_bytes("message_text.json", PNID)
    r = await post_webhook(world.client, "0" * 32, body, APP_SECRET)
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("mode", "token", "status"),
    [("subscribe", "verify-me", 200), ("subscribe", "wrong", 403), ("unsubscribe", "verify-me", 403)],
)
async def test_subscription_handshake(world, mode, token, status):
    r = await world.client.get(
        f"/webhooks/whatsapp/{world.channel_id}",
        params={"hub.mode": mode, "hub.verify_token": token, "hub.challenge": "1158201444"},
    )
    assert r.status_code == status
    if status == 200:
        assert r.text == "1158201444"


async def test_simulator_handshake_reaches_pforte(world):
    assert await world.sim.verify_webhook(PNID) is True


async def test_database_unavailable_gives_503_then_recovers_by_itself(world, db_kind, tmp_path):
    body = fixture_bytes("message_text.json", PNID)
    db = world.services.db
    good = db.engine
    dead_url = (
        "postgresql+asyncpg://postgres@127.0.0.1:1/none"
        if db_kind == "postgresql"
        else f"sqlite+aiosqlite:///{tmp_path}/missing-dir/x.sqlite3"
    )
    db.engine = create_async_engine(dead_url)
    try:
        r = await post_webhook(world.client, world.channel_id, body, APP_SECRET)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "5"
        assert r.json()["error"] == "unavailable"
    finally:
        await db.engine.dispose()
        db.engine = good
    r = await post_webhook(world.client, world.channel_id, body, APP_SECRET)
    assert r.status_code == 200
    assert len(await all_rows(world.services, Message)) == 1


async def test_batch_of_many_entries_changes_and_items_is_fully_processed(world):
    from pforte.channels import service as channels
    from pforte.orgs.models import Organisation

    async with world.services.db.transaction() as s:
        org = await s.get(Organisation, world.org_id)
        await channels.add_whatsapp(
            session=s,
            keys=world.services.keys,
            org=org,
            name="Station 4",
            phone_number_id="109876543210988",
            display_phone_number="+49 30 7654321",
            access_token="t2",
            app_secret=APP_SECRET,
            graph_base_url="https://graph.test",
            now=world.services.clock.now(),
        )
    body = fixture_bytes("batch_2entries_2changes_mixed.json", PNID)
    n_msgs, n_stats = count_items(body)
    assert n_msgs >= 4 and n_stats >= 2
    assert (await post_webhook(world.client, world.channel_id, body, APP_SECRET)).status_code == 200
    assert len(await all_rows(world.services, Message)) == n_msgs
    accepted = metric(world.services, "pforte_webhook_updates_total", result="accepted")
    assert accepted == n_msgs + n_stats


async def test_status_for_unknown_send_is_parked_and_applied_when_the_send_is_recorded(world):
    from pforte.conversations import ingest
    from pforte.conversations.models import PendingStatus
    from pforte.conversations.status import MessageState

    body = fixture_bytes("status_read.json", PNID)
    assert (await post_webhook(world.client, world.channel_id, body, APP_SECRET)).status_code == 200
    (pending,) = await all_rows(world.services, PendingStatus)
    assert pending.status == "read"
    # A staff message whose send result (that wamid) is recorded only now.
    message_id = await staff_reply(world, external_id=pending.external_id, status="accepted")
    async with world.services.db.engine.begin() as conn:
        changes = await ingest.apply_pending_statuses(
            conn,
            channel_id=world.channel_id,
            message_id=message_id,
            external_id=pending.external_id,
            state=MessageState(status="accepted"),
        )
    assert changes["status"] == "read"
    async with world.services.db.transaction() as s:
        stored = (await s.execute(select(Message).where(Message.id == message_id))).scalar_one()
    assert stored.status == "read" and stored.read_at is not None
    assert await all_rows(world.services, PendingStatus) == []


async def test_concurrent_status_writers_cannot_downgrade(world):
    """A delta computed from a stale read (another transaction moved the message on) is guarded in SQL."""
    from datetime import timedelta

    from pforte.conversations import ingest

    now = world.services.clock.now()
    message_id = await staff_reply(world, status="delivered", delivered_at=now)
    t_sent = now - timedelta(seconds=5)
    async with world.services.db.engine.begin() as conn:
        # What a writer that still believed the message "accepted" would have computed:
        await ingest.apply_changes(conn, {message_id: {"status": "sent", "sent_at": t_sent}})
        await ingest.apply_changes(
            conn,
            {
                message_id: {
                    "status": "failed",
                    "failed_at": now,
                    "error_code": 131026,
                    "error_reason": "undeliverable",
                }
            },
        )
        await ingest.apply_changes(conn, {message_id: {"delivered_at": now + timedelta(seconds=9)}})
    async with world.services.db.transaction() as s:
        m = (await s.execute(select(Message).where(Message.id == message_id))).scalar_one()
    assert m.status == "delivered"
    assert m.sent_at == t_sent  # an empty timestamp is filled ...
    assert m.delivered_at == now  # ... a set one is never replaced
    assert m.error_code is None and m.failed_at is None  # a failure after delivery changes nothing


async def test_simulator_redelivers_after_503_and_the_message_is_stored_once(world, db_kind, tmp_path):
    db = world.services.db
    good = db.engine
    dead_url = (
        "postgresql+asyncpg://postgres@127.0.0.1:1/none"
        if db_kind == "postgresql"
        else f"sqlite+aiosqlite:///{tmp_path}/missing-dir/x.sqlite3"
    )
    db.engine = create_async_engine(dead_url)
    world.services.channels.invalidate()
    try:
        await world.sim.patient_send_text(user=world.patient, phone_number_id=PNID, text="Bitte Rückruf")
        for _ in range(200):  # wait for the first delivery attempt to be refused
            log = world.sim.webhook_log
            if log and log[-1].status_codes:
                break
            await asyncio.sleep(0.01)
        assert world.sim.webhook_log[-1].status_codes[0] == 503
    finally:
        await db.engine.dispose()
        db.engine = good
    await world.settle()
    delivery = world.sim.webhook_log[-1]
    assert delivery.state == "delivered" and delivery.status_codes[-1] == 200
    assert len(delivery.status_codes) >= 2
    msgs = await all_rows(world.services, Message)
    assert len(msgs) == 1 and msgs[0].direction == "in"
