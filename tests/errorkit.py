"""A Sentry transport that keeps envelopes in memory: error-reporting tests never touch the network."""

from __future__ import annotations

from typing import Any

from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport


class CapturingTransport(Transport):
    """Stores every envelope the client would send."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.envelopes: list[Envelope] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        """Keep the envelope instead of sending it."""
        self.envelopes.append(envelope)

    def serialized(self) -> bytes:
        """Every envelope exactly as it would go over the wire."""
        return b"\n".join(e.serialize() for e in self.envelopes)

    def events(self) -> list[dict[str, Any]]:
        """The error events captured so far."""
        return [e.get_event() for e in self.envelopes if e.get_event() is not None]  # type: ignore[misc]
