"""The ASGI application: routes, error mapping, security headers, lifespan."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError

from pforte.bootstrap import Services
from pforte.channels.whatsapp.routes import WebhookEdge
from pforte.channels.whatsapp.routes import router as whatsapp_router
from pforte.errors import RETRY_AFTER_SECONDS, UNAVAILABLE, PforteError
from pforte.web.security import NO_TELEMETRY, SecurityHeaders

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

log = logging.getLogger("pforte.app")
GC_GEN0_THRESHOLD = 10_000  # a server process's youngest generation (Python's default: 700)


class PforteApp(FastAPI):
    """FastAPI with the webhook POST answered ahead of everything, FastAPI's own middlewares included.

    ``add_middleware`` only places a middleware inside the three FastAPI always puts first (the
    500 handler, exception telemetry, the body limit); each wrapped every webhook POST and its
    answer's ``send``. WebhookEdge does those three jobs itself (docs/performance.md, "The
    webhook's edge ahead of FastAPI's middlewares").
    """

    def __init__(self, *, services: Services, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._edge = WebhookEdge(super().__call__, services=services)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._edge(scope, receive, send)


def create_app(services: Services, *, manage_lifespan: bool = True, server_gc: bool = False) -> FastAPI:
    """Build the app around a composition root; the lifespan starts and stops its workers.

    ``server_gc`` (a server process, once): after start-up, everything alive so far (modules,
    table metadata, compiled statements, settings) moves out of the garbage collector's reach, so
    a full collection scans only what requests create. Without it a full collection paused the
    event loop for about 100 ms, three times in ten seconds of webhook load (docs/performance.md,
    "The webhook's edge, two groups in flight, and the garbage collector"). The youngest
    generation is collected after 10,000 new container objects instead of 700: a webhook POST
    builds thousands, and most are freed by reference counting anyway ("Collections of the
    youngest generation").
    """

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_lifespan:
            await services.start()
        if server_gc:
            gc.collect()
            gc.freeze()
            gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
        try:
            yield
        finally:
            if manage_lifespan:
                await services.stop()

    app = PforteApp(
        services=services,
        title="pforte",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        telemetry=NO_TELEMETRY,
    )
    app.state.services = services

    @app.exception_handler(PforteError)
    async def _pforte_error(request: Request, exc: PforteError) -> Response:
        from pforte.web.ui.errors import render_error

        return await render_error(request, exc)

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    @app.exception_handler(OSError)
    async def _db_down(request: Request, exc: Exception) -> Response:
        log.warning("dependency unavailable", extra={"error": type(exc).__name__})
        return JSONResponse(UNAVAILABLE, status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> Response:
        # Starlette re-raises after this answer, so the server still logs the exception type.
        services.reporter.capture(exc)
        return PlainTextResponse("Internal Server Error", status_code=500)

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        """The process is alive."""
        return "ok"

    @app.get("/readyz")
    async def readyz() -> Response:
        """The database answers and the background writers run."""
        try:
            async with services.db.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:
            return JSONResponse({"ready": False, "database": "down"}, status_code=503)
        return JSONResponse(
            {"ready": services.started, "database": "up"}, status_code=200 if services.started else 503
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics (no identifiers in any label)."""
        return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(whatsapp_router)
    from pforte.web.ui.audit import router as audit_router
    from pforte.web.ui.compliance import router as compliance_router
    from pforte.web.ui.exports import router as exports_router
    from pforte.web.ui.lifecycle import router as lifecycle_router
    from pforte.web.ui.privacy import router as privacy_router
    from pforte.web.ui.routes import router as ui_router
    from pforte.web.ui.settings import router as settings_router

    app.include_router(ui_router)
    app.include_router(lifecycle_router)
    app.include_router(privacy_router)
    app.include_router(settings_router)
    app.include_router(audit_router)
    app.include_router(exports_router)
    app.include_router(compliance_router)
    app.add_middleware(SecurityHeaders)
    return app
