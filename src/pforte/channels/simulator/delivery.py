"""Webhook delivery: a queue of timed jobs worked off by one loop on the injected clock.

Two kinds of job share the queue: webhook POST attempts and simulator actions due later (for example
"mark this message delivered in 50 ms"). Semantics copied from Meta (reference §1.8):

* only HTTP 200 acknowledges a delivery; everything else (other 2xx, 4xx/5xx, timeouts, connection
  errors) is retried with the configured backoff, always with the identical body;
* attempts stop once the next one would fall later than ``give_up_after_s`` (7 days) after the first;
* up to ``batch_max`` fresh updates for one number may share a POST;
* up to ``webhook_concurrency`` POSTs are in flight at once ("Meta attempts to deliver webhooks
  concurrently"), so a later update may arrive first.

The loop idles on an event, not on the clock, so a FakeClock only moves while something is due.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import httpx

from pforte.channels.simulator import payloads
from pforte.channels.simulator.config import SimulatorConfig
from pforte.clock import Clock

if TYPE_CHECKING:
    from pforte.channels.simulator.state import SimNumber

log = logging.getLogger(__name__)

DeliveryState = Literal["pending", "delivered", "given_up"]


@dataclass
class WebhookAttempt:
    """One POST of a delivery: the HTTP status, or the transport error's class name."""

    at: datetime
    status_code: int | None
    error: str | None = None


@dataclass
class WebhookDelivery:
    """One webhook body and everything that happened to it."""

    id: int
    phone_number_id: str
    body: bytes
    update_count: int
    attempts: list[WebhookAttempt] = field(default_factory=list)
    state: DeliveryState = "pending"
    first_attempt_mono: float | None = None

    @property
    def attempt_count(self) -> int:
        """How many POSTs were made."""
        return len(self.attempts)

    @property
    def status_codes(self) -> list[int | None]:
        """HTTP status of every attempt (None for a transport error)."""
        return [a.status_code for a in self.attempts]

    @property
    def payload(self) -> dict[str, Any]:
        """The body parsed back into JSON."""
        return json.loads(self.body)

    @property
    def delivered(self) -> bool:
        """True once a POST was answered with 200."""
        return self.state == "delivered"


@dataclass
class _Action:
    run: Callable[[], None]


class DeliveryQueue:
    """Timed jobs (webhook attempts and simulator actions) worked off by one background loop."""

    def __init__(
        self,
        *,
        config: SimulatorConfig,
        clock: Clock,
        lookup: Callable[[str], SimNumber],
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._lookup = lookup
        self._transport = transport
        self._heap: list[tuple[float, int, WebhookDelivery | _Action]] = []
        self._fresh: list[tuple[str, dict[str, Any]]] = []
        self._seq = itertools.count()
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._held = False
        self._task: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None
        self.log: list[WebhookDelivery] = []

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the loop task is alive."""
        return self._task is not None and not self._task.done()

    def client(self) -> httpx.AsyncClient:
        """The HTTP client used for webhooks (created on first use)."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=self._transport,
                timeout=httpx.Timeout(self._config.webhook_timeout_s),
                headers={"User-Agent": "facebookexternalua"},
            )
        return self._client

    async def start(self) -> None:
        """Start the loop (idempotent)."""
        if self.running:
            return
        # Fresh events: the previous loop (if any) may have belonged to another event loop.
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        if not self.pending:
            self._idle.set()
        self.client()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-webhook-delivery")
        self._wake.set()

    async def stop(self) -> None:
        """Stop the loop and close the client; queued jobs stay queued (attempts in flight too)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        attempts, self._in_flight = self._in_flight, set()
        for attempt in attempts:
            attempt.cancel()
        await asyncio.gather(*attempts, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def drain(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 (prescribed API)
        """Wait (real time) until nothing is queued or in flight; starts the loop if needed."""
        await self.start()
        self._wake.set()
        await asyncio.wait_for(self._idle.wait(), timeout)

    # -- producing ---------------------------------------------------------------------------------

    def enqueue_update(self, phone_number_id: str, value: dict[str, Any]) -> None:
        """Queue one change value (messages or statuses) for the number's webhook."""
        self._fresh.append((phone_number_id, value))
        self._poke()

    def schedule(self, delay_s: float, action: Callable[[], None]) -> None:
        """Run ``action`` once ``delay_s`` seconds of clock time have passed."""
        due = self._clock.monotonic() + max(delay_s, 0.0)
        heapq.heappush(self._heap, (due, next(self._seq), _Action(action)))
        self._poke()

    def hold(self) -> None:
        """Keep fresh updates back (so several can be batched) until ``release``."""
        self._held = True

    def release(self) -> None:
        """Let held updates go, batched up to ``batch_max`` per POST."""
        self._held = False
        self._poke()

    @property
    def pending(self) -> int:
        """Queued jobs, attempts in flight, and fresh updates not yet turned into deliveries."""
        return len(self._heap) + len(self._in_flight) + len(self._fresh)

    def _poke(self) -> None:
        self._idle.clear()
        self._wake.set()

    # -- the loop ----------------------------------------------------------------------------------

    def _form_deliveries(self) -> None:
        """Turn fresh updates into deliveries, grouping per number up to batch_max."""
        if self._held or not self._fresh:
            return
        fresh, self._fresh = self._fresh, []
        groups: dict[str, list[dict[str, Any]]] = {}
        for pnid, value in fresh:
            groups.setdefault(pnid, []).append(value)
        now = self._clock.monotonic()
        size = self._config.batch_max
        for pnid, values in groups.items():
            waba_id = self._lookup(pnid).waba_id
            for start in range(0, len(values), size):
                chunk = values[start : start + size]
                body = payloads.dump(payloads.envelope(waba_id, chunk))
                delivery = WebhookDelivery(
                    id=next(self._ids), phone_number_id=pnid, body=body, update_count=len(chunk)
                )
                self.log.append(delivery)
                heapq.heappush(self._heap, (now, next(self._seq), delivery))

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            self._form_deliveries()
            if not self._heap:
                if not self._in_flight and (not self._fresh or self._held):
                    self._idle.set()
                await self._wake.wait()
                continue
            due, _, job = self._heap[0]
            delay = due - self._clock.monotonic()
            if delay > 0:
                await self._sleep_or_wake(delay)
                continue
            if isinstance(job, _Action):
                heapq.heappop(self._heap)
                try:
                    job.run()
                except Exception:
                    log.exception("simulator action failed")
            elif len(self._in_flight) < self._config.webhook_concurrency:
                heapq.heappop(self._heap)
                attempt = asyncio.get_running_loop().create_task(self._attempt_in_flight(job))
                self._in_flight.add(attempt)
            else:
                await self._wake.wait()  # an attempt that ends wakes the loop

    async def _attempt_in_flight(self, delivery: WebhookDelivery) -> None:
        try:
            await self._attempt(delivery)
        except asyncio.CancelledError:  # stop(): the delivery goes back to the queue, not lost
            if delivery.state == "pending" and not any(job is delivery for _, _, job in self._heap):
                heapq.heappush(self._heap, (self._clock.monotonic(), next(self._seq), delivery))
            raise
        finally:
            self._in_flight.discard(asyncio.current_task())  # type: ignore[arg-type]
            self._wake.set()

    async def _sleep_or_wake(self, delay: float) -> None:
        sleeper = asyncio.ensure_future(self._clock.sleep(delay))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                task.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)

    async def _attempt(self, delivery: WebhookDelivery) -> None:
        number = self._lookup(delivery.phone_number_id)
        if delivery.first_attempt_mono is None:
            delivery.first_attempt_mono = self._clock.monotonic()
        status: int | None = None
        error: str | None = None
        if number.webhook_down is not None:
            status = number.webhook_down
        elif not number.webhook_url:
            error = "NoWebhookUrl"
        else:
            headers = {
                "Content-Type": "application/json",
                "X-Hub-Signature-256": payloads.sign(delivery.body, number.app_secret),
            }
            try:
                response = await self.client().post(
                    number.webhook_url, content=delivery.body, headers=headers
                )
                status = response.status_code
            except Exception as exc:  # a crashing in-process receiver counts as a failed attempt too
                error = type(exc).__name__
        delivery.attempts.append(WebhookAttempt(at=self._clock.now(), status_code=status, error=error))
        if status == 200:
            delivery.state = "delivered"
            return
        schedule = self._config.retry_schedule_s
        delay = schedule[min(delivery.attempt_count - 1, len(schedule) - 1)]
        elapsed = self._clock.monotonic() - delivery.first_attempt_mono
        if elapsed + delay > self._config.give_up_after_s:
            delivery.state = "given_up"
            log.warning("webhook delivery %s given up after %s attempts", delivery.id, delivery.attempt_count)
            return
        log.info(
            "webhook delivery %s attempt %s failed (%s)", delivery.id, delivery.attempt_count, status or error
        )
        due = self._clock.monotonic() + delay
        heapq.heappush(self._heap, (due, next(self._seq), delivery))
