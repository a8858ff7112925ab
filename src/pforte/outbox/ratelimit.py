"""Per-channel send pacing that never exceeds the configured messages per second.

Sends are spaced ``(1 + margin)/rate`` seconds apart (a leaky bucket with no burst). Spacing of
exactly ``1/rate`` would put at most ``rate`` starts in any one-second window, but the provider
counts arrivals, and scheduling or network jitter can bunch two spaced requests together; the margin
(default 5 %) absorbs that, so the Cloud API's 130429 throughput error does not fire because of us.
Shared by all tasks of one process; several processes share the budget through ``share``.
"""

from __future__ import annotations

import asyncio

from pforte.clock import Clock


class Pacer:
    """Spaces calls for one channel."""

    def __init__(self, rate_per_s: float, clock: Clock, margin: float = 0.05) -> None:
        self.interval = (1.0 + margin) / rate_per_s
        self._clock = clock
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Wait for this call's slot."""
        async with self._lock:
            now = self._clock.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        delay = slot - now
        if delay > 0:
            await self._clock.sleep(delay)


class RateLimits:
    """One pacer per channel, rebuilt when the channel's rate changes."""

    def __init__(self, clock: Clock, share: int = 1, margin: float = 0.05) -> None:
        self._clock = clock
        self._share = max(share, 1)
        self._margin = margin
        self._pacers: dict[str, tuple[int, Pacer]] = {}

    def for_channel(self, channel_id: str, rate_per_s: int) -> Pacer:
        """The pacer of a channel at its current rate."""
        hit = self._pacers.get(channel_id)
        if hit is None or hit[0] != rate_per_s:
            hit = (rate_per_s, Pacer(rate_per_s / self._share, self._clock, self._margin))
            self._pacers[channel_id] = hit
        return hit[1]
