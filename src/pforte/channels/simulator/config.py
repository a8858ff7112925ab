"""Settings of the WhatsApp Cloud API simulator (one dataclass, sane defaults for tests and the demo)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

WindowMode = Literal["async", "sync"]

DEFAULT_GRAPH_VERSIONS: tuple[str, ...] = tuple(f"v{n}.0" for n in range(20, 27))

# Meta documents only "exponential backoff for up to 7 days"; the exact schedule is unknown.
# This one doubles from half a second and then stays at one hour.
DEFAULT_RETRY_SCHEDULE_S: tuple[float, ...] = (
    0.5,
    1,
    2,
    4,
    8,
    16,
    32,
    64,
    128,
    256,
    512,
    1024,
    2048,
    3600,
)

SEVEN_DAYS_S = 7 * 24 * 3600.0


@dataclass
class SimulatorConfig:
    """How the simulated Cloud API behaves; every field has a default."""

    graph_versions: tuple[str, ...] = DEFAULT_GRAPH_VERSIONS
    # Base for media download URLs; None derives it from the incoming request.
    public_base_url: str | None = None
    # A sent business message becomes "delivered" deliver_delay_s after "sent".
    auto_deliver: bool = True
    deliver_delay_s: float = 0.05
    # 131047 outside the 24-hour window: "async" = accepted, then a failed status webhook; "sync" = error.
    window_mode: WindowMode = "async"
    window_s: float = 24 * 3600.0
    # Webhook redelivery: delay before retry n is retry_schedule_s[min(n-1, len-1)].
    retry_schedule_s: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE_S
    give_up_after_s: float = SEVEN_DAYS_S
    webhook_timeout_s: float = 5.0
    # Webhook POSTs in flight at once; Meta delivers concurrently, so order is not guaranteed.
    webhook_concurrency: int = 8
    # Up to this many queued updates for one number go in one POST (Meta allows 1000).
    batch_max: int = 1
    pair_limit_enabled: bool = True
    pair_burst: int = 45
    pair_refill_s: float = 6.0
    media_url_ttl_s: float = 300.0
    upload_media_ttl_s: float = 30 * 24 * 3600.0
    webhook_media_ttl_s: float = SEVEN_DAYS_S
    reaction_max_age_s: float = 30 * 24 * 3600.0

    def __post_init__(self) -> None:
        """Reject settings that would make the simulator misbehave silently."""
        if not 1 <= self.batch_max <= 1000:
            raise ValueError("batch_max must be between 1 and 1000")
        if not 1 <= self.webhook_concurrency <= 256:
            raise ValueError("webhook_concurrency must be between 1 and 256")
        if not self.retry_schedule_s:
            raise ValueError("retry_schedule_s must not be empty")
        if self.window_mode not in ("async", "sync"):
            raise ValueError("window_mode must be 'async' or 'sync'")
        self.graph_versions = tuple(self.graph_versions)
        self.retry_schedule_s = tuple(self.retry_schedule_s)
