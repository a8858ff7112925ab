"""HTTP edge of the WhatsApp channel: Meta's GET handshake and the signed webhook POST."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from pforte.channels.base import InboundBatch
from pforte.channels.service import ChannelRuntime
from pforte.channels.whatsapp import webhook
from pforte.errors import NotFoundError, PayloadTooLarge, PforteError

router = APIRouter()
log = logging.getLogger("pforte.webhook")


async def _read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge("webhook body over the size limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge("webhook body over the size limit")
        chunks.append(chunk)
    return b"".join(chunks)


@router.get("/webhooks/whatsapp/{channel_id}", response_class=PlainTextResponse)
async def verify(channel_id: str, request: Request) -> PlainTextResponse:
    """Meta's subscription handshake: echo hub.challenge if the verify token matches."""
    services = request.app.state.services
    rt = await services.channels.get(services.db.sessionmaker, channel_id)
    q = request.query_params
    challenge = webhook.verify_subscription(
        mode=q.get("hub.mode"),
        token=q.get("hub.verify_token"),
        challenge=q.get("hub.challenge"),
        expected_token=rt.verify_token,
    )
    return PlainTextResponse(challenge)


@router.post("/webhooks/whatsapp/{channel_id}")
async def receive(channel_id: str, request: Request) -> PlainTextResponse:
    """Verify, parse and persist a webhook; answer 200 only after the commit."""
    services = request.app.state.services
    counter = services.metrics.webhook_updates
    try:
        body = await _read_limited(request, services.settings.webhook_max_bytes)
        rt = await services.channels.get(services.db.sessionmaker, channel_id)
        webhook.verify_signature(
            body=body, header=request.headers.get("x-hub-signature-256"), app_secret=rt.app_secret
        )
        batches = webhook.parse_webhook(webhook.parse_payload(body))
    except PforteError as exc:
        counter.labels("rejected").inc()
        services.metrics.webhook_requests.labels(str(exc.http_status)).inc()
        raise
    work: list[tuple[ChannelRuntime, InboundBatch]] = []
    for ref, batch in batches.items():
        target = rt if ref == rt.phone_number_id else await _sibling(request, rt, ref)
        if target is None:
            counter.labels("rejected").inc(batch.size)
            log.warning("webhook for an unknown number", extra={"channel_id": channel_id})
            continue
        if batch.size:
            work.append((target, batch))
    try:
        results = await asyncio.gather(*(services.ingest.submit(ch, b) for ch, b in work))
    except PforteError as exc:
        services.metrics.webhook_requests.labels(str(exc.http_status)).inc()
        raise
    for r in results:
        counter.labels("accepted").inc(r.accepted + r.statuses_applied + r.statuses_pending)
        counter.labels("duplicate").inc(r.duplicates)
    services.metrics.webhook_requests.labels("200").inc()
    return PlainTextResponse("OK")


async def _sibling(request: Request, rt: ChannelRuntime, ref: str) -> ChannelRuntime | None:
    """Another number of the same organisation and app (Meta sends one app's numbers to one URL)."""
    services = request.app.state.services
    try:
        other = await services.channels.get_by_ref(services.db.sessionmaker, ref)
    except NotFoundError:
        return None
    if other.org_id != rt.org_id or other.app_secret != rt.app_secret:
        return None
    return other
