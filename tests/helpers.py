"""Small helpers shared by tests: signing webhooks, loading recorded payloads, reading rows."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

FIXTURES = Path(__file__).parent / "fixtures" / "whatsapp"
FIXTURE_PNID = "109876543210987"


def sign(body: bytes, secret: str) -> str:
    """The X-Hub-Signature-256 header Meta would send."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def text_webhook(
    pnid: str, wa_id: str, wamid: str, text: str, *, name: str | None = None, timestamp: int | None = None
) -> bytes:
    """A webhook with one text message from a patient known only by phone number (no BSUID), sent
    at ``timestamp`` (seconds since the epoch; now by default)."""
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "4930123456789", "phone_number_id": pnid},
        "contacts": [{"profile": {"name": name or f"Patient {wa_id[-4:]}"}, "wa_id": wa_id}],
        "messages": [
            {
                "from": wa_id,
                "id": wamid,
                "timestamp": str(int(time.time()) if timestamp is None else timestamp),
                "type": "text",
                "text": {"body": text},
            }
        ],
    }
    doc = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "1", "changes": [{"field": "messages", "value": value}]}],
    }
    return json.dumps(doc).encode()


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


@dataclass(frozen=True)
class Clinic:
    """What ``seed_clinic`` created in pforte and in the simulator."""

    org_id: str
    channel_id: str
    admin_email: str
    staff_email: str
    staff_id: str
    template_id: str
    patient: Any


async def seed_clinic(
    services: Any,
    sim: Any,
    *,
    graph_base_url: str,
    pforte_base_url: str,
    pnid: str,
    access_token: str,
    app_secret: str,
    password: str,
    consent_required: bool = False,
) -> Clinic:
    """An organisation with an admin and a staff user, a WhatsApp channel and a template in pforte,
    the same number and template in the simulator, and one patient there (consent step off unless asked)."""
    from pforte.channels import service as channels
    from pforte.conversations.models import MessageTemplate
    from pforte.orgs import service as orgs
    from pforte.staff import service as staff

    now = services.clock.now()
    body = "Guten Tag {{1}}, bitte melden Sie sich bei uns."
    async with services.db.transaction() as session:
        org = await orgs.create(
            session=session, keys=services.keys, name="Klinikum Test", slug="klinikum", now=now
        )
        # The consent step is on by default (tests/integration/test_privacy_chat.py proves it); tests
        # of other features switch it off unless they ask for it, so their patients can be written to.
        org.settings = {**org.settings, "consent_required": consent_required}
        await staff.create(
            session=session,
            org_id=org.id,
            email="admin@klinikum.test",
            display_name="Admin",
            password=password,
            role="admin",
            now=now,
        )
        user = await staff.create(
            session=session,
            org_id=org.id,
            email="dr.weiss@klinikum.test",
            display_name="Dr. Weiss",
            password=password,
            role="staff",
            now=now,
        )
        ch = await channels.add_whatsapp(
            session=session,
            keys=services.keys,
            org=org,
            name="Station 3",
            phone_number_id=pnid,
            display_phone_number="+49 30 1234567",
            access_token=access_token,
            app_secret=app_secret,
            verify_token="verify-me",
            graph_base_url=graph_base_url,
            now=now,
        )
        tpl = MessageTemplate(
            org_id=org.id, name="termin_erinnerung", language="de", body=body, param_count=1, created_at=now
        )
        session.add(tpl)
        await session.flush()
        ids = (org.id, ch.id, user.id, tpl.id)
    sim.add_number(
        phone_number_id=pnid,
        display_phone_number="+49 30 1234567",
        access_token=access_token,
        app_secret=app_secret,
        webhook_url=f"{pforte_base_url}/webhooks/whatsapp/{ids[1]}",
        verify_token="verify-me",
    )
    sim.add_template(pnid, "termin_erinnerung", "de", body=body, param_count=1)
    patient = sim.add_user(name="Erika Mustermann", wa_id="4915112345678")
    return Clinic(
        org_id=ids[0],
        channel_id=ids[1],
        admin_email="admin@klinikum.test",
        staff_email="dr.weiss@klinikum.test",
        staff_id=ids[2],
        template_id=ids[3],
        patient=patient,
    )


def most_in_one_second(arrivals: list[float]) -> int:
    """The most arrivals any sliding one-second window holds (what the Cloud API counts)."""
    arrivals = sorted(arrivals)
    return max(sum(1 for u in arrivals[i:] if u < t + 1.0) for i, t in enumerate(arrivals))


async def staff_reply(world: Any, **row: Any) -> str:
    """The patient writes, staff answer "Antwort"; the answer's row then gets ``row`` (a recorded
    wamid, a status) and its send job is marked done, so no worker touches it. Returns its id."""
    from sqlalchemy import update
    from tests.conftest import PNID

    from pforte.conversations import service as conv
    from pforte.conversations.models import Message
    from pforte.outbox.models import Job

    await world.sim.patient_send_text(user=world.patient, phone_number_id=PNID, text="Hallo")
    await world.settle()
    now = world.services.clock.now()
    async with world.services.db.transaction() as s:
        (conversation,) = await conv.list_(session=s, keys=world.services.keys, org_id=world.org_id, now=now)
        msg = await conv.send_text(
            session=s,
            keys=world.services.keys,
            org_id=world.org_id,
            conversation_id=conversation.id,
            user_id=world.staff_id,
            text="Antwort",
            now=now,
        )
        await s.execute(update(Message).where(Message.id == msg.id).values(**row))
        await s.execute(update(Job).values(state="done"))
    return str(msg.id)
