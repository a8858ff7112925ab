"""Security headers on every response: strict same-origin CSP and friends (DESIGN 7)."""

from __future__ import annotations

from fastapi.telemetry import TelemetryConfig
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
    (b"cross-origin-opener-policy", b"same-origin"),
]

# FastAPI's built-in OpenTelemetry, off for good. It turns itself on when the process has an
# OpenTelemetry provider, or when FASTAPI_OTEL_AUTO_CONFIGURE=true adds exporters from the
# environment; it would then send every request's path (conversation ids), and every unhandled
# exception's message and stack trace, to a collector that nobody chose in pforte's settings.
# Error reporting is pforte's own, opt-in and scrubbed (DSK I.8, reporting/). Off, it also skips
# three provider and environment look-ups per request (docs/performance.md).
NO_TELEMETRY: TelemetryConfig = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
    "auto_configure": False,
}


class SecurityHeaders:
    """Pure ASGI middleware (no buffering, so Server-Sent Events stream untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Add the headers to every HTTP response start."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def _send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers.extend(h for h in HEADERS if h[0] not in present)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, _send)
