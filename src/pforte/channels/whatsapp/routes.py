"""HTTP edge of the WhatsApp channel: Meta's GET handshake (a FastAPI route) and the signed webhook
POST (a pure ASGI middleware, WebhookEdge)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from pforte.channels.base import InboundBatch
from pforte.channels.service import ChannelRuntime
from pforte.channels.whatsapp import webhook
from pforte.errors import RETRY_AFTER_SECONDS, UNAVAILABLE, NotFoundError, PayloadTooLarge, PforteError
from pforte.web.security import HEADERS as SECURITY_HEADERS

if TYPE_CHECKING:
    from pforte.bootstrap import Services

router = APIRouter()
log = logging.getLogger("pforte.webhook")


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


async def ingest_webhook(services: Services, channel_id: str, body: bytes, signature: str | None) -> None:
    """Verify, parse and persist one webhook POST; return only after the commit.

    Raises PforteError (answered with its status, nothing stored) or a database error (503).
    """
    metrics = services.metrics
    try:
        rt = await services.channels.get(services.db.sessionmaker, channel_id)
        webhook.verify_signature(body=body, header=signature, app_secret=rt.app_secret)
        batches = webhook.parse_webhook(webhook.parse_payload(body))
    except PforteError as exc:
        metrics.updates_rejected.inc()
        metrics.webhook_requests.labels(str(exc.http_status)).inc()
        raise
    work: list[tuple[ChannelRuntime, InboundBatch]] = []
    for ref, batch in batches.items():
        target = rt if ref == rt.phone_number_id else await _sibling(services, rt, ref)
        if target is None:
            metrics.updates_rejected.inc(batch.size)
            log.warning("webhook for an unknown number", extra={"channel_id": channel_id})
            continue
        if batch.size:
            work.append((target, batch))
    try:
        results = await asyncio.gather(*(services.ingest.submit(ch, b) for ch, b in work))
    except PforteError as exc:
        metrics.webhook_requests.labels(str(exc.http_status)).inc()
        raise
    for r in results:
        metrics.updates_accepted.inc(r.accepted + r.statuses_applied + r.statuses_pending)
        metrics.updates_duplicate.inc(r.duplicates)
    metrics.requests_ok.inc()


async def _sibling(services: Services, rt: ChannelRuntime, ref: str) -> ChannelRuntime | None:
    """Another number of the same organisation and app (Meta sends one app's numbers to one URL)."""
    try:
        other = await services.channels.get_by_ref(services.db.sessionmaker, ref)
    except NotFoundError:
        return None
    if other.org_id != rt.org_id or other.app_secret != rt.app_secret:
        return None
    return other


class WebhookEdge:
    """The webhook POST as a pure ASGI middleware, ahead of FastAPI's middlewares, routing and
    request handling (``pforte.app.PforteApp`` calls it first).

    Meta's deliveries are the one request that arrives by the thousand per second. Through FastAPI
    (exception middlewares, router, request handler, response class) a one-update POST cost about
    twice the CPU of the work itself (docs/performance.md, "The webhook's edge"); here it costs the
    reading of the body, the work, and one response. Answers match the app's error handlers: a
    PforteError as JSON with its status, a database that is down as 503, every 503 with
    Retry-After, anything else as 500 (reported, then re-raised so the server logs it). Security
    headers are added here, since the response does not pass the SecurityHeaders middleware.
    """

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve ``POST /webhooks/whatsapp/{channel_id}``; pass everything else on."""
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            if path.startswith(PREFIX):
                channel_id = path[len(PREFIX) :]
                if channel_id and "/" not in channel_id:
                    await self._serve(channel_id, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _serve(self, channel_id: str, scope: Scope, receive: Receive, send: Send) -> None:
        services = self.services
        try:
            headers = Headers(scope=scope)
            body = await _read_body(headers, receive, services.settings.webhook_max_bytes)
            if body is None:  # the client went away before its body arrived: nothing to answer
                return
            await ingest_webhook(services, channel_id, body, headers.get("x-hub-signature-256"))
        except PforteError as exc:
            body = _json({"error": exc.code, "message": exc.message})
            await _respond(send, exc.http_status, body, JSON, RETRY if exc.http_status == 503 else [])
            return
        except (OperationalError, DBAPIError, OSError) as exc:
            log.warning("dependency unavailable", extra={"error": type(exc).__name__})
            await _respond(send, 503, _json(UNAVAILABLE), JSON, RETRY)
            return
        except Exception as exc:
            services.reporter.capture(exc)
            await _respond(send, 500, b"Internal Server Error", TEXT)
            raise
        await _respond(send, 200, b"OK", TEXT)


PREFIX = "/webhooks/whatsapp/"
JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"
RETRY = [(b"retry-after", str(RETRY_AFTER_SECONDS).encode())]  # on a 503; Meta re-delivers in any case


async def _read_body(headers: Headers, receive: Receive, limit: int) -> bytes | None:
    """The request body, refused past ``limit`` (declared or streamed); None if the client left."""
    declared = headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge("webhook body over the size limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge("webhook body over the size limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _json(value: dict[str, str]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


async def _respond(
    send: Send, status: int, body: bytes, content_type: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        *(extra or []),
        *SECURITY_HEADERS,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
