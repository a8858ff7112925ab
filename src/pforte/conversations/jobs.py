"""Background jobs of conversations: send staff messages, fetch inbound media, send a read receipt.

Each handler runs in three steps with the network call outside any transaction:
1. load what is needed and, for a send, commit ``started_at`` (the point after which a crash means
   "outcome unknown");
2. call the channel (paced per number);
3. record the result and close the job in ONE transaction, then publish a live event.

Sends go in chunks (``send_messages``): the worker hands over the claimed send jobs of one channel,
and each chunk of up to ``CHUNK_SECONDS`` of the channel's rate takes its pacing slots at once,
then shares one start transaction and one result transaction; the HTTP calls run concurrently.
A message with a file to upload goes alone (``send_message``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from pforte.channels import service as channels
from pforte.channels.base import (
    ChannelDownError,
    ChannelError,
    MediaRef,
    NeedsTemplateError,
    OutboundMessage,
    OutcomeUnknownError,
    PermanentError,
    RateLimitedError,
    RetryableError,
    SendResult,
)
from pforte.channels.service import ChannelCache, ChannelRuntime
from pforte.channels.whatsapp.adapter import WhatsAppAdapter
from pforte.channels.whatsapp.client import GraphClient
from pforte.channels.whatsapp.transport import JsonPoster
from pforte.clock import Clock
from pforte.contacts.models import Contact
from pforte.conversations import ingest
from pforte.conversations import status as status_policy
from pforte.conversations.models import Attachment, Message
from pforte.crypto.blobs import BlobStore
from pforte.crypto.keys import KeyService
from pforte.db import Database, table_of
from pforte.events import EventBus, LiveEvent
from pforte.metrics import Metrics
from pforte.outbox.models import Job
from pforte.outbox.ratelimit import Pacer, RateLimits, SharedPacer, Ticket
from pforte.outbox.worker import (
    ClaimedJob,
    OutboxWorker,
    backoff_seconds,
    finish,
    finish_many,
    mark_started,
    mark_started_many,
)

log = logging.getLogger("pforte.jobs")
M = table_of(Message)
A = table_of(Attachment)
C = table_of(Contact)
J = table_of(Job)

MAX_SEND_ATTEMPTS = 12
MAX_MEDIA_ATTEMPTS = 8
DOWN_RECHECK_SECONDS = 30.0
CHUNK_SECONDS = 0.05  # a send chunk holds this many seconds of the channel's rate (50 at 1,000/s)
SENDABLE = ("queued", "sending")  # a message in any other state is not sent (again)
DOWNLOADABLE = ("pending", "failed")  # an attachment "stored" or "deleted" is never fetched (again)
MEDIA_DOWNLOADS = 16  # inbound media fetched at once per process (each holds a file in memory)


@dataclass
class JobDeps:
    """What the handlers need; built once in bootstrap."""

    db: Database
    keys: KeyService
    channels: ChannelCache
    blobs: BlobStore
    clock: Clock
    metrics: Metrics
    bus: EventBus
    http: httpx.AsyncClient
    limits: RateLimits
    media_max_bytes: int
    poster: JsonPoster | None = None  # send/mark-read transport; None: httpx on ``http``

    def adapter(self, rt: ChannelRuntime) -> WhatsAppAdapter:
        """A WhatsApp adapter for a channel's current credentials."""
        return WhatsAppAdapter(
            GraphClient(
                http=self.http,
                base_url=rt.graph_base_url,
                version=rt.graph_version,
                phone_number_id=rt.phone_number_id,
                access_token=rt.access_token,
                poster=self.poster,
            )
        )


def register(worker: OutboxWorker, deps: JobDeps, *, reconcile_seconds: float = 2.0) -> None:
    """Attach the conversation handlers and periodic tasks to the worker."""

    async def _send(jobs: list[ClaimedJob]) -> None:
        await send_messages(deps, jobs)

    downloads = asyncio.Semaphore(MEDIA_DOWNLOADS)

    async def _download(job: ClaimedJob) -> None:
        async with downloads:
            await download_media(deps, job)

    async def _mark_read(job: ClaimedJob) -> None:
        await mark_read(deps, job)

    worker.register_batch("send_message", _send, on_stale=send_outcome_unknown)
    worker.register("download_media", _download)
    worker.register("mark_read", _mark_read)
    worker.every("reconcile_statuses", reconcile_seconds, ingest.reconcile_pending_statuses)


async def send_outcome_unknown(conn: AsyncConnection, job: ClaimedJob, now: Any) -> None:
    """A worker died after starting a send (recovery already put the job in review): flag the message."""
    await conn.execute(
        update(M)
        .where(M.c.id == job.payload["message_id"], M.c.status.in_(("queued", "sending")))
        .values(status="review", review_reason="outcome_unknown")
    )


async def _channel_down(deps: JobDeps, rt: ChannelRuntime, err: ChannelDownError) -> None:
    now = deps.clock.now()
    async with deps.db.transaction() as session:
        await channels.set_state(
            session=session, channel_id=rt.id, state="DOWN", reason=f"{err.code}:{err.provider_code}", now=now
        )
    deps.channels.invalidate(rt.id)
    deps.bus.publish(LiveEvent(org_id=rt.org_id, type="channel"))
    log.warning("channel down", extra={"channel_id": rt.id, "provider_code": err.provider_code})


async def _requeue_while_down(deps: JobDeps, jobs: list[ClaimedJob]) -> None:
    """The channel is down: put the jobs back, without counting an attempt, to look again later."""
    async with deps.db.engine.begin() as conn:
        for job in jobs:
            await finish(
                conn,
                job,
                state="queued",
                now=deps.clock.now(),
                error="channel down",
                retry_in=DOWN_RECHECK_SECONDS,
                keep_attempt=False,
            )


async def send_messages(deps: JobDeps, jobs: list[ClaimedJob]) -> None:
    """Send the claimed send jobs of one channel: files one by one, the rest in paced chunks."""
    rt = await deps.channels.get(deps.db.sessionmaker, jobs[0].channel_id or "")
    if rt.state != "UP":
        await _requeue_while_down(deps, jobs)
        return
    pacer = deps.limits.for_channel(rt.id, rt.rate_limit_per_s)
    plain = [j for j in jobs if not j.payload.get("upload")]
    size = max(1, int(rt.rate_limit_per_s * CHUNK_SECONDS))
    await asyncio.gather(
        *(send_message(deps, j) for j in jobs if j.payload.get("upload")),
        *(_send_chunk(deps, rt, pacer, plain[i : i + size]) for i in range(0, len(plain), size)),
    )


async def _send_chunk(
    deps: JobDeps, rt: ChannelRuntime, pacer: Pacer | SharedPacer, jobs: list[ClaimedJob]
) -> None:
    """Send up to a chunk of text/template/interactive messages with two transactions in all.

    The pacing slots come first (a wait must not look like a started send); then ONE transaction
    loads the messages and records ``started_at`` for the jobs this claim still holds; the sends
    run concurrently, each ticket marked done when its answer is back; ONE transaction records the
    accepted ones and closes their jobs. A failed send takes the single-message failure path.
    """
    tickets = await pacer.acquire_many(len(jobs))
    by_message = {j.payload["message_id"]: j for j in jobs}
    try:
        async with deps.db.engine.begin() as conn:
            rows = {r.id: r for r in await conn.execute(select(M).where(M.c.id.in_(list(by_message))))}
            gone = [j for mid, j in by_message.items() if mid not in rows or rows[mid].status not in SENDABLE]
            for job in gone:
                await finish(conn, job, state="done", now=deps.clock.now(), error="nothing to send")
            live = [j for j in jobs if j not in gone]
            held = await mark_started_many(conn, live, deps.clock.now()) if live else set()
            live = [j for j in live if j.id in held]  # the others' leases were recovered: not ours
            mids = [j.payload["message_id"] for j in live]
            contacts = {
                r.id: r
                for r in await conn.execute(
                    select(C).where(C.c.id.in_(sorted({rows[m].contact_id for m in mids})))
                )
            }
            ciphers = await deps.keys.ciphers(conn, {c.dek_id for c in contacts.values()})
            atts = {r.message_id: r for r in await conn.execute(select(A).where(A.c.message_id.in_(mids)))}
            if mids:
                await conn.execute(update(M).where(M.c.id.in_(mids)).values(status="sending"))
        for spare in tickets[len(live) :]:
            spare.done()  # never used: frees its place in the window now
        adapter = deps.adapter(rt)
        outcomes = await asyncio.gather(
            *(
                _send_one(adapter, ticket, ciphers, rows[mid], contacts[rows[mid].contact_id], atts.get(mid))
                for ticket, mid in zip(tickets, mids, strict=False)
            ),
            return_exceptions=True,
        )
    finally:
        for ticket in tickets:
            ticket.done()
    # A bug in one message (an exception that is not the channel's answer) must not cost the others
    # their result: its job is left to lease expiry, and recovery puts it in review (it has started).
    for res in outcomes:
        if isinstance(res, BaseException) and not isinstance(res, ChannelError):
            log.warning("send crashed", extra={"error": type(res).__name__})
    accepted = [(j, res) for j, res in zip(live, outcomes, strict=True) if isinstance(res, SendResult)]
    now = deps.clock.now()
    if accepted:
        async with deps.db.engine.begin() as conn:
            await conn.execute(
                update(M)
                .where(M.c.id == bindparam("b_id"), M.c.status == "sending")
                .values(
                    status="accepted", external_id=bindparam("b_ext"), error_code=None, error_reason=None
                ),
                [{"b_id": j.payload["message_id"], "b_ext": res.external_id} for j, res in accepted],
            )
            await ingest.apply_pending_statuses_many(
                conn,
                channel_id=rt.id,
                sends={
                    res.external_id: (j.payload["message_id"], status_policy.MessageState(status="accepted"))
                    for j, res in accepted
                },
            )
            await finish_many(conn, [j for j, _ in accepted], state="done", now=now)
        deps.metrics.messages.labels("out", "accepted").inc(len(accepted))
    for job, res in zip(live, outcomes, strict=True):
        if isinstance(res, ChannelError):
            await _send_failed(deps, job, rows[job.payload["message_id"]], rt, res)
    for conversation_id in sorted({rows[j.payload["message_id"]].conversation_id for j, _ in accepted}):
        deps.bus.publish(LiveEvent(org_id=rt.org_id, type="conversation", conversation_id=conversation_id))


async def _send_one(
    adapter: WhatsAppAdapter, ticket: Ticket, ciphers: dict[str, Any], row: Any, contact: Any, att: Any
) -> SendResult | ChannelError:
    """One send of a chunk: its result, or the ChannelError that ended it."""
    try:
        return await adapter.send(_outbound(ciphers[contact.dek_id], row, contact, att))
    except ChannelError as err:
        return err
    finally:
        ticket.done()


async def send_message(deps: JobDeps, job: ClaimedJob) -> None:
    """Send one queued staff message through its channel.

    Two transactions for a text: after the pacing slot, one that loads the message and records
    ``started_at`` (only while this claim holds the job), and one that records the result. A media
    message first uploads its file (repeatable, so before ``started_at``).
    """
    mid = job.payload["message_id"]
    # Never hold a connection while another is opened (the channel cache may query): look up first.
    rt = await deps.channels.get(deps.db.sessionmaker, job.channel_id or "")
    if rt.state != "UP":
        await _requeue_while_down(deps, [job])
        return
    adapter = deps.adapter(rt)
    pacer = deps.limits.for_channel(rt.id, rt.rate_limit_per_s)
    if job.payload.get("upload"):
        try:
            await _upload_media(deps, adapter, pacer, mid)
        except ChannelError as err:
            async with deps.db.engine.begin() as conn:
                failed_row = (await conn.execute(select(M).where(M.c.id == mid))).one()
            await _send_failed(deps, job, failed_row, rt, err)
            return
    ticket = await pacer.acquire()  # the slot first: a long wait must not look like a started send
    try:
        async with deps.db.engine.begin() as conn:
            row = (await conn.execute(select(M).where(M.c.id == mid))).first()
            if row is None or row.status not in SENDABLE:
                await finish(conn, job, state="done", now=deps.clock.now(), error="nothing to send")
                return
            if not await mark_started(conn, job, deps.clock.now()):
                return  # our lease was recovered meanwhile; whoever holds the job now sends it
            contact = (await conn.execute(select(C).where(C.c.id == row.contact_id))).one()
            cipher = await deps.keys.cipher(conn, contact.dek_id)
            att = (await conn.execute(select(A).where(A.c.message_id == mid))).first()
            await conn.execute(update(M).where(M.c.id == mid).values(status="sending"))
        out = _outbound(cipher, row, contact, att)
        try:
            result = await adapter.send(out)
        finally:
            ticket.done()  # the answer is back: this send can no longer arrive later
    except ChannelError as err:
        await _send_failed(deps, job, row, rt, err)
        return
    finally:
        ticket.done()
    now = deps.clock.now()
    async with deps.db.engine.begin() as conn:
        await conn.execute(
            update(M)
            .where(M.c.id == mid, M.c.status == "sending")
            .values(status="accepted", external_id=result.external_id, error_code=None, error_reason=None)
        )
        await ingest.apply_pending_statuses(
            conn,
            channel_id=rt.id,
            message_id=mid,
            external_id=result.external_id,
            state=status_policy.MessageState(status="accepted"),
        )
        await finish(conn, job, state="done", now=now)
    deps.metrics.messages.labels("out", "accepted").inc()
    deps.bus.publish(LiveEvent(org_id=rt.org_id, type="conversation", conversation_id=row.conversation_id))


async def _upload_media(deps: JobDeps, adapter: WhatsAppAdapter, pacer: Any, mid: str) -> None:
    """Upload a staff message's file to the provider once (the media id is kept for retries)."""
    async with deps.db.engine.begin() as conn:
        att = (await conn.execute(select(A).where(A.c.message_id == mid))).first()
        if att is None or att.media_id is not None:
            return
        dek_id = (await conn.execute(select(C.c.dek_id).where(C.c.id == att.contact_id))).scalar_one()
        cipher = await deps.keys.cipher(conn, dek_id)
    data = deps.blobs.get(cipher=cipher, attachment_id=att.id, name=att.blob_name)
    filename = cipher.open_text(att.filename_enc, "attachments", "filename", att.id) or "file"
    ticket = await pacer.acquire()
    try:
        media_id = await adapter.upload_media(data=data, mime_type=att.mime_type, filename=filename)
    finally:
        ticket.done()
    async with deps.db.engine.begin() as conn:
        await conn.execute(update(A).where(A.c.id == att.id).values(media_id=media_id))


def _outbound(cipher: Any, row: Any, contact: Any, att: Any) -> OutboundMessage:
    """The channel-neutral message to send, decrypted from the stored rows."""
    mid = row.id
    details = json.loads(cipher.open_text(row.details_enc, "messages", "details", mid) or "{}")
    tpl = details.get("template") or {}
    return OutboundMessage(
        to_user_id=cipher.open_text(contact.bsuid_enc, "contacts", "bsuid", contact.id),
        to_phone=_e164(cipher.open_text(contact.phone_enc, "contacts", "phone", contact.id)),
        kind=row.type if row.type in ("text", "image", "document", "template", "interactive") else "text",
        text=None if row.type == "template" else cipher.open_text(row.body_enc, "messages", "body", mid),
        media_id=att.media_id if att is not None else None,
        filename=cipher.open_text(att.filename_enc, "attachments", "filename", att.id)
        if att is not None
        else None,
        template_name=tpl.get("name"),
        template_language=tpl.get("language"),
        template_params=tuple(tpl.get("params") or ()),
        reply_to_external_id=row.context_external_id,
        buttons=tuple((b["id"], b["title"]) for b in details.get("buttons") or ()),
    )


def _e164(phone: str | None) -> str | None:
    return None if not phone else (phone if phone.startswith("+") else "+" + phone)


async def _send_failed(
    deps: JobDeps, job: ClaimedJob, row: Any, rt: ChannelRuntime, err: ChannelError
) -> None:
    now = deps.clock.now()
    values: dict[str, Any]
    job_state, retry_in, keep = "failed", None, True
    if isinstance(err, ChannelDownError):
        await _channel_down(deps, rt, err)
        values = {"status": "queued", "error_code": err.provider_code, "error_reason": "channel_down"}
        job_state, retry_in, keep = "queued", DOWN_RECHECK_SECONDS, False
    elif isinstance(err, RetryableError) and job.attempts < MAX_SEND_ATTEMPTS:
        retry_after = err.retry_after
        if isinstance(err, RateLimitedError) and err.provider_code == 131056:
            retry_after = float(4 ** max(job.attempts - 1, 0))  # pair limit: 4^X seconds
        values = {"status": "queued", "error_code": err.provider_code, "error_reason": err.code}
        job_state, retry_in = "queued", backoff_seconds(job.attempts, retry_after)
    elif isinstance(err, OutcomeUnknownError):
        values = {"status": "review", "review_reason": "outcome_unknown"}
        job_state = "review"
    else:
        reason = (
            "needs_template"
            if isinstance(err, NeedsTemplateError)
            else (err.code if isinstance(err, PermanentError) else "gave_up")
        )
        values = {
            "status": "failed",
            "failed_at": now,
            "error_code": err.provider_code,
            "error_reason": reason,
            "error_title": (err.detail or "")[:300] or None,
        }
    async with deps.db.engine.begin() as conn:
        await conn.execute(
            update(M).where(M.c.id == row.id, M.c.status.in_(("queued", "sending"))).values(**values)
        )
        await finish(
            conn, job, state=job_state, now=now, error=err.code, retry_in=retry_in, keep_attempt=keep
        )
    deps.metrics.messages.labels("out", values["status"]).inc()
    deps.bus.publish(LiveEvent(org_id=rt.org_id, type="conversation", conversation_id=row.conversation_id))


async def download_media(deps: JobDeps, job: ClaimedJob) -> None:
    """Fetch an inbound attachment, check its hash, store it encrypted."""
    aid = job.payload["attachment_id"]
    now = deps.clock.now()
    rt = await deps.channels.get(deps.db.sessionmaker, job.channel_id or "")
    async with deps.db.engine.begin() as conn:
        att = (await conn.execute(select(A).where(A.c.id == aid))).first()
        if att is None or att.state not in DOWNLOADABLE:
            await finish(conn, job, state="done", now=now)
            return
        msg = (
            await conn.execute(select(M.c.channel_id, M.c.conversation_id).where(M.c.id == att.message_id))
        ).one()
        contact = (await conn.execute(select(C.c.dek_id).where(C.c.id == att.contact_id))).one()
        cipher = await deps.keys.cipher(conn, contact.dek_id)
    state: dict[str, Any]
    try:
        data, mime = await deps.adapter(rt).fetch_media(
            MediaRef(media_id=att.media_id, mime_type=att.mime_type, sha256=att.expected_sha256),
            max_bytes=deps.media_max_bytes,
        )
    except ChannelError as err:
        if isinstance(err, ChannelDownError):
            await _channel_down(deps, rt, err)
        retry = not isinstance(err, PermanentError) and job.attempts < MAX_MEDIA_ATTEMPTS
        state = {
            "state": "pending" if retry else "failed",
            "error_reason": err.code,
            "attempts": job.attempts,
        }
        async with deps.db.engine.begin() as conn:
            await conn.execute(update(A).where(A.c.id == aid, A.c.state.in_(DOWNLOADABLE)).values(**state))
            await finish(
                conn,
                job,
                state="queued" if retry else "failed",
                now=deps.clock.now(),
                error=err.code,
                retry_in=backoff_seconds(job.attempts, getattr(err, "retry_after", None)) if retry else None,
            )
        deps.bus.publish(
            LiveEvent(org_id=rt.org_id, type="conversation", conversation_id=msg.conversation_id)
        )
        return
    blob = deps.blobs.put(cipher=cipher, attachment_id=aid, data=data)
    async with deps.db.engine.begin() as conn:
        stored = await conn.execute(
            update(A)
            .where(A.c.id == aid, A.c.state.in_(DOWNLOADABLE))
            .values(
                state="stored",
                blob_name=blob,
                size=len(data),
                mime_type=mime or att.mime_type,
                error_reason=None,
                attempts=job.attempts,
            )
        )
        await finish(conn, job, state="done", now=deps.clock.now())
    if stored.rowcount != 1:
        # Deleted (or its message, conversation or patient) while the file was on its way: the
        # deletion stands, and the file it never knew of goes too.
        deps.blobs.delete(blob)
    deps.bus.publish(LiveEvent(org_id=rt.org_id, type="conversation", conversation_id=msg.conversation_id))


async def mark_read(deps: JobDeps, job: ClaimedJob) -> None:
    """Tell the provider the patient's messages were read (only when the organisation enabled it)."""
    rt = await deps.channels.get(deps.db.sessionmaker, job.channel_id or "")
    ticket = await deps.limits.for_channel(rt.id, rt.rate_limit_per_s).acquire()
    try:
        await deps.adapter(rt).mark_read(job.payload["external_id"])
        state, retry_in, error = "done", None, None
    except ChannelError as err:
        ticket.done()  # before the bookkeeping below
        if isinstance(err, ChannelDownError):
            await _channel_down(deps, rt, err)
        retry = isinstance(err, RetryableError) and job.attempts < 5
        state, retry_in, error = ("queued" if retry else "failed"), backoff_seconds(job.attempts), err.code
    finally:
        ticket.done()
    async with deps.db.engine.begin() as conn:
        await finish(conn, job, state=state, now=deps.clock.now(), error=error, retry_in=retry_in)
