"""Shared test kit: a simulator on a FakeClock whose webhooks land in a capturing MockTransport."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx

from pforte.channels.simulator import Simulator, SimulatorConfig, SimUser, create_simulator_app
from pforte.clock import FakeClock

PNID = "106540352242922"
DISPLAY = "+49 30 1234567"
TOKEN = "EAAG-test-token"
SECRET = "app-secret-1"
VERIFY = "verify-me"
WEBHOOK = "https://pforte.test/webhooks/whatsapp"
BASE = "http://graph.test"


@dataclass
class Receiver:
    """A fake pforte webhook endpoint: records every request, answers from a script (default 200)."""

    secret: str = SECRET
    verify_token: str = VERIFY
    requests: list[httpx.Request] = field(default_factory=list)
    script: deque[int | Exception] = field(default_factory=deque)

    def handle(self, request: httpx.Request) -> httpx.Response:
        """MockTransport handler."""
        self.requests.append(request)
        if request.method == "GET":
            params = request.url.params
            if params.get("hub.mode") == "subscribe" and params.get("hub.verify_token") == self.verify_token:
                return httpx.Response(200, text=params.get("hub.challenge", ""))
            return httpx.Response(403)
        if self.script:
            outcome = self.script.popleft()
            if isinstance(outcome, Exception):
                raise outcome
            return httpx.Response(outcome)
        return httpx.Response(200)

    @property
    def posts(self) -> list[httpx.Request]:
        """Only the webhook POSTs."""
        return [r for r in self.requests if r.method == "POST"]

    def signature_ok(self, request: httpx.Request) -> bool:
        """Check X-Hub-Signature-256 over the raw bytes, the way a receiver must."""
        expected = "sha256=" + hmac.new(self.secret.encode(), request.content, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, request.headers.get("X-Hub-Signature-256", ""))

    def values(self) -> list[dict[str, Any]]:
        """Every change value of every POST, in arrival order."""
        out = []
        for request in self.posts:
            for entry in json.loads(request.content)["entry"]:
                out.extend(change["value"] for change in entry["changes"])
        return out

    def statuses(self, wamid: str | None = None) -> list[dict[str, Any]]:
        """All statuses[] items received (optionally for one wamid)."""
        items = [s for v in self.values() for s in v.get("statuses", [])]
        return [s for s in items if wamid is None or s["id"] == wamid]

    def messages(self) -> list[dict[str, Any]]:
        """All messages[] items received."""
        return [m for v in self.values() for m in v.get("messages", [])]


@dataclass
class Env:
    """Everything a test needs."""

    sim: Simulator
    client: httpx.AsyncClient
    receiver: Receiver
    clock: FakeClock
    patient: SimUser

    async def send(
        self, body: dict[str, Any], *, token: str | None = TOKEN, pnid: str = PNID, version: str = "v23.0"
    ) -> httpx.Response:
        """POST a Graph send request."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return await self.client.post(f"/{version}/{pnid}/messages", json=body, headers=headers)

    async def send_text(self, text: str = "Guten Tag", to: str | None = None) -> httpx.Response:
        """A plain text send to the default patient."""
        body = {
            "messaging_product": "whatsapp",
            "to": to or f"+{self.patient.wa_id}",
            "type": "text",
            "text": {"body": text},
        }
        return await self.send(body)


async def make_env(config: SimulatorConfig | None = None, *, clock: Any = None, **number_kw: Any) -> Env:
    """Build a simulator app with one number, one template and one patient who wrote in (window open)."""
    clock = clock or FakeClock()
    receiver = Receiver()
    app = create_simulator_app(
        config or SimulatorConfig(), clock=clock, webhook_transport=httpx.MockTransport(receiver.handle)
    )
    sim: Simulator = app.state.sim
    kw = {
        "phone_number_id": PNID,
        "display_phone_number": DISPLAY,
        "access_token": TOKEN,
        "app_secret": SECRET,
        "webhook_url": WEBHOOK,
        "verify_token": VERIFY,
        "waba_id": "102290129340398",
    } | number_kw
    sim.add_number(**kw)
    sim.add_template(PNID, "termin_erinnerung", "de", body="Hallo {{1}}, Ihr Termin ist am {{2}}.")
    patient = sim.add_user(name="Änne Müller", wa_id="4915112345678")
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)
    await sim.start()
    await sim.patient_send_text(user=patient, phone_number_id=PNID, text="Hallo Praxis")
    await sim.drain()
    receiver.requests.clear()
    return Env(sim=sim, client=client, receiver=receiver, clock=clock, patient=patient)
