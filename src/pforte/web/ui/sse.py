"""The live-update stream of the inbox (Server-Sent Events).

The stream holds no database transaction: the session cookie is checked in a short transaction
that is rolled back (so an open tab does not keep its session alive), then the connection waits on
the organisation's event bus. Events carry ids only; the browser fetches what changed through the
normal, access-checked routes. A comment line every ``HEARTBEAT_SECONDS`` keeps proxies from
closing the connection; the session is re-checked at each heartbeat and the stream ends with a
``logout`` event when it has expired. The stream stops when the client disconnects.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta

from fastapi import Request
from fastapi.responses import StreamingResponse

from pforte.bootstrap import Services
from pforte.errors import AuthenticationError
from pforte.events import LiveEvent
from pforte.staff import service as staff
from pforte.staff.service import CurrentUser
from pforte.web.deps import SESSION_COOKIE, get_services

HEARTBEAT_SECONDS = 15.0
RETRY_MS = 3000


async def authenticate(services: Services, token: str | None) -> CurrentUser:
    """The user behind a session cookie, without refreshing the session's idle timer."""
    if not token:
        raise AuthenticationError("not logged in")
    async with services.db.sessionmaker() as session:
        await session.begin()
        try:
            return await staff.resolve(
                session=session,
                token=token,
                now=services.clock.now(),
                idle=timedelta(minutes=services.settings.session_idle_minutes),
            )
        finally:
            await session.rollback()


def format_event(event: LiveEvent) -> str:
    """One SSE frame: ``event: conversation`` / ``event: channel`` with a JSON body of ids."""
    data: dict[str, str] = {}
    if event.conversation_id:
        data["conversation_id"] = event.conversation_id
    return f"event: {event.type}\ndata: {json.dumps(data)}\n\n"


async def events(
    request: Request, services: Services, user: CurrentUser, token: str, heartbeat: float
) -> AsyncIterator[str]:
    """Frames for one subscriber until it disconnects or its session ends."""
    gauge = services.metrics.live_subscribers
    async with services.bus.subscribe(user.org_id) as queue:
        gauge.inc()
        try:
            yield f"retry: {RETRY_MS}\n: connected\n\n"
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), heartbeat)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    try:
                        await authenticate(services, token)
                    except AuthenticationError:
                        yield "event: logout\ndata: {}\n\n"
                        return
                    yield ": heartbeat\n\n"
                    continue
                yield format_event(event)
        finally:
            gauge.dec()


async def stream(request: Request, heartbeat: float | None = None) -> StreamingResponse:
    """The ``GET /events`` response (401 before any streaming if the session is not valid)."""
    heartbeat = heartbeat or HEARTBEAT_SECONDS
    services = get_services(request)
    token = request.cookies.get(SESSION_COOKIE) or ""
    user = await authenticate(services, token)
    return StreamingResponse(
        events(request, services, user, token, heartbeat),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
