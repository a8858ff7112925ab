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
``Pacer`` is shared by the tasks of one process; ``SharedPacer`` shares the spacing and the window
with every process on one PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from pforte.clock import Clock
from pforte.db import Database, new_id

log = logging.getLogger("pforte.outbox")

MARGIN = 0.10  # spacing is (1 + MARGIN) / rate
LATE_TOLERANCE = 0.03  # seconds a caller may send after its slot; later, it takes a new slot
MAX_RESLOTS = 3  # under sustained lag, stop re-slotting after this many tries (the window still holds)
WINDOW_S = 1.0  # the provider's counting window
WINDOW_SLACK = 0.002  # seconds added to the window for clocks that tick differently
STUCK_AFTER_S = 120.0  # a ticket never marked done (a bug) stops blocking the window after this
SETTLE_S = 5.0  # on shutdown, how long the places of finished sends may take to go back


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

    async def ended_or_stuck(self) -> float:
        """Its end, or, once ``STUCK_AFTER_S`` passed without one (a caller bug), now, with a
        warning: every later send of the channel waited that long."""
        try:
            return await asyncio.wait_for(self.ended(), STUCK_AFTER_S)
        except TimeoutError:
            log.warning("pacing: a send's answer never came back", extra={"waited_s": STUCK_AFTER_S})
            return self._clock.monotonic()


class _Window:
    """Lets a send start only after the send ``rate`` places before it ended more than a second ago."""

    def __init__(self, rate_per_s: float, clock: Clock) -> None:
        self.size = max(1, int(rate_per_s))
        self._clock = clock
        self._recent: deque[Ticket] = deque()
        self._lock = asyncio.Lock()

    async def enter(self, n: int = 1) -> list[Ticket]:
        """``n`` consecutive places, handed out in start order.

        A chunk takes all its places under one hold of the lock. Taken one at a time, chunks
        queued on the lock would interleave; once the window is full, the chunk at the front can
        wait for the end of a send whose chunk is still queued behind it for its remaining places
        and so has not started: a deadlock until ``STUCK_AFTER_S``.
        """
        if n > self.size:  # it would wait for the end of its own first send, which never starts
            raise ValueError(f"a chunk of {n} sends does not fit a window of {self.size}")
        async with self._lock:
            tickets = []
            for _ in range(n):
                if len(self._recent) >= self.size:
                    await self._wait_for_end(self._recent.popleft())
                ticket = Ticket(self._clock)
                self._recent.append(ticket)
                tickets.append(ticket)
            return tickets

    async def _wait_for_end(self, oldest: Ticket) -> None:
        """Wait until one window has passed since ``oldest`` ended."""
        end = await oldest.ended_or_stuck()
        wait = end + WINDOW_S + WINDOW_SLACK - self._clock.monotonic()
        if wait > 0:
            await self._clock.sleep(wait)


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
        return (await self._window.enter())[0]

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
        return await self._window.enter(n)


_ENSURE_ROW = "INSERT INTO send_slots (channel_id, next_slot) VALUES (:c, 0) ON CONFLICT DO NOTHING"
_RESERVE = """
UPDATE send_slots
   SET next_slot = GREATEST(next_slot, EXTRACT(EPOCH FROM clock_timestamp())) + :span
 WHERE channel_id = :c
RETURNING next_slot - :span AS start, EXTRACT(EPOCH FROM clock_timestamp()) AS db_now
"""
_ENSURE_PLACES = """
INSERT INTO send_places (channel_id, n, free_at)
SELECT :c, g, 0 FROM generate_series(0, :rate - 1) AS g
ON CONFLICT DO NOTHING
"""
# The places free soonest; a place whose holder's lease ran out (a killed process) counts as
# ended at the lease's end, so it is free one window after that.
_TAKE_PLACES = """
WITH t AS (SELECT EXTRACT(EPOCH FROM clock_timestamp()) AS now),
picked AS (
  SELECT p.n,
         CASE WHEN p.held_until IS NULL THEN p.free_at
              ELSE GREATEST(p.free_at, p.held_until + :window) END AS free_from
    FROM send_places p, t
   WHERE p.channel_id = :c AND p.n < :rate AND (p.held_until IS NULL OR p.held_until < t.now)
   ORDER BY free_from
   LIMIT :k
     FOR UPDATE OF p SKIP LOCKED
)
UPDATE send_places p
   SET holder = :me, held_until = t.now + :lease, free_at = picked.free_from
  FROM picked, t
 WHERE p.channel_id = :c AND p.n = picked.n
RETURNING p.n, GREATEST(picked.free_from - t.now, 0) AS wait
"""
# Run after the last answer is back. Each place is free one window after its own send ended:
# ``ago`` is how long before this statement was sent that was, on our clock, so the database
# clock here (read later still) minus ``ago`` is never earlier than the end.
_GIVE_BACK = """
UPDATE send_places p
   SET holder = NULL, held_until = NULL,
       free_at = EXTRACT(EPOCH FROM clock_timestamp()) - u.ago + :window
  FROM unnest(CAST(:ns AS integer[]), CAST(:agos AS double precision[])) AS u(n, ago)
 WHERE p.channel_id = :c AND p.n = u.n AND p.holder = :me
"""
LEASE_S = 60.0  # a place not given back by then (its process was killed) is taken over; outlasts any send
PLACES_POLL_S = 0.01  # how often a process looks again when every place is held


class SharedPacer:
    """Pacing and the window shared by every process on one PostgreSQL database.

    **Spacing.** The channel's next free slot lives in ``send_slots`` on the database clock. A chunk
    reserves its consecutive slots with one UPDATE (``GREATEST(next_slot, now) + n × interval``)
    and maps them onto this process's monotonic clock, so N processes together keep the spacing.

    **Window.** The channel has ``rate`` rows in ``send_places``. A send takes a place just before
    it starts and the place is given back once its answer is back, free again one window later on
    the database clock (the give-back runs after the answer, so that clock is past the arrival,
    whatever the skew between machines). No second can then hold more than ``rate`` arrivals from
    all processes together, however late one of them sends. A window kept per process could not
    promise that: a late process's arrivals land in the same second as another's punctual ones.
    A chunk takes its places with one statement and gives them back with one more.
    """

    def __init__(
        self, channel_id: str, rate_per_s: float, db: Database, clock: Clock, margin: float = MARGIN
    ):
        self.channel_id = channel_id
        self.rate = max(1, int(rate_per_s))
        self.margin = margin
        self.interval = (1.0 + margin) / rate_per_s
        self._db = db
        self._clock = clock
        self._me = new_id()
        self._lock = asyncio.Lock()  # slot reservations, in order
        self._places_lock = asyncio.Lock()  # one chunk at a time looks for places
        self._ready = False
        self._giving_back: set[asyncio.Task[None]] = set()

    async def _ensure_rows(self, conn: AsyncConnection) -> None:
        if not self._ready:
            await conn.execute(text(_ENSURE_ROW), {"c": self.channel_id})
            await conn.execute(text(_ENSURE_PLACES), {"c": self.channel_id, "rate": self.rate})
            self._ready = True

    async def _reserve(self, count: int) -> list[float]:
        """Reserve ``count`` consecutive slots on the database clock; their times on ours."""
        span = count * self.interval
        async with self._db.engine.begin() as conn:
            await self._ensure_rows(conn)
            row = (await conn.execute(text(_RESERVE), {"c": self.channel_id, "span": span})).one()
        local_now = self._clock.monotonic()
        start = local_now + (float(row.start) - float(row.db_now))
        return [start + i * self.interval for i in range(count)]

    async def _take_places(self, count: int) -> list[int]:
        """Take ``count`` places, waiting while every place is held and until the taken ones are
        free (the wait is counted from the database's answer: later, never earlier, than needed)."""
        taken: list[int] = []
        latest = 0.0
        async with self._places_lock:
            while len(taken) < count:
                async with self._db.engine.begin() as conn:
                    await self._ensure_rows(conn)
                    rows = (
                        await conn.execute(
                            text(_TAKE_PLACES),
                            {
                                "c": self.channel_id,
                                "rate": self.rate,
                                "k": count - len(taken),
                                "me": self._me,
                                "lease": LEASE_S,
                                "window": WINDOW_S + WINDOW_SLACK,
                            },
                        )
                    ).all()
                answered = self._clock.monotonic()
                for row in rows:
                    taken.append(int(row.n))
                    latest = max(latest, answered + float(row.wait))
                if len(taken) < count:
                    await self._clock.sleep(PLACES_POLL_S)
        wait = latest - self._clock.monotonic()
        if wait > 0:
            await self._clock.sleep(wait)
        return taken

    async def _give_back(self, places: list[int], tickets: list[Ticket]) -> None:
        """Once every send of the chunk is over, free each place one window after its send ended."""
        ends = [await t.ended_or_stuck() for t in tickets]
        async with self._db.engine.begin() as conn:
            now = self._clock.monotonic()  # after the pool and BEGIN: the statement goes out next
            agos = [max(0.0, now - end) for end in ends]
            await conn.execute(
                text(_GIVE_BACK),
                {
                    "c": self.channel_id,
                    "ns": places,
                    "agos": agos,
                    "me": self._me,
                    "window": WINDOW_S + WINDOW_SLACK,
                },
            )

    async def settle(self, timeout: float = SETTLE_S) -> None:  # noqa: ASYNC109 (a bound, not a deadline)
        """Let the places of sends already over go back (on shutdown, before the pool closes).

        A give-back still waiting after ``timeout`` (a send whose answer never came) is
        cancelled; its places come back when their lease runs out, as after a crash. Without
        this, stopping abandoned a give-back holding a pooled connection, and its places blocked
        the other processes' sends on the channel until the lease ran out.
        """
        pending = set(self._giving_back)
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=timeout)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    async def acquire(self) -> Ticket:
        """A single send's slot and place in the shared window."""
        return (await self.acquire_many(1))[0]

    async def acquire_many(self, n: int) -> list[Ticket]:
        """Reserve ``n`` consecutive slots with one UPDATE and wait for the last of them (a chunk
        woken too late reserves new slots, once), then take ``n`` places in the shared window.
        The places go back by themselves once every ticket is done."""
        if n > self.rate:  # it would wait for places that can never all be free at once
            raise ValueError(f"a chunk of {n} sends does not fit a window of {self.rate}")
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
        places = await self._take_places(n)
        tickets = [Ticket(self._clock) for _ in range(n)]
        task = asyncio.create_task(self._give_back(places, tickets))
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)
        return tickets


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

    async def settle(self) -> None:
        """Every shared pacer gives back the places of its finished sends (``SharedPacer.settle``)."""
        shared = [p for _, p in self._pacers.values() if isinstance(p, SharedPacer)]
        await asyncio.gather(*(p.settle() for p in shared))

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
