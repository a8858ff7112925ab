"""Time as a dependency: production code asks a Clock, tests move a FakeClock forward."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Wall time for timestamps and monotonic time for intervals."""

    def now(self) -> datetime:
        """Current time, timezone-aware UTC."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin, never going backwards."""

    async def sleep(self, seconds: float) -> None:
        """Wait; a fake clock may return at once."""


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        """Current UTC time."""
        return datetime.now(UTC)

    def monotonic(self) -> float:
        """time.monotonic()."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """asyncio.sleep."""
        await asyncio.sleep(seconds)


class FakeClock:
    """A clock that only moves when told to; ``sleep`` advances it and yields once."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
        self._mono = 1000.0

    def now(self) -> datetime:
        """The fake current time."""
        return self._now

    def monotonic(self) -> float:
        """The fake monotonic time."""
        return self._mono

    def advance(self, seconds: float = 0.0, **kw: float) -> None:
        """Move time forward by seconds (and/or timedelta keywords such as hours=25)."""
        delta = timedelta(seconds=seconds, **kw)
        self._now += delta
        self._mono += delta.total_seconds()

    async def sleep(self, seconds: float) -> None:
        """Advance by ``seconds`` and let other tasks run."""
        self.advance(max(seconds, 0.0))
        await asyncio.sleep(0)
