"""Health, readiness and Prometheus metrics."""

from __future__ import annotations

from tests.conftest import APP_SECRET, PNID
from tests.helpers import fixture_bytes, post_webhook


async def test_health_and_readiness(world):
    assert (await world.client.get("/healthz")).text == "ok"
    r = await world.client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"ready": True, "database": "up"}


async def test_metrics_count_webhook_results_and_messages(world):
    body = fixture_bytes("message_text.json", PNID)
    await post_webhook(world.client, world.channel_id, body, APP_SECRET)
    await post_webhook(world.client, world.channel_id, body, APP_SECRET)
    await post_webhook(world.client, world.channel_id, body, "forged")
    text = (await world.client.get("/metrics")).text
    assert 'pforte_webhook_updates_total{result="accepted"} 1.0' in text
    assert 'pforte_webhook_updates_total{result="duplicate"} 1.0' in text
    assert 'pforte_webhook_updates_total{result="rejected"} 1.0' in text
    assert 'pforte_messages_total{direction="in",status="received"} 1.0' in text
    assert "4915112345678" not in text


async def test_security_headers_on_every_response(world):
    r = await world.client.get("/healthz")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
