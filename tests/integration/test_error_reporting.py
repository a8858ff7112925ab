"""Error reporting (DSK I.8) with a real sentry_sdk client and a capturing transport (no network).

Errors are raised inside a request and inside a background job, with a message body, a patient's
name, phone numbers, a bearer token and a session cookie planted everywhere an event could pick
them up: local variables, request headers, cookies, query and body, breadcrumbs, log lines, user,
tags, extras, contexts, the exception message and the server name. The serialized envelope must
contain none of them, and must contain the exception type (so a broken capture fails the test).
"""

from __future__ import annotations

import logging

import httpx
import pytest
import sentry_sdk
from fastapi import Request
from tests.errorkit import CapturingTransport

from pforte.audit.service import Actor
from pforte.events import ERROR_REPORTING_CHANGED, LiveEvent
from pforte.outbox import service as outbox
from pforte.reporting import service as reporting
from pforte.reporting.reporter import ErrorReporter

pytestmark = pytest.mark.dsk("I.8")

DSN = "https://0123456789abcdef@errors.example.org/42"
BODY = "Befund: Tumormarker deutlich erhöht"
NAME = "Erika Mustermann"
PHONE = "+49 151 23456789"
PHONE_NATIONAL = "0151 2345 6789"
TOKEN = "sk9f8e7d6c5b4a39281706zz"
COOKIE = "Zq3xK9mWp2LrT7vYb4NcH8sD"
SERVER = "station-3.klinik.internal"
PLANTED = [BODY, NAME, "Mustermann", PHONE, "15123456789", "4915123456789", PHONE_NATIONAL, "2345 6789"]
PLANTED += [TOKEN, COOKIE, SERVER, "203.0.113.7", "Tumormarker"]


class PlantedFailure(Exception):
    """The error the tests raise; its type name must reach the report."""


def plant_everything(request_like: dict[str, object]) -> None:
    """Put the secrets wherever the SDK (or a future integration) could pick them up."""
    sentry_sdk.add_breadcrumb(category="chat", message=f"{NAME} wrote {BODY}", data={"phone": PHONE})
    logging.getLogger("pforte.test").warning("sending %s to %s", BODY, PHONE)
    scope = sentry_sdk.get_isolation_scope()
    scope.set_user({"id": PHONE, "username": NAME, "ip_address": "203.0.113.7"})
    scope.set_tag("patient", NAME)
    scope.set_extra("message", BODY)
    scope.set_context("chat", {"phone": PHONE_NATIONAL, "token": f"Bearer {TOKEN}"})

    def add_request(event, _hint):
        event["request"] = request_like
        event["server_name"] = SERVER
        event["logentry"] = {"message": f"failed for {NAME}", "params": [PHONE]}
        return event

    scope.add_event_processor(add_request)


@pytest.fixture
async def capture(world):
    """Error reporting switched on with a capturing transport; the scope is cleaned afterwards."""
    transport = CapturingTransport()
    world.services.reporter.transport = transport
    async with world.services.db.transaction() as s:
        await reporting.enable(session=s, dsn=DSN, actor=Actor("cli"), now=world.services.clock.now())
    await world.services.reporter.reload()
    assert world.services.reporter.active
    try:
        yield transport
    finally:
        sentry_sdk.get_isolation_scope().clear()
        await world.services.reporter.apply(reporting.OFF)


def assert_clean(transport: CapturingTransport) -> None:
    wire = transport.serialized()
    assert b"PlantedFailure" in wire, "the error was not reported"
    text = wire.decode()
    leaked = [s for s in PLANTED if s in text]
    assert leaked == [], leaked
    assert "Bearer" not in text and "pforte_session" not in text and "phone" not in text


async def test_error_in_a_request_is_reported_without_any_planted_data(world, capture):
    async def boom(request: Request) -> None:
        message_text, patient_name, phone = BODY, NAME, PHONE  # local variables
        body = (await request.body()).decode()
        plant_everything(
            {
                "url": str(request.url),
                "method": "POST",
                "query_string": request.url.query,
                "headers": dict(request.headers),
                "cookies": dict(request.cookies),
                "data": body,
                "env": {"REMOTE_ADDR": "203.0.113.7", "SERVER_NAME": SERVER},
            }
        )
        raise PlantedFailure(f"could not send {message_text!r} to {patient_name} at {phone}")

    world.app.add_api_route("/_test/boom", boom, methods=["POST"])
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=world.app, raise_app_exceptions=False),
        base_url="https://testserver",
    )
    async with client:
        r = await client.post(
            "/_test/boom",
            params={"phone": PHONE, "name": NAME},
            headers={"authorization": f"Bearer {TOKEN}", "x-hub-signature-256": "sha256=" + "ab" * 32},
            content=f'{{"text": "{BODY}", "to": "{PHONE_NATIONAL}"}}'.encode(),
        )
    assert r.status_code == 500 and BODY not in r.text
    sentry_sdk.flush()
    events = capture.events()
    assert len(events) == 1
    (exc,) = events[0]["exception"]["values"]
    assert exc["type"] == "PlantedFailure" and "value" not in exc
    frames = exc["stacktrace"]["frames"]
    assert any(f.get("function") == "boom" and isinstance(f.get("lineno"), int) for f in frames)
    assert all("vars" not in f for f in frames)
    assert events[0]["release"].startswith("pforte@")
    assert_clean(capture)


async def test_error_in_a_job_is_reported_without_any_planted_data(world, capture):
    async def explode(job) -> None:
        message_text, phone = BODY, job.payload["to"]  # local variables
        plant_everything({"data": message_text, "headers": {"Cookie": f"pforte_session={COOKIE}"}})
        raise PlantedFailure(f"{message_text} -> {phone}")

    world.services.outbox.register("test_explode", explode)
    async with world.services.db.transaction() as s:
        await outbox.enqueue(
            session=s,
            org_id=world.org_id,
            kind="test_explode",
            payload={"to": PHONE},
            now=world.services.clock.now(),
        )
    await world.services.outbox.drain()
    sentry_sdk.flush()
    assert len(capture.events()) == 1
    assert_clean(capture)


async def test_nothing_is_reported_while_off_and_the_client_is_closed(world, capture):
    async with world.services.db.transaction() as s:
        await reporting.disable(session=s, actor=Actor("cli"), now=world.services.clock.now())
    await world.services.reporter.reload()
    assert not world.services.reporter.active and not sentry_sdk.get_client().is_active()
    world.services.reporter.capture(PlantedFailure("x"))
    sentry_sdk.capture_exception(PlantedFailure("y"))
    assert capture.envelopes == []


async def test_a_change_made_by_another_process_is_applied_when_the_bus_says_so(world):
    transport = CapturingTransport()
    reporter = world.services.reporter
    reporter.transport = transport
    assert not reporter.active  # off by default
    try:
        async with world.services.db.transaction() as s:  # as another process would: row only
            await reporting.enable(session=s, dsn=DSN, actor=Actor("cli"), now=world.services.clock.now())
        assert not reporter.active
        world.services.bus.deliver(LiveEvent(org_id="instance", type=ERROR_REPORTING_CHANGED))
        await reporter.settle()
        assert reporter.active and reporter.state.host == "errors.example.org"
        async with world.services.db.transaction() as s:
            await reporting.disable(session=s, actor=Actor("cli"), now=world.services.clock.now())
        world.services.bus.deliver(LiveEvent(org_id="instance", type=ERROR_REPORTING_CHANGED))
        await reporter.settle()
        assert not reporter.active
    finally:
        await reporter.apply(reporting.OFF)


async def test_the_stored_setting_is_applied_at_start_up_and_closed_at_stop(world):
    async with world.services.db.transaction() as s:
        await reporting.enable(session=s, dsn=DSN, actor=Actor("cli"), now=world.services.clock.now())
    process = ErrorReporter(db=world.services.db, transport=CapturingTransport())  # a fresh process
    await process.start()
    try:
        assert process.active and sentry_sdk.get_client().is_active()
    finally:
        await process.stop()
    assert not process.active and not sentry_sdk.get_client().is_active()


@pytest.mark.parametrize(
    "dsn",
    [
        "",
        "http://0123456789abcdef@errors.example.org/42",
        "https://errors.example.org/42",
        "https://0123456789abcdef:secret@errors.example.org/42",
        "https://0123456789abcdef@errors.example.org/project",
        "https://0123456789abcdef@errors.example.org/42?x=1",
        "https://0123456789abcdef@/42",
        "https://0123456789abcdef@errors.example.org/42 x",
    ],
)
async def test_a_bad_dsn_is_refused_and_nothing_changes(world, dsn):
    from pforte.errors import ValidationError

    async with world.services.db.transaction() as s:
        with pytest.raises(ValidationError) as err:
            await reporting.enable(session=s, dsn=dsn, actor=Actor("cli"), now=world.services.clock.now())
        assert err.value.code == "bad_dsn"
        assert (await reporting.get(session=s)).enabled is False
