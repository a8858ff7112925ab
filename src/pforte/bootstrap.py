"""The one composition root: builds every long-lived piece from settings; tests override pieces."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
from sentry_sdk.transport import Transport

from pforte.audit import jobs as audit_jobs
from pforte.channels.service import ChannelCache
from pforte.channels.whatsapp.transport import AiohttpPoster, HttpxPoster, JsonPoster
from pforte.clock import Clock, SystemClock
from pforte.compliance import jobs as compliance_jobs
from pforte.config import Settings
from pforte.conversations import jobs as conversation_jobs
from pforte.conversations.ingest import Ingestor, IngestWriter, reconcile_pending_statuses
from pforte.crypto.blobs import BlobStore
from pforte.crypto.keys import FileKeyProvider, KeyProvider, KeyService
from pforte.db import Database
from pforte.deletion.ledger import FileLedger, Ledger
from pforte.deletion.service import Eraser
from pforte.events import KEY_DESTROYED, EventBus, PgEventBridge
from pforte.metrics import Metrics
from pforte.outbox.ratelimit import RateLimits
from pforte.outbox.worker import OutboxWorker
from pforte.privacy import jobs as privacy_jobs
from pforte.reporting.reporter import ErrorReporter
from pforte.retention import jobs as retention_jobs
from pforte.staff import jobs as staff_jobs


@dataclass
class Services:
    """Everything a running pforte needs, created once and shared by requests and jobs."""

    settings: Settings
    clock: Clock
    db: Database
    keys: KeyService
    blobs: BlobStore
    metrics: Metrics
    bus: EventBus
    channels: ChannelCache
    ingest: IngestWriter
    outbox: OutboxWorker
    http: httpx.AsyncClient
    ledger: Ledger
    eraser: Eraser
    reporter: ErrorReporter
    bridge: PgEventBridge | None = None
    started: bool = False
    poster: AiohttpPoster | None = None  # the production send transport, closed on stop
    limits: RateLimits | None = None  # the channels' pacers; shared ones give back places on stop

    async def start(self) -> None:
        """Start background tasks (ingest writer; outbox worker unless disabled)."""
        if self.started:
            return
        if self.bridge is not None:
            await self.bridge.start()
        await self.ingest.start()
        await self.reporter.start()
        if self.settings.run_workers:
            await self.outbox.start()
        self.started = True

    async def stop(self) -> None:
        """Stop background tasks and close connections."""
        if self.started:
            await self.outbox.stop()
            if self.limits is not None:
                await self.limits.settle()
            await self.ingest.stop()
            if self.bridge is not None:
                await self.bridge.stop()
            await self.reporter.stop()
            self.started = False
        await self.http.aclose()
        if self.poster is not None:
            await self.poster.close()
        await self.db.dispose()


def build_services(
    settings: Settings,
    *,
    clock: Clock | None = None,
    key_provider: KeyProvider | None = None,
    graph_transport: httpx.AsyncBaseTransport | None = None,
    error_transport: Transport | None = None,
    **_: Any,
) -> Services:
    """Wire pforte; nothing connects until ``start`` or the first query."""
    clock = clock or SystemClock()
    db = Database(settings.effective_database_url)
    provider = key_provider or FileKeyProvider(settings.effective_key_file, clock)
    keys = KeyService(provider, clock=clock, ttl=settings.dek_cache_seconds, size=settings.dek_cache_size)
    blobs = BlobStore(settings.effective_blob_dir)
    metrics = Metrics()
    bus = EventBus()
    bus.watchers.append(lambda e: keys.forget(e.ref) if e.type == KEY_DESTROYED and e.ref else None)
    reporter = ErrorReporter(db=db, transport=error_transport)
    bus.watchers.append(reporter.on_event)
    ledger = FileLedger(settings.effective_erasure_ledger)
    eraser = Eraser(keys=keys, blobs=blobs, ledger=ledger, bus=bus)
    channels = ChannelCache(keys)
    http = httpx.AsyncClient(transport=graph_transport, timeout=settings.graph_timeout_seconds)
    # Sends go over aiohttp on the real network (cheaper per request); an injected transport (tests,
    # simulator) keeps them on httpx.
    aio_poster: AiohttpPoster | None = None
    poster: JsonPoster
    if graph_transport is None:
        poster = aio_poster = AiohttpPoster(timeout=settings.graph_timeout_seconds, limit=200)
    else:
        poster = HttpxPoster(http)
    ingest = IngestWriter(
        db=db,
        ingestor=Ingestor(keys=keys, clock=clock, audit_receipts=settings.audit_receipts),
        bus=bus,
        metrics=metrics,
        window_ms=settings.group_commit_window_ms,
        max_updates=settings.group_commit_max_updates,
        writers=settings.ingest_writers,
    )
    outbox = OutboxWorker(
        db=db,
        clock=clock,
        metrics=metrics,
        poll_seconds=settings.outbox_poll_seconds,
        batch=settings.outbox_batch,
        lease_seconds=settings.outbox_lease_seconds,
        concurrency=settings.outbox_concurrency,
    )
    limits = RateLimits(clock, db=db)
    conversation_jobs.register(
        outbox,
        conversation_jobs.JobDeps(
            db=db,
            keys=keys,
            channels=channels,
            blobs=blobs,
            clock=clock,
            metrics=metrics,
            bus=bus,
            http=http,
            limits=limits,
            media_max_bytes=settings.media_max_bytes,
            poster=poster,
        ),
        reconcile_seconds=settings.status_reconcile_seconds,
    )
    ingest.on_parked = lambda: outbox.run_soon(reconcile_pending_statuses)
    staff_jobs.register(outbox, clock=clock, idle=timedelta(minutes=settings.session_idle_minutes))
    audit_jobs.register(outbox, keys=keys, clock=clock)
    retention_jobs.register(outbox, db=db, eraser=eraser, clock=clock, settings=settings)
    compliance_jobs.register(outbox, db=db, clock=clock, settings=settings, key_provider=provider)
    privacy_jobs.register(
        outbox,
        privacy_jobs.PrivacyDeps(
            db=db, keys=keys, clock=clock, bus=bus, worker=outbox, base_url=settings.base_url
        ),
    )
    return Services(
        settings=settings,
        clock=clock,
        db=db,
        keys=keys,
        blobs=blobs,
        metrics=metrics,
        bus=bus,
        channels=channels,
        ingest=ingest,
        outbox=outbox,
        http=http,
        ledger=ledger,
        eraser=eraser,
        reporter=reporter,
        poster=aio_poster,
        limits=limits,
        bridge=PgEventBridge(settings.effective_database_url, bus) if db.dialect == "postgresql" else None,
    )
