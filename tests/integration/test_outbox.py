"""Outbound through the outbox against the simulator, on SQLite and PostgreSQL (DESIGN 5)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select, update
from tests.conftest import PNID
from tests.helpers import all_rows

from pforte.channels.models import Channel
from pforte.conversations import service as conv
from pforte.conversations.models import Conversation, Message
from pforte.errors import NotFoundError
from pforte.outbox.models import Job


async def _conversation(world) -> str:
    await world.sim.patient_send_text(user=world.patient, phone_number_id=PNID, text="Guten Tag")
    await world.settle()
    async with world.services.db.transaction() as s:
        (row,) = await conv.list_(
            session=s, keys=world.services.keys, org_id=world.org_id, now=world.services.clock.now()
        )
    return row.id


async def _send(world, conversation_id: str, text: str = "Ihr Befund ist da.", **kw) -> str:
    async with world.services.db.transaction() as s:
        msg = await conv.send_text(
            session=s,
            keys=world.services.keys,
            org_id=world.org_id,
            conversation_id=conversation_id,
            user_id=world.staff_id,
            text=text,
            now=world.services.clock.now(),
            **kw,
        )
    return msg.id


async def _message(world, mid: str) -> Message:
    async with world.services.db.transaction() as s:
        return (await s.execute(select(Message).where(Message.id == mid))).scalar_one()


async def _jobs(world, kind: str = "send_message") -> list[Job]:
    return [j for j in await all_rows(world.services, Job) if j.kind == kind]


async def _make_due(world) -> None:
    async with world.services.db.transaction() as s:
        await s.execute(
            update(Job)
            .where(Job.state == "queued")
            .values(run_after=world.services.clock.now() - timedelta(seconds=1))
        )
    world.services.channels.invalidate()


async def test_reply_is_sent_delivered_and_read(world):
    cid = await _conversation(world)
    mid = await _send(world, cid)
    await world.settle()
    (sent,) = world.sim.business_messages(PNID)
    assert sent.text == "Ihr Befund ist da."
    m = await _message(world, mid)
    assert m.external_id == sent.wamid
    assert m.status == "delivered" and m.sent_at is not None and m.delivered_at is not None
    await world.sim.patient_read(user=world.patient, phone_number_id=PNID)
    await world.settle()
    m = await _message(world, mid)
    assert m.status == "read" and m.read_at is not None
    assert [j.state for j in await _jobs(world)] == ["done"]


async def test_reply_with_context_quotes_the_patients_message(world):
    cid = await _conversation(world)
    async with world.services.db.transaction() as s:
        inbound = (await s.execute(select(Message).where(Message.direction == "in"))).scalar_one()
    await _send(world, cid, text="Zu Ihrer Frage:", reply_to_message_id=inbound.id)
    await world.settle()
    (sent,) = world.sim.business_messages(PNID)
    assert sent.context_id == inbound.external_id


async def test_template_is_sent_with_its_parameters(world):
    cid = await _conversation(world)
    async with world.services.db.transaction() as s:
        msg = await conv.send_template(
            session=s,
            keys=world.services.keys,
            org_id=world.org_id,
            conversation_id=cid,
            user_id=world.staff_id,
            template_id=world.template_id,
            params=["Frau Mustermann"],
            now=world.services.clock.now(),
        )
    await world.settle()
    (sent,) = world.sim.business_messages(PNID)
    assert sent.type == "template" and sent.template["name"] == "termin_erinnerung"
    assert (await _message(world, msg.id)).status in ("sent", "delivered")


async def test_free_text_outside_the_window_is_refused_before_queueing(world):
    cid = await _conversation(world)
    async with world.services.db.transaction() as s:
        await s.execute(
            update(Conversation).values(last_inbound_at=world.services.clock.now() - timedelta(hours=25))
        )
    from pforte.errors import ConflictError

    with pytest.raises(ConflictError) as err:
        await _send(world, cid)
    assert err.value.code == "needs_template"
    assert await _jobs(world) == []


@pytest.mark.dsk("II.2")
@pytest.mark.parametrize(
    ("code", "asynchronous", "reason"),
    [
        (131047, False, "needs_template"),
        (131047, True, "needs_template"),
        (131026, False, "undeliverable"),
        (131026, True, "undeliverable"),
        (100, False, "invalid_request"),
    ],
)
async def test_permanent_errors_fail_the_message_with_a_reason(world, code, asynchronous, reason):
    cid = await _conversation(world)
    world.sim.fail_next_send(PNID, code, asynchronous=asynchronous)
    mid = await _send(world, cid)
    await world.settle()
    m = await _message(world, mid)
    assert (m.status, m.error_code, m.error_reason) == ("failed", code, reason)
    assert len(await _jobs(world)) == 1


@pytest.mark.parametrize("code", [130429, 131056, 131000])
async def test_retryable_errors_back_off_and_then_send_once(world, code, monkeypatch):
    from pforte.conversations import jobs

    # The real first backoff is about a second: long enough in production, but a loaded test machine
    # can spend that inside one settle and see the retry happen already. A minute makes it certain.
    monkeypatch.setattr(jobs, "backoff_seconds", lambda attempts, retry_after=None: 60.0)
    cid = await _conversation(world)
    world.sim.fail_next_send(PNID, code)
    mid = await _send(world, cid)
    await world.settle()
    m = await _message(world, mid)
    (job,) = await _jobs(world)
    assert (m.status, m.error_code, job.state) == ("queued", code, "queued")
    assert job.run_after > world.services.clock.now()  # backing off, not hammering
    await _make_due(world)
    await world.settle()
    m = await _message(world, mid)
    assert m.status in ("sent", "delivered") and m.external_id
    assert len(world.sim.business_messages(PNID)) == 1


async def test_expired_token_takes_the_channel_down_until_an_admin_fixes_it(world):
    from pforte.channels import service as channels

    cid = await _conversation(world)
    world.sim.fail_next_send(PNID, 190)
    mid = await _send(world, cid)
    await world.settle()
    async with world.services.db.transaction() as s:
        ch = await s.get(Channel, world.channel_id)
    assert ch.state == "DOWN" and "190" in (ch.state_reason or "")
    m = await _message(world, mid)
    assert (m.status, m.error_reason) == ("queued", "channel_down")  # kept, not lost
    async with world.services.db.transaction() as s:
        await channels.update_token(
            session=s,
            keys=world.services.keys,
            org_id=world.org_id,
            channel_id=world.channel_id,
            access_token="sim-access-token-abc",
            now=world.services.clock.now(),
        )
    await _make_due(world)
    await world.settle()
    assert (await _message(world, mid)).status in ("sent", "delivered")
    assert len(world.sim.business_messages(PNID)) == 1


async def _crashed_after_send_started(world) -> tuple[str, str]:
    """A staff message whose worker died after starting its send: (conversation id, message id)."""
    cid = await _conversation(world)
    mid = await _send(world, cid)
    worker = world.services.outbox
    (claimed,) = await worker.claim(10)
    async with world.services.db.transaction() as s:  # the handler's first step, then the process dies
        await s.execute(update(Job).where(Job.id == claimed.id).values(started_at=world.services.clock.now()))
        await s.execute(update(Message).where(Message.id == mid).values(status="sending"))
        await s.execute(update(Job).values(locked_until=world.services.clock.now() - timedelta(seconds=1)))
    assert await worker.recover_stale() == 1
    await world.settle()
    return cid, mid


async def _decide(world, cid: str, mid: str, action: str, hold_s: float = 0.0) -> None:
    """Staff resolve a message in review; ``hold_s``: decided, not yet committed, for that long."""
    async with world.services.db.transaction() as s:
        await conv.resolve_review(
            session=s,
            org_id=world.org_id,
            conversation_id=cid,
            message_id=mid,
            action=action,
            now=world.services.clock.now(),
        )
        await asyncio.sleep(hold_s)


async def test_worker_crash_after_send_started_marks_for_review_and_never_resends(world):
    cid, mid = await _crashed_after_send_started(world)
    m = await _message(world, mid)
    assert (m.status, m.review_reason) == ("review", "outcome_unknown")
    assert [j.state for j in await _jobs(world)] == ["review"]
    assert world.sim.business_messages(PNID) == []
    # Staff decide to resend: exactly one message goes out.
    await _decide(world, cid, mid, "resend")
    await world.settle()
    assert len(world.sim.business_messages(PNID)) == 1


@pytest.mark.parametrize("db_kind", ["postgresql"])  # SQLite has one writer: the second waits before reading
async def test_two_staff_resending_one_message_at_once_send_it_once(world):
    """Two decisions on one message in review (two staff, or a double click): the second finds
    the decision taken and is told so; one send job, one message to the patient."""
    cid, mid = await _crashed_after_send_started(world)

    async def decide(action: str) -> None:
        await _decide(world, cid, mid, action, hold_s=0.5 if action == "resend" else 0.0)

    first = asyncio.create_task(decide("resend"))
    await asyncio.sleep(0.1)
    second = asyncio.create_task(decide("resend"))
    await first
    with pytest.raises(NotFoundError):
        await second
    discard_after = asyncio.create_task(decide("discard"))
    with pytest.raises(NotFoundError):
        await discard_after
    assert sorted(j.state for j in await _jobs(world)) == ["queued", "review"]
    await world.settle()
    assert len(world.sim.business_messages(PNID)) == 1
    assert (await _message(world, mid)).status in ("accepted", "sent", "delivered")


async def test_worker_crash_before_send_started_requeues_and_sends_once(world):
    cid = await _conversation(world)
    mid = await _send(world, cid)
    worker = world.services.outbox
    await worker.claim(10)
    async with world.services.db.transaction() as s:
        await s.execute(update(Job).values(locked_until=world.services.clock.now() - timedelta(seconds=1)))
    assert await worker.recover_stale() == 1
    await world.settle()
    assert (await _message(world, mid)).status in ("sent", "delivered")
    assert len(world.sim.business_messages(PNID)) == 1


class _TimeoutAfterSend(httpx.AsyncBaseTransport):
    """Forwards to the simulator, then pretends the answer never arrived (a read timeout)."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.armed = True

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if self.armed and request.method == "POST" and request.url.path.endswith("/messages"):
            self.armed = False
            await response.aread()
            raise httpx.ReadTimeout("no answer", request=request)
        return response


async def test_send_whose_answer_is_lost_goes_to_review_not_resent(world):
    cid = await _conversation(world)
    world.services.http._transport = _TimeoutAfterSend(world.services.http._transport)
    mid = await _send(world, cid)
    await world.settle()
    m = await _message(world, mid)
    assert (m.status, m.review_reason) == ("review", "outcome_unknown")
    assert len(world.sim.business_messages(PNID)) == 1  # it did go out once; we do not send it again


async def test_sends_are_paced_to_the_channel_rate_without_rate_limit_errors(world):
    cid = await _conversation(world)
    async with world.services.db.transaction() as s:
        await s.execute(update(Channel).values(rate_limit_per_s=20))
    world.sim.numbers[PNID].rate_limit_per_s = 20
    world.services.channels.invalidate()
    for i in range(45):
        await _send(world, cid, text=f"Nachricht {i}")
    await world.settle()
    assert len(world.sim.business_messages(PNID)) == 45
    assert world.sim.error_counts[130429] == 0
    assert all(j.attempts == 1 and j.state == "done" for j in await _jobs(world))


@pytest.mark.dsk("II.2")
async def test_a_chunk_of_sends_settles_every_message_on_its_own(world):
    """The worker hands the claimed sends of a channel over together; within one chunk a message
    that is no longer sendable is skipped, a job whose lease another runner took is left alone,
    a refused send fails only its own message, and the rest are accepted."""
    cid = await _conversation(world)
    mids = [await _send(world, cid, text=f"Nachricht {i}") for i in range(8)]
    worker = world.services.outbox
    claimed = await worker.claim(20)
    assert len(claimed) == 8
    job_of = {j.payload["message_id"]: j for j in claimed}
    async with world.services.db.transaction() as s:
        await s.execute(update(Message).where(Message.id == mids[0]).values(status="failed"))
        await s.execute(update(Job).where(Job.id == job_of[mids[1]].id).values(locked_by="elsewhere/1"))
    world.sim.fail_next_send(PNID, 131026)

    await worker.batch_handlers["send_message"](claimed)
    await world.settle()

    jobs = {j.id: j for j in await _jobs(world)}
    assert (jobs[job_of[mids[0]].id].state, jobs[job_of[mids[0]].id].last_error) == (
        "done",
        "nothing to send",
    )
    assert jobs[job_of[mids[1]].id].state == "running"  # still the other runner's
    assert (await _message(world, mids[1])).status == "queued"
    rest = [await _message(world, m) for m in mids[2:]]
    failed = [m for m in rest if m.status == "failed"]
    assert [(m.error_code, m.error_reason) for m in failed] == [(131026, "undeliverable")]
    accepted = [m for m in rest if m.status in ("sent", "delivered")]
    assert len(accepted) == 5 and all(m.external_id for m in accepted)
    sent = world.sim.business_messages(PNID)
    assert sorted(m.wamid for m in sent) == sorted(m.external_id for m in accepted)
    assert sorted(jobs[job_of[m].id].state for m in mids[2:]) == ["done"] * 5 + ["failed"]
    assert all(jobs[job_of[m].id].started_at is not None for m in mids[2:])


async def test_a_crash_on_one_message_of_a_chunk_leaves_the_others_recorded(world, monkeypatch):
    """An exception that is not the channel's answer (a bug) ends only its own message's send:
    the others are recorded as accepted; its job keeps its lease and start mark, so recovery will
    put it in review, never resend it silently."""
    from pforte.conversations import jobs

    cid = await _conversation(world)
    mids = [await _send(world, cid, text=f"Nachricht {i}") for i in range(4)]
    real = jobs._outbound

    def broken(cipher, row, contact, att):
        if row.id == mids[2]:
            raise RuntimeError("bug")
        return real(cipher, row, contact, att)

    monkeypatch.setattr(jobs, "_outbound", broken)
    worker = world.services.outbox
    claimed = await worker.claim(10)
    await worker.batch_handlers["send_message"](claimed)

    states = [(await _message(world, m)).status for m in mids]
    assert states[2] == "sending"
    assert all(st in ("accepted", "sent", "delivered") for i, st in enumerate(states) if i != 2)
    assert len(world.sim.business_messages(PNID)) == 3
    (stuck,) = [j for j in await _jobs(world) if j.payload["message_id"] == mids[2]]
    assert stuck.state == "running" and stuck.started_at is not None


async def test_inbound_media_is_downloaded_checked_and_stored_encrypted(world):
    data = b"\x89PNG\r\n\x1a\n" + b"befund-bild" * 100
    await world.sim.patient_send_media(
        user=world.patient,
        phone_number_id=PNID,
        kind="image",
        data=data,
        mime_type="image/png",
        caption="Foto",
    )
    await world.settle()
    from pforte.conversations.models import Attachment

    (att,) = await all_rows(world.services, Attachment)
    assert att.state == "stored" and att.size == len(data)
    async with world.services.db.transaction() as s:
        got, mime, _ = await conv.read_attachment(
            session=s,
            keys=world.services.keys,
            blobs=world.services.blobs,
            org_id=world.org_id,
            attachment_id=att.id,
        )
    assert got == data and mime == "image/png"
    blob = next(world.services.blobs.root.rglob(att.blob_name))
    assert b"befund-bild" not in blob.read_bytes()


class _FailMedia(httpx.AsyncBaseTransport):
    """Refuses connections for media look-ups while ``down`` is set."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.down = True

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.down and request.method == "GET":
            raise httpx.ConnectError("refused", request=request)
        return await self.inner.handle_async_request(request)


async def test_media_failure_keeps_the_message_and_retries_the_download(world):
    failing = _FailMedia(world.services.http._transport)
    world.services.http._transport = failing
    await world.sim.patient_send_media(
        user=world.patient,
        phone_number_id=PNID,
        kind="image",
        data=b"\xff\xd8\xff" + b"x" * 50,
        mime_type="image/jpeg",
        caption="Bild",
    )
    await world.settle()
    from pforte.conversations.models import Attachment

    msgs = await all_rows(world.services, Message)
    (att,) = await all_rows(world.services, Attachment)
    assert len(msgs) == 1 and msgs[0].type == "image"
    assert att.state == "pending" and att.error_reason == "provider_unavailable"
    (job,) = await _jobs(world, "download_media")
    assert job.state == "queued"
    failing.down = False
    await _make_due(world)
    await world.settle()
    (att,) = await all_rows(world.services, Attachment)
    assert att.state == "stored"


async def test_media_with_wrong_hash_is_marked_failed_and_message_kept(world):
    await world.sim.patient_send_media(
        user=world.patient,
        phone_number_id=PNID,
        kind="image",
        data=b"\xff\xd8\xff" + b"y" * 50,
        mime_type="image/jpeg",
    )
    for media in world.sim.media.values():
        media.data = media.data + b"tampered"
    await world.settle()
    from pforte.conversations.models import Attachment

    (att,) = await all_rows(world.services, Attachment)
    assert att.state == "failed"
    assert len(await all_rows(world.services, Message)) == 1


async def test_staff_image_is_uploaded_and_sent_by_media_id(world):
    cid = await _conversation(world)
    data = b"\x89PNG\r\n\x1a\n" + b"roentgen" * 64
    async with world.services.db.transaction() as s:
        msg = await conv.send_media(
            session=s,
            keys=world.services.keys,
            blobs=world.services.blobs,
            org_id=world.org_id,
            conversation_id=cid,
            user_id=world.staff_id,
            data=data,
            mime_type="image/png",
            filename="roentgen.png",
            caption="Ihr Bild",
            now=world.services.clock.now(),
            max_bytes=5_000_000,
        )
    await world.settle()
    (sent,) = world.sim.business_messages(PNID)
    assert sent.type == "image" and sent.media_id and sent.text == "Ihr Bild"
    assert world.sim.media[sent.media_id].data == data
    assert (await _message(world, msg.id)).status in ("sent", "delivered")


@pytest.mark.dsk("I.12")
@pytest.mark.parametrize("enabled", [False, True])
async def test_read_receipts_only_when_the_organisation_enables_them(world, enabled):
    from pforte.orgs.models import Organisation

    async with world.services.db.transaction() as s:
        org = await s.get(Organisation, world.org_id)
        org.settings = {**org.settings, "send_read_receipts": enabled}
    cid = await _conversation(world)
    async with world.services.db.transaction() as s:
        await conv.mark_seen(
            session=s, org_id=world.org_id, conversation_id=cid, now=world.services.clock.now()
        )
    await world.settle()
    inbound = [m for m in world.sim.messages if m.direction == "in"]
    assert len(inbound) == 1
    assert inbound[0].read_by_business is enabled
    assert len(await _jobs(world, "mark_read")) == (1 if enabled else 0)
    async with world.services.db.transaction() as s:
        assert (await s.get(Conversation, cid)).unread_count == 0


@pytest.mark.parametrize(
    "db_kind", ["postgresql"]
)  # SQLite: the page's write would wait or fail, not interleave
async def test_a_message_arriving_while_the_page_opens_stays_unread(world):
    """The page reads the thread (1 unread), a patient message commits, then the page clears
    what it showed: the new message is still counted unread, not lost from the count."""
    cid = await _conversation(world)
    async with world.services.db.transaction() as s:
        now = world.services.clock.now()
        view = await conv.get(
            session=s, keys=world.services.keys, org_id=world.org_id, conversation_id=cid, now=now
        )
        assert view.unread_count == 1  # what the page shows
        await world.sim.patient_send_text(user=world.patient, phone_number_id=PNID, text="Noch etwas")
        await world.settle()  # committed by the ingest while the page's transaction is open
        await conv.mark_seen(
            session=s, org_id=world.org_id, conversation_id=cid, now=now, shown=view.unread_count
        )
    async with world.services.db.transaction() as s:
        assert (await s.get(Conversation, cid)).unread_count == 1
    async with world.services.db.transaction() as s:  # opened again: now it is seen
        await conv.mark_seen(
            session=s, org_id=world.org_id, conversation_id=cid, now=world.services.clock.now()
        )
    async with world.services.db.transaction() as s:
        assert (await s.get(Conversation, cid)).unread_count == 0


async def test_a_runner_that_lost_its_lease_neither_sends_nor_finishes(world):
    cid = await _conversation(world)
    mid = await _send(world, cid)
    worker = world.services.outbox
    (stale,) = await worker.claim(10)
    async with world.services.db.transaction() as s:  # the runner is slow; its lease runs out
        await s.execute(update(Job).values(locked_until=world.services.clock.now() - timedelta(seconds=1)))
    assert await worker.recover_stale() == 1
    (fresh,) = await worker.claim(10)
    assert fresh.id == stale.id and fresh.locked_by != stale.locked_by
    await worker.batch_handlers["send_message"]([stale])  # the slow runner finally gets to its send
    assert world.sim.business_messages(PNID) == []
    await worker.batch_handlers["send_message"]([fresh])
    await world.settle()
    assert len(world.sim.business_messages(PNID)) == 1
    (job,) = await _jobs(world)
    assert job.state == "done"
    assert (await _message(world, mid)).status in ("sent", "delivered")


async def test_leases_of_running_jobs_are_renewed(world):
    cid = await _conversation(world)
    await _send(world, cid)
    worker = world.services.outbox
    (_claimed,) = await worker.claim(10)
    async with world.services.db.transaction() as s:
        await s.execute(update(Job).values(locked_until=world.services.clock.now() + timedelta(seconds=1)))
    await worker.renew_leases()
    (job,) = await _jobs(world)
    assert job.locked_until > world.services.clock.now() + timedelta(seconds=30)
    assert await worker.recover_stale() == 0
