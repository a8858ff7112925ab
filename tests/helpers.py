"""Small helpers shared by tests: signing webhooks, loading recorded payloads, reading rows."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

FIXTURES = Path(__file__).parent / "fixtures" / "whatsapp"
FIXTURE_PNID = "109876543210987"


def sign(body: bytes, secret: str) -> str:
    """The X-Hub-Signature-256 header Meta would send."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def fixture_bytes(name: str, pnid: str) -> bytes:
    """A recorded payload with its phone number id pointed at our test channel."""
    return (FIXTURES / name).read_bytes().replace(FIXTURE_PNID.encode(), pnid.encode())


def fixture_names() -> list[str]:
    """Every recorded payload."""
    return sorted(p.name for p in FIXTURES.glob("*.json"))


def count_items(body: bytes) -> tuple[int, int]:
    """How many messages and statuses a payload carries (all entries and changes)."""
    doc = json.loads(body)
    msgs = stats = 0
    for entry in doc.get("entry", []):
        for change in entry.get("changes", []):
            value = change.get("value", {})
            if change.get("field") == "messages":
                msgs += len(value.get("messages", []))
                stats += len(value.get("statuses", []))
    return msgs, stats


async def post_webhook(
    client: httpx.AsyncClient,
    channel_id: str,
    body: bytes,
    secret: str | None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST a webhook as Meta would (signature over the exact bytes)."""
    h = {"content-type": "application/json", **(headers or {})}
    if secret is not None:
        h["x-hub-signature-256"] = sign(body, secret)
    return await client.post(f"/webhooks/whatsapp/{channel_id}", content=body, headers=h)


async def all_rows(services: Any, model: Any) -> list[Any]:
    """Every row of a table."""
    async with services.db.transaction() as session:
        return list((await session.execute(select(model))).scalars())


def metric(services: Any, name: str, **labels: str) -> float:
    """The current value of a Prometheus sample."""
    value = services.metrics.registry.get_sample_value(name, labels)
    return value or 0.0
