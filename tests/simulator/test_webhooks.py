"""Webhook delivery: envelope, signature over exact bytes, retries, give-up, statuses, BSUID, batching."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from simkit import PNID, SECRET, WEBHOOK, Env, make_env

from pforte.channels.simulator import SimulatorConfig, create_simulator_app
from pforte.clock import SystemClock

pytestmark = pytest.mark.asyncio


async def test_inbound_text_envelope_exact_shape(env: Env) -> None:
    wamid = await env.sim.patient_send_text(user=env.patient, phone_number_id=PNID, text="Rückruf bitte")
    await env.sim.drain()
    [post] = env.receiver.posts
    assert str(post.url) == WEBHOOK
    assert post.headers["content-type"] == "application/json"
    payload = json.loads(post.content)
    assert payload["object"] == "whatsapp_business_account"
    [entry] = payload["entry"]
    assert entry["id"] == "102290129340398"
    [change] = entry["changes"]
    assert change["field"] == "messages"
    value = change["value"]
    assert value["messaging_product"] == "whatsapp"
    assert value["metadata"] == {"display_phone_number": "49301234567", "phone_number_id": PNID}
    assert value["contacts"] == [
        {"profile": {"name": "Änne Müller"}, "wa_id": "4915112345678", "user_id": env.patient.user_id}
    ]
    [message] = value["messages"]
    assert message["from"] == "4915112345678"
    assert message["from_user_id"] == env.patient.user_id
    assert message["id"] == wamid
    assert message["timestamp"] == str(int(env.clock.now().timestamp()))
    assert message["type"] == "text"
    assert message["text"] == {"body": "Rückruf bitte"}


async def test_signature_over_exact_bytes_and_escaped_unicode(env: Env) -> None:
    text = "Grüße, Schmerzen 😷 / Termin"
    await env.sim.patient_send_text(user=env.patient, phone_number_id=PNID, text=text)
    await env.sim.drain()
    [post] = env.receiver.posts
    body = post.content
    assert env.receiver.signature_ok(post)
    body.decode("ascii")  # only ASCII on the wire
    assert b"Gr\\u00fc\\u00dfe" in body
    assert b"\\ud83d\\ude37" in body
    assert b" \\/ Termin" in body
    assert json.loads(body)["entry"][0]["changes"][0]["value"]["messages"][0]["text"]["body"] == text
    reserialised = json.dumps(json.loads(body), ensure_ascii=False).encode()
    resigned = "sha256=" + hmac.new(SECRET.encode(), reserialised, hashlib.sha256).hexdigest()
    assert resigned != post.headers["X-Hub-Signature-256"]


async def test_non_200_redelivered_identically_with_backoff(env: Env) -> None:
    env.receiver.script.extend([500, 204, httpx.ReadTimeout("slow"), 200])
    await env.sim.patient_send_text(user=env.patient, phone_number_id=PNID, text="Hallo")
    await env.sim.drain()
    posts = env.receiver.posts
    assert len(posts) == 4
    assert len({p.content for p in posts}) == 1
    assert len({p.headers["X-Hub-Signature-256"] for p in posts}) == 1
    [delivery] = env.sim.webhook_log[-1:]
    assert delivery.status_codes == [500, 204, None, 200]
    assert delivery.attempts[2].error == "ReadTimeout"
    assert delivery.state == "delivered"
    gaps = [
        (b.at - a.at).total_seconds() for a, b in zip(delivery.attempts, delivery.attempts[1:], strict=False)
    ]
    assert gaps == [0.5, 1.0, 2.0]


async def test_give_up_after_seven_days_of_simulated_time() -> None:
    config = SimulatorConfig(auto_deliver=False, retry_schedule_s=(60, 600, 3600, 6 * 3600))
    env = await make_env(config)
    try:
        env.receiver.script.extend([500] * 10_000)
        start = env.clock.now()
        await env.sim.patient_send_text(user=env.patient, phone_number_id=PNID, text="Hallo")
        await env.sim.drain(timeout=10)
        delivery = env.sim.webhook_log[-1]
        assert delivery.state == "given_up"
        first, last = delivery.attempts[0].at, delivery.attempts[-1].at
        assert (last - first).total_seconds() <= 7 * 24 * 3600
        # 60 + 600 + 3600 = 4260 s, then every 6 h: 1 + 3 + floor((604800 - 4260) / 21600) attempts.
        assert delivery.attempt_count == 4 + (604800 - 4260) // 21600
        assert (env.clock.now() - start).total_seconds() < 7 * 24 * 3600 + 1
        assert len({p.content for p in env.receiver.posts}) == 1
    finally:
        await env.sim.stop()
        await env.client.aclose()


async def test_set_webhook_down_then_up() -> None:
    # Real clock here: on a FakeClock the retries would run through all 7 days at once.
    env = await make_env(SimulatorConfig(retry_schedule_s=(0.01,)), clock=SystemClock())
    try:
        env.sim.set_webhook_down(PNID, 503)
        await env.sim.patient_send_text(user=env.patient, phone_number_id=PNID, text="Hallo")
        with pytest.raises(TimeoutError):
            await env.sim.drain(timeout=0.1)
        env.sim.set_webhook_up(PNID)
        await env.sim.drain()
        delivery = env.sim.webhook_log[-1]
        assert delivery.state == "delivered"
        assert delivery.attempt_count >= 3
        assert set(delivery.status_codes[:-1]) == {503}
        assert delivery.status_codes[-1] == 200
        assert len(env.receiver.posts) == 1
    finally:
        await env.sim.stop()
        await env.client.aclose()


async def test_statuses_sent_delivered_read(env: Env) -> None:
    response = await env.send_text("Ihr Befund ist da")
    wamid = response.json()["messages"][0]["id"]
    await env.sim.drain()
    sent, delivered = env.receiver.statuses(wamid)
    assert (sent["status"], delivered["status"]) == ("sent", "delivered")
    for item in (sent, delivered):
        assert item["recipient_id"] == env.patient.wa_id
        assert item["recipient_user_id"] == env.patient.user_id
        assert item["pricing"] == {
            "billable": False,
            "pricing_model": "PMP",
            "type": "free_customer_service",
            "category": "service",
        }
        assert "conversation" not in item
        assert item["timestamp"].isdigit()
    assert await env.sim.patient_read(user=env.patient, phone_number_id=PNID) == [wamid]
    await env.sim.drain()
    read = env.receiver.statuses(wamid)[-1]
    assert read["status"] == "read"
    assert "pricing" not in read
    assert env.sim.business_messages(PNID)[0].status == "read"
    assert await env.sim.patient_read(user=env.patient, phone_number_id=PNID) == []


async def test_read_without_delivered_when_auto_deliver_off() -> None:
    env = await make_env(SimulatorConfig(auto_deliver=False))
    try:
        first = (await env.send_text("eins")).json()["messages"][0]["id"]
        second = (await env.send_text("zwei")).json()["messages"][0]["id"]
        assert await env.sim.patient_delivered(user=env.patient, phone_number_id=PNID, upto_wamid=first) == [
            first
        ]
        assert await env.sim.patient_read(user=env.patient, phone_number_id=PNID) == [first, second]
        await env.sim.drain()
        assert [s["status"] for s in env.receiver.statuses(first)] == ["sent", "delivered", "read"]
        assert [s["status"] for s in env.receiver.statuses(second)] == ["sent", "read"]
        assert "pricing" in env.receiver.statuses(second)[-1]
    finally:
        await env.sim.stop()
        await env.client.aclose()


async def test_window_closed_free_form_fails_async_131047_template_ok_inbound_reopens(env: Env) -> None:
    env.clock.advance(hours=25)
    response = await env.send_text("Noch Fragen?")
    assert response.status_code == 200
    wamid = response.json()["messages"][0]["id"]
    template = {
        "messaging_product": "whatsapp",
        "to": f"+{env.patient.wa_id}",
        "type": "template",
        "template": {
            "name": "termin_erinnerung",
            "language": {"code": "de"},
            "components": [
                {
                    "type": "body",
                    "parameters": [{"type": "text", "text": "Frau M."}, {"type": "text", "text": "Mo"}],
                }
            ],
        },
    }
    template_response = await env.send(template)
    assert template_response.status_code == 200
    await env.sim.drain()
    [failed] = env.receiver.statuses(wamid)
    assert failed["status"] == "failed"
    assert failed["errors"][0]["code"] == 131047
    assert failed["errors"][0]["error_data"]["details"]
    template_statuses = env.receiver.statuses(template_response.json()["messages"][0]["id"])
    assert [s["status"] for s in template_statuses] == ["sent", "delivered"]
    assert template_statuses[0]["pricing"]["type"] == "regular"
    await env.sim.patient_send_text(user=env.patient, phone_number_id=PNID, text="Ja, eine")
    again = await env.send_text("Gerne")
    await env.sim.drain()
    assert env.receiver.statuses(again.json()["messages"][0]["id"])[0]["status"] == "sent"


async def test_window_sync_mode_131047_error() -> None:
    env = await make_env(SimulatorConfig(window_mode="sync"))
    try:
        env.clock.advance(hours=24, seconds=1)
        response = await env.send_text("zu spät")
        assert response.status_code == 400
        assert response.json()["error"]["code"] == 131047
    finally:
        await env.sim.stop()
        await env.client.aclose()


async def test_bsuid_only_user_has_no_wa_id_or_from(env: Env) -> None:
    user = env.sim.add_user(name="Kai", username="kai.k", user_id="DE.1349120865530274191")
    await env.sim.patient_send_text(user=user, phone_number_id=PNID, text="Hi")
    await env.sim.drain()
    value = env.receiver.values()[-1]
    assert value["contacts"] == [{"profile": {"name": "Kai", "username": "kai.k"}, "user_id": user.user_id}]
    message = value["messages"][0]
    assert "from" not in message
    assert message["from_user_id"] == user.user_id
    body = {
        "messaging_product": "whatsapp",
        "recipient": user.user_id,
        "type": "text",
        "text": {"body": "Hallo"},
    }
    response = await env.send(body)
    assert response.status_code == 200
    assert response.json()["contacts"] == [{"input": user.user_id, "user_id": user.user_id}]
    await env.sim.drain()
    sent, delivered = env.receiver.statuses(response.json()["messages"][0]["id"])
    assert delivered["status"] == "delivered"
    assert "recipient_id" not in sent
    assert sent["recipient_user_id"] == user.user_id
    status_value = env.receiver.values()[-1]
    assert status_value["contacts"][0]["profile"] == {"username": "kai.k"}


async def test_batching_several_updates_in_one_post() -> None:
    env = await make_env(SimulatorConfig(batch_max=3))
    try:
        env.sim.hold_webhooks()
        for text in ("eins", "zwei", "drei", "vier"):
            await env.sim.patient_send_text(user=env.patient, phone_number_id=PNID, text=text)
        await env.sim.drain()
        assert env.receiver.posts == []
        env.sim.flush_webhooks()
        await env.sim.drain()
        sizes = [len(json.loads(p.content)["entry"][0]["changes"]) for p in env.receiver.posts]
        assert sizes == [3, 1]
        assert [m["text"]["body"] for m in env.receiver.messages()] == ["eins", "zwei", "drei", "vier"]
        assert all(env.receiver.signature_ok(p) for p in env.receiver.posts)
    finally:
        await env.sim.stop()
        await env.client.aclose()


async def test_inbound_media_interactive_raw_and_reaction(env: Env) -> None:
    jpeg = b"\xff\xd8\xff\xe0" + b"0" * 100
    await env.sim.patient_send_media(
        user=env.patient,
        phone_number_id=PNID,
        kind="image",
        data=jpeg,
        mime_type="image/jpeg",
        caption="Wunde",
    )
    business = (await env.send(interactive_body(env))).json()["messages"][0]["id"]
    await env.sim.patient_send_interactive_reply(
        user=env.patient, phone_number_id=PNID, context_id=business, reply_id="yes", title="Ja"
    )
    await env.sim.patient_send_raw_message(
        user=env.patient, phone_number_id=PNID, message={"type": "future_thing", "future_thing": {"x": 1}}
    )
    await env.sim.patient_react(user=env.patient, phone_number_id=PNID, message_id=business, emoji=None)
    await env.sim.drain()
    image, reply, raw, reaction = env.receiver.messages()
    assert image["image"]["mime_type"] == "image/jpeg"
    assert image["image"]["caption"] == "Wunde"
    assert image["image"]["id"].isdigit()
    assert reply["interactive"] == {"type": "button_reply", "button_reply": {"id": "yes", "title": "Ja"}}
    assert reply["context"] == {"from": "49301234567", "id": business}
    assert raw["type"] == "future_thing" and raw["future_thing"] == {"x": 1}
    assert reaction["reaction"] == {"message_id": business}


def interactive_body(env: Env) -> dict[str, object]:
    return {
        "messaging_product": "whatsapp",
        "to": f"+{env.patient.wa_id}",
        "type": "interactive",
        "interactive": {
            "type": "button",
            "body": {"text": "Kommen Sie?"},
            "action": {"buttons": [{"type": "reply", "reply": {"id": "yes", "title": "Ja"}}]},
        },
    }


async def test_verify_handshake(env: Env) -> None:
    assert await env.sim.verify_webhook(PNID) is True
    [request] = env.receiver.requests
    params = request.url.params
    assert params["hub.mode"] == "subscribe"
    assert params["hub.verify_token"] == "verify-me"
    assert params["hub.challenge"].isdigit()
    env.sim.number(PNID).verify_token = "wrong"
    assert await env.sim.verify_webhook(PNID) is False


async def test_receiver_in_another_asgi_app() -> None:
    """webhook_transport can point at any ASGI app, as pforte's integration tests do."""
    seen: list[bytes] = []
    receiver_app = FastAPI()

    @receiver_app.post("/webhooks/whatsapp")
    async def hook(request: Request) -> Response:
        seen.append(await request.body())
        return Response(status_code=200)

    sim, user = await _sim_towards(receiver_app)
    try:
        await sim.patient_send_text(user=user, phone_number_id="1", text="x")
        await sim.drain()
    finally:
        await sim.stop()
    assert len(seen) == 1
    assert json.loads(seen[0])["entry"][0]["changes"][0]["value"]["contacts"][0]["wa_id"] == "49151000"


def _slow_receiver() -> tuple[FastAPI, dict[str, int], asyncio.Event]:
    """A webhook receiver that holds every POST until ``release`` is set; counts what is in flight."""
    app = FastAPI()
    seen = {"now": 0, "most": 0, "answered": 0}
    release = asyncio.Event()

    @app.post("/webhooks/whatsapp")
    async def hook(request: Request) -> Response:
        await request.body()
        seen["now"] += 1
        seen["most"] = max(seen["most"], seen["now"])
        await release.wait()
        seen["now"] -= 1
        seen["answered"] += 1
        return Response(status_code=200)

    return app, seen, release


async def _sim_towards(receiver: FastAPI, concurrency: int = 8) -> tuple[Any, Any]:
    """A started simulator with one number whose webhooks go to ``receiver``, and one patient."""
    app = create_simulator_app(
        SimulatorConfig(webhook_concurrency=concurrency), webhook_transport=httpx.ASGITransport(app=receiver)
    )
    sim = app.state.sim
    sim.add_number(
        phone_number_id="1",
        display_phone_number="+49 1",
        access_token="t",
        app_secret="s",
        webhook_url="http://pforte/webhooks/whatsapp",
    )
    await sim.start()
    return sim, sim.add_user(name="P", wa_id="+49 151 000")


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_webhooks_are_delivered_concurrently_up_to_the_configured_number(concurrency: int) -> None:
    """Meta delivers concurrently: a slow answer does not hold up the next update (reference §1)."""
    receiver, seen, release = _slow_receiver()
    sim, user = await _sim_towards(receiver, concurrency)
    try:
        for n in range(10):
            await sim.patient_send_text(user=user, phone_number_id="1", text=f"#{n}")
        for _ in range(200):  # until as many POSTs are held as may be in flight
            if seen["now"] == concurrency:
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)  # and no more follow
        assert seen["now"] == concurrency
        release.set()
        await sim.drain()
        assert seen["answered"] == 10 and seen["most"] == concurrency
        assert all(d.state == "delivered" and d.status_codes == [200] for d in sim.webhook_log[-10:])
    finally:
        release.set()
        await sim.stop()


async def test_stopping_puts_the_attempts_in_flight_back_in_the_queue() -> None:
    receiver, seen, release = _slow_receiver()
    sim, user = await _sim_towards(receiver, 4)
    for n in range(3):
        await sim.patient_send_text(user=user, phone_number_id="1", text=f"#{n}")
    for _ in range(200):
        if seen["now"] == 3:
            break
        await asyncio.sleep(0.005)
    assert seen["now"] == 3
    await sim.stop()
    assert sim.queue.pending == 3  # nothing answered 200, nothing lost
    release.set()
    await sim.start()
    await sim.drain()
    await sim.stop()
    assert [d.state for d in sim.webhook_log] == ["delivered"] * 3
