"""What is due for deletion: pure functions over a policy, a conversation and the time.

The organisation sets a default (on, 180 days after the conversation's last activity). A rule for
the conversation's channel replaces the default; rules for its tags replace both. Where several
tags have rules, the longest wins, and "never" beats any number of days: a tag exists to keep
something longer (a finding, a legal duty to document), and deleting early cannot be undone.
Holds are not part of the policy; the sweeper checks them separately and they always win.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

DEFAULT_DAYS = 180
NEVER = None


@dataclass(frozen=True)
class Policy:
    """An organisation's retention settings, as the sweeper sees them."""

    enabled: bool = True
    default_days: int | None = DEFAULT_DAYS
    channel_days: dict[str, int | None] = field(default_factory=dict)
    tag_days: dict[str, int | None] = field(default_factory=dict)

    def shortest_days(self) -> int | None:
        """The shortest retention any conversation can have (bounds the sweeper's query)."""
        values = [self.default_days, *self.channel_days.values(), *self.tag_days.values()]
        days = [d for d in values if d is not None]
        return min(days) if days else None


@dataclass(frozen=True)
class Decision:
    """Whether a conversation is due, under which rule, and from when."""

    due: bool
    days: int | None
    source: str  # "default" | "channel" | "tag:<name>" | "disabled"
    due_at: datetime | None


def effective_days(policy: Policy, channel_id: str, tags: Iterable[str]) -> tuple[int | None, str]:
    """The retention that applies, and which rule it comes from."""
    tagged = [(t, policy.tag_days[t]) for t in sorted(set(tags)) if t in policy.tag_days]
    if tagged:
        never = [t for t, d in tagged if d is None]
        if never:
            return None, f"tag:{never[0]}"
        tag, days = max(tagged, key=lambda td: td[1] or 0)
        return days, f"tag:{tag}"
    if channel_id in policy.channel_days:
        return policy.channel_days[channel_id], "channel"
    return policy.default_days, "default"


def decide(
    policy: Policy, *, channel_id: str, tags: Iterable[str], last_activity_at: datetime, now: datetime
) -> Decision:
    """Is this conversation due for deletion at ``now``?"""
    if not policy.enabled:
        return Decision(False, None, "disabled", None)
    days, source = effective_days(policy, channel_id, tags)
    if days is None:
        return Decision(False, None, source, None)
    due_at = last_activity_at + timedelta(days=days)
    return Decision(due_at <= now, days, source, due_at)
