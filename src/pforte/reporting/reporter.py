"""The process's Sentry client: created only while error reporting is on, closed when it goes off.

Sentry's client is process-global, while the setting lives in the database and may be changed by
any process. So each process keeps an :class:`ErrorReporter` that applies the stored setting at
start-up, right after this process changed it, when another process announces a change on the
event bus (PostgreSQL LISTEN/NOTIFY), and once a minute in case such an announcement was lost
(SQLite has no bus between processes).

The client is configured to collect as little as it can (no default or auto-enabled integrations, no PII,
no local variables, source lines, request bodies, breadcrumbs, sessions, traces or PII) and every
event still passes :func:`pforte.reporting.scrubber.scrub_event` before it leaves. Errors reach it
from two places: unhandled exceptions in requests (``app.py``) and crashed background jobs (the
outbox worker logs them at WARNING while the exception is being handled; :class:`_JobErrors`
picks the exception up from there, since the worker itself does not know about reporting).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from importlib import metadata
from typing import Any

import sentry_sdk
from sentry_sdk.transport import Transport

from pforte.db import Database
from pforte.events import ERROR_REPORTING_CHANGED, LiveEvent
from pforte.reporting import service
from pforte.reporting.scrubber import scrub_breadcrumb, scrub_event
from pforte.reporting.service import OFF, State

log = logging.getLogger("pforte.reporting")
RECHECK_SECONDS = 60.0
CLOSE_TIMEOUT_SECONDS = 2.0
JOB_LOGGER = "pforte.outbox"  # the worker's logger: "job handler error" while the exception is handled


def pforte_release() -> str:
    """The release name sent with each report (``pforte@<version>``)."""
    try:
        return f"pforte@{metadata.version('pforte')}"
    except metadata.PackageNotFoundError:
        return "pforte@unknown"


def client_options(dsn: str, transport: Transport | None = None) -> dict[str, Any]:
    """``sentry_sdk.init`` options: the least the SDK can collect, and the scrubber on every event."""
    options: dict[str, Any] = {
        "dsn": dsn,
        "release": pforte_release(),
        "server_name": "",  # not the host name
        "default_integrations": False,  # no logging/stdlib/threading/excepthook/modules/argv hooks
        "auto_enabling_integrations": False,  # no web-framework integrations that read requests
        "integrations": [],
        # send_default_pii stays unset: that means off, and it keeps the SDK's own EventScrubber
        # (data_collection, which supersedes it in sentry-sdk 2.75, would switch that scrubber off).
        "include_local_variables": False,
        "include_source_context": False,
        "max_request_body_size": "never",
        "max_breadcrumbs": 0,
        "attach_stacktrace": False,
        "traces_sample_rate": None,
        "profiles_sample_rate": None,
        "propagate_traces": False,
        "trace_propagation_targets": [],
        "auto_session_tracking": False,
        "send_client_reports": False,
        "enable_logs": False,
        "enable_metrics": False,
        "before_send": scrub_event,
        "before_breadcrumb": scrub_breadcrumb,
    }
    if transport is not None:
        options["transport"] = transport
    return options


class _JobErrors(logging.Handler):
    """Reports the exception a crashed job left behind (logged by the worker inside its ``except``)."""

    def __init__(self, reporter: ErrorReporter) -> None:
        super().__init__(logging.WARNING)
        self._reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        """Capture the exception of the record, or the one being handled while it was logged."""
        exc: BaseException | None = None
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
        elif record.name == JOB_LOGGER:
            exc = sys.exc_info()[1]
        if isinstance(exc, Exception):
            self._reporter.capture(exc)


class ErrorReporter:
    """Keeps this process's Sentry client in line with the stored setting."""

    def __init__(
        self, *, db: Database, transport: Transport | None = None, recheck_seconds: float = RECHECK_SECONDS
    ) -> None:
        self.db = db
        self.transport = transport  # tests hand in a capturing transport; None means HTTP to the DSN
        self.recheck_seconds = recheck_seconds
        self.state: State = OFF
        self._client: Any = None
        self._handler = _JobErrors(self)
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[Any]] = set()

    @property
    def active(self) -> bool:
        """Whether this process sends error reports now."""
        return self._client is not None

    async def start(self) -> None:
        """Apply the stored setting and keep re-reading it (a database still starting up is retried)."""
        await self._reload_quietly()
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll(), name="pforte-error-reporting")

    async def stop(self) -> None:
        """Stop re-reading and close the client (pending reports get a short time to leave)."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        await self.settle()
        await self.apply(OFF)

    async def reload(self) -> State:
        """Read the stored setting and apply it."""
        async with self.db.transaction() as session:
            state = await service.get(session=session)
        await self.apply(state)
        return state

    async def apply(self, state: State) -> None:
        """Create, replace or close the client so that it matches ``state``."""
        async with self._lock:
            wanted = state if state.enabled and state.dsn else OFF
            if (wanted.enabled, wanted.dsn) == (self.state.enabled, self.state.dsn):
                self.state = wanted
                return
            if self._client is not None:
                client, self._client = self._client, None
                logging.getLogger("pforte").removeHandler(self._handler)
                scope = sentry_sdk.get_global_scope()
                if scope.client is client:
                    scope.set_client(None)
                # Closing flushes what is queued (a blocking wait): off the event loop.
                await asyncio.to_thread(client.close, CLOSE_TIMEOUT_SECONDS)
            if wanted.enabled and wanted.dsn:
                sentry_sdk.init(**client_options(wanted.dsn, self.transport))
                self._client = sentry_sdk.get_client()
                logging.getLogger("pforte").addHandler(self._handler)
            self.state = wanted
            log.info("error reporting applied", extra={"status": "on" if self.active else "off"})

    def capture(self, exc: BaseException) -> None:
        """Report one exception (does nothing while reporting is off)."""
        if self._client is not None:
            sentry_sdk.capture_exception(exc)

    def on_event(self, event: LiveEvent) -> None:
        """Bus watcher: another process (or this one) changed the setting, so read it again."""
        if event.type != ERROR_REPORTING_CHANGED:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._reload_quietly())
        except RuntimeError:
            return  # no loop (shutting down): the periodic check catches up
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def settle(self) -> None:
        """Wait for reloads started by bus events (for tests and shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def _reload_quietly(self) -> None:
        try:
            await self.reload()
        except Exception as exc:
            log.warning("error reporting reload failed", extra={"error": type(exc).__name__})

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.recheck_seconds)
            await self._reload_quietly()
