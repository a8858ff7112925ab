"""Per-channel send pacing that never exceeds the configured messages per second.

Two mechanisms work together:

* **Spacing.** Sends are spaced ``(1 + margin)/rate`` seconds apart (a leaky bucket with no burst),
  so the load is smooth. A caller that wakes more than ``LATE_TOLERANCE`` after its slot gives the
  slot up and takes the next free one instead of sending late into a bunch.
* **Window.** The provider counts *arrivals* in a sliding second. An arrival lies somewhere between
  the moment we start a request and the moment its answer is back, so a send may start only once
  the answer to the send ``rate`` places before it is back and more than one second has passed
  since. Then any two sends ``rate`` apart arrive more than a second apart, whatever the network or
  the event loop delayed: no one-second window can hold ``rate + 1`` arrivals. Spacing alone needs
  the jitter to stay under ``margin`` seconds; a loaded machine (a GC pause, a busy event loop)
  breaks that, and the Cloud API answers 130429.

Callers hold a ``Ticket`` from ``acquire()``, or one per send from ``acquire_many(n)`` (``n``
consecutive slots reserved at once, returning at the last of them, for a chunk of sends started
together), and call ``ticket.done()`` as soon as the provider's answer (or the error) is back.
``Pacer`` is shared by the tasks of one process; ``SharedPacer`` shares the spacing with every
process on one PostgreSQL database and keeps the window per process.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from sqlalchemy import text

from pforte.clock import Clock
from pforte.db import Database

log = logging.getLogger("pforte.outbox")

MARGIN = 0.10  # spacing is (1 + MARGIN) / rate
LATE_TOLERANCE = 0.03  # seconds a caller may send after its slot; later, it takes a new slot
MAX_RESLOTS = 3  # under sustained lag, stop re-slotting after this many tries (the window still holds)
WINDOW_S = 1.0  # the provider's counting window
WINDOW_SLACK = 0.002  # seconds added to the window for clocks that tick differently
STUCK_AFTER_S = 120.0  # a ticket never marked done (a bug) stops blocking the window after this


class Ticket:
    """One send's place in the window; ``done()`` once the provider's answer is back (idempotent)."""

    __slots__ = ("_clock", "_ended", "end")

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._ended = asyncio.Event()
        self.end = 0.0

    def done(self) -> None:
        """Record that the request is over: it can no longer arrive at the provider after now."""
        if not self._ended.is_set():
            self.end = self._clock.monotonic()
            self._ended.set()

    async def ended(self) -> float:
        """Wait until the request is over; its end on the monotonic clock."""
        await self._ended.wait()
        return self.end


class _Window:
    """Lets a send start only after the send ``rate`` places before it ended more than a second ago."""

    def __init__(self, rate_per_s: float, clock: Clock) -> None:
        self.size = max(1, int(rate_per_s))
        self._clock = clock
        self._recent: deque[Ticket] = deque()
        self._lock = asyncio.Lock()

    async def enter(self) -> Ticket:
        async with self._lock:  # tickets are handed out in start order
            if len(self._recent) >= self.size:
                oldest = self._recent.popleft()
                try:
                    end = await asyncio.wait_for(oldest.ended(), STUCK_AFTER_S)
                except TimeoutError:  # every later send of the channel waited this long: say so
                    log.warning("pacing: a send's answer never came back", extra={"waited_s": STUCK_AFTER_S})
                    end = self._clock.monotonic()
                free_at = end + WINDOW_S + WINDOW_SLACK
                wait = free_at - self._clock.monotonic()
                if wait > 0:
                    await self._clock.sleep(wait)
            ticket = Ticket(self._clock)
            self._recent.append(ticket)
            return ticket


class Pacer:
    """Spaces calls for one channel and keeps its window."""

    def __init__(self, rate_per_s: float, clock: Clock, margin: float = MARGIN) -> None:
        self.interval = (1.0 + margin) / rate_per_s
        self._clock = clock
        self._next = 0.0
        self._lock = asyncio.Lock()
        self._window = _Window(rate_per_s, clock)

    async def acquire(self) -> Ticket:
        """Wait for this call's slot (if woken too late, take the next free one, at most 3 times)
        and for room in the window."""
        for _ in range(MAX_RESLOTS):
            async with self._lock:
                now = self._clock.monotonic()
                slot = max(now, self._next)
                self._next = slot + self.interval
            if slot > now:
                await self._clock.sleep(slot - now)
            if self._clock.monotonic() - slot <= LATE_TOLERANCE:
                break
        return await self._window.enter()

    async def acquire_many(self, n: int) -> list[Ticket]:
        """Reserve ``n`` consecutive slots, wait for the last of them, then for room in the window
        for each. A chunk woken late keeps its slots: in one process the window alone keeps every
        second under the rate, and re-slotting a whole chunk wastes its slots (at 1,000/s it cost
        a fifth of the throughput)."""
        async with self._lock:
            now = self._clock.monotonic()
            first = max(now, self._next)
            self._next = first + n * self.interval
        last = first + (n - 1) * self.interval
        if last > now:
            await self._clock.sleep(last - now)
        return [await self._window.enter() for _ in range(n)]


_ENSURE_ROW = "INSERT INTO send_slots (channel_id, next_slot) VALUES (:c, 0) ON CONFLICT DO NOTHING"
_RESERVE = """
UPDATE send_slots
   SET next_slot = GREATEST(next_slot, EXTRACT(EPOCH FROM clock_timestamp())) + :span
 WHERE channel_id = :c
RETURNING next_slot - :span AS start, EXTRACT(EPOCH FROM clock_timestamp()) AS db_now
"""


class SharedPacer:
    """Pacing shared by every process on one PostgreSQL database.

    The channel's next free slot lives in ``send_slots`` on the database clock. A process reserves a
    small block of consecutive slots with one UPDATE (``GREATEST(next_slot, now) + block × interval``)
    and maps them onto its own monotonic clock, so N processes together never exceed the rate.
    Slots left unused for longer than one interval are dropped, never used late in a bunch.
    """

    def __init__(
        self, channel_id: str, rate_per_s: float, db: Database, clock: Clock, margin: float = MARGIN
    ):
        self.channel_id = channel_id
        self.margin = margin
        self.interval = (1.0 + margin) / rate_per_s
        self.block = max(1, int(rate_per_s // 20))  # about 50 ms of sends per reservation
        self._db = db
        self._clock = clock
        self._slots: deque[float] = deque()
        self._lock = asyncio.Lock()
        self._row_ready = False
        self._window = _Window(rate_per_s, clock)

    async def _reserve(self, count: int) -> list[float]:
        """Reserve ``count`` consecutive slots on the database clock; their times on ours."""
        span = count * self.interval
        async with self._db.engine.begin() as conn:
            if not self._row_ready:
                await conn.execute(text(_ENSURE_ROW), {"c": self.channel_id})
                self._row_ready = True
            row = (await conn.execute(text(_RESERVE), {"c": self.channel_id, "span": span})).one()
        local_now = self._clock.monotonic()
        start = local_now + (float(row.start) - float(row.db_now))
        return [start + i * self.interval for i in range(count)]

    async def acquire(self) -> Ticket:
        """Wait for a slot reserved for this process (if woken too late, take another, at most 3
        times) and for room in this process's window."""
        for _ in range(MAX_RESLOTS):
            async with self._lock:
                now = self._clock.monotonic()
                while self._slots and self._slots[0] < now - LATE_TOLERANCE:
                    self._slots.popleft()
                if not self._slots:
                    self._slots.extend(await self._reserve(self.block))
                    now = self._clock.monotonic()
                slot = self._slots.popleft()
            if slot > now:
                await self._clock.sleep(slot - now)
            if self._clock.monotonic() - slot <= LATE_TOLERANCE:
                break
        return await self._window.enter()

    async def acquire_many(self, n: int) -> list[Ticket]:
        """Reserve ``n`` consecutive slots with one UPDATE and wait for the last of them, then for
        room in this process's window.

        Other processes' sends are not in this window, so across processes the spacing's margin is
        what absorbs lateness: a chunk sent ``lag`` after its last slot puts at most
        ``(1 + span + lag) / interval`` sends into one second, under the rate while
        ``span + lag <= MARGIN`` seconds. A chunk later than that reserves new slots, once.
        """
        tolerance = max(LATE_TOLERANCE, self.margin * WINDOW_S - n * self.interval)
        for _ in range(2):
            async with self._lock:
                slots = await self._reserve(n)
            last = slots[-1]
            wait = last - self._clock.monotonic()
            if wait > 0:
                await self._clock.sleep(wait)
            if self._clock.monotonic() - last <= tolerance:
                break
        return [await self._window.enter() for _ in range(n)]


class RateLimits:
    """One pacer per channel, rebuilt when the channel's rate changes.

    With a PostgreSQL database the pacers are shared by all processes (``SharedPacer``); SQLite
    runs in one process, where a local ``Pacer`` is exact.
    """

    def __init__(self, clock: Clock, *, db: Database | None = None, margin: float = MARGIN) -> None:
        self._clock = clock
        self._db = db if db is not None and db.dialect == "postgresql" else None
        self._margin = margin
        self._pacers: dict[str, tuple[int, Pacer | SharedPacer]] = {}

    def for_channel(self, channel_id: str, rate_per_s: int) -> Pacer | SharedPacer:
        """The pacer of a channel at its current rate."""
        hit = self._pacers.get(channel_id)
        if hit is None or hit[0] != rate_per_s:
            pacer: Pacer | SharedPacer
            if self._db is not None:
                pacer = SharedPacer(channel_id, rate_per_s, self._db, self._clock, self._margin)
            else:
                pacer = Pacer(rate_per_s, self._clock, self._margin)
            hit = (rate_per_s, pacer)
            self._pacers[channel_id] = hit
        return hit[1]
