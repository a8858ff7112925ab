"""FastAPI's built-in OpenTelemetry stays off, even where the process has a provider (DSK I.8, I.12).

Current FastAPI traces requests, counts them and logs unhandled exceptions with their message and
stack trace as soon as an OpenTelemetry provider is configured in the process (or
FASTAPI_OTEL_AUTO_CONFIGURE=true adds exporters). That would be a second error-analytics channel
that bypasses pforte's own, opt-in and scrubbed reporting. The tests install recording providers
in place of the global ones and check that no request of pforte or of the simulator asks them for
anything; a plain FastAPI app under the same providers does, so the check can fail.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import _logs, metrics, trace
from tests.conftest import APP_SECRET, PNID
from tests.helpers import fixture_bytes, post_webhook


class Recorder:
    """Stands in for the global tracer, meter and logger providers; notes who asks for them."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def tracer_provider(self) -> trace.TracerProvider:
        rec = self

        # Not a subclass of trace.NoOpTracerProvider: FastAPI does not trace for that one, and the
        # control test below then fails (tried while tidying the three near-copies into one).
        class Provider(trace.TracerProvider):
            def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
                rec.asked.append("tracer")
                return trace.NoOpTracer()

        return Provider()

    def meter_provider(self) -> metrics.MeterProvider:
        rec = self

        class Provider(metrics.NoOpMeterProvider):
            def get_meter(self, *args: Any, **kwargs: Any) -> metrics.Meter:
                rec.asked.append("meter")
                return super().get_meter(*args, **kwargs)

        return Provider()

    def logger_provider(self) -> _logs.LoggerProvider:
        rec = self

        class Provider(_logs.NoOpLoggerProvider):
            def get_logger(self, *args: Any, **kwargs: Any) -> _logs.Logger:
                rec.asked.append("logger")
                return super().get_logger(*args, **kwargs)

        return Provider()


@pytest.fixture
def providers(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    tracer, meter, logger = rec.tracer_provider(), rec.meter_provider(), rec.logger_provider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: tracer)
    monkeypatch.setattr(metrics, "get_meter_provider", lambda: meter)
    monkeypatch.setattr(_logs, "get_logger_provider", lambda: logger)
    return rec


async def test_a_plain_fastapi_app_reports_to_the_recording_providers(providers):
    """The control: without pforte's setting, FastAPI uses whatever provider the process has."""
    plain = FastAPI()

    @plain.get("/ping")
    async def ping() -> str:
        return "pong"

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=plain), base_url="http://t") as c:
        assert (await c.get("/ping")).status_code == 200
    assert "tracer" in providers.asked


@pytest.mark.dsk("I.8")
async def test_no_request_reaches_opentelemetry(world, providers):
    assert (await world.client.get("/healthz")).text == "ok"
    assert (await world.client.get("/login")).status_code == 200
    assert (await world.client.get("/no-such-page")).status_code == 404
    body = fixture_bytes("message_text.json", PNID)
    assert (await post_webhook(world.client, world.channel_id, body, APP_SECRET)).status_code == 200
    await world.settle()
    assert (await world.login()).status_code in (200, 303)
    assert (await world.client.get("/")).status_code == 200
    assert providers.asked == []


async def test_the_simulator_does_not_reach_opentelemetry(world, providers):
    sim = httpx.AsyncClient(transport=httpx.ASGITransport(app=world.sim_app), base_url="http://sim")
    async with sim:
        r = await sim.get("/v21.0/no-such-object")
    assert r.status_code == 401  # no access token
    assert r.json()["error"]["type"] == "OAuthException"
    assert providers.asked == []
