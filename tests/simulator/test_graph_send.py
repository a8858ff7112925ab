"""Graph API sending: validation, auth, error envelope, limits, templates, interactive, mark-as-read."""

from __future__ import annotations

from typing import Any

import pytest
from simkit import PNID, TOKEN, Env, make_env

from pforte.channels.simulator import SimulatorConfig

pytestmark = pytest.mark.asyncio


def assert_error(response: Any, code: int, http: int = 400) -> dict[str, Any]:
    assert response.status_code == http, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"].startswith(f"(#{code}) ")
    assert error["type"] == "OAuthException"
    assert error["error_data"]["messaging_product"] == "whatsapp"
    assert error["error_data"]["details"]
    assert error["fbtrace_id"]
    return error


async def test_send_text_ok_matches_success_shape(env: Env) -> None:
    response = await env.send_text("x" * 4096)
    assert response.status_code == 200
    data = response.json()
    assert data["messaging_product"] == "whatsapp"
    assert data["contacts"] == [
        {"input": f"+{env.patient.wa_id}", "wa_id": env.patient.wa_id, "user_id": env.patient.user_id}
    ]
    wamid = data["messages"][0]["id"]
    assert wamid.startswith("wamid.")
    [sent] = env.sim.business_messages(PNID, env.patient)
    assert (sent.wamid, sent.type, sent.text) == (wamid, "text", "x" * 4096)


async def test_text_over_4096_is_error_100(env: Env) -> None:
    assert_error(await env.send_text("x" * 4097), 100)
    assert env.sim.business_messages(PNID) == []


async def test_missing_or_wrong_bearer_is_190_401(env: Env) -> None:
    body = {"messaging_product": "whatsapp", "to": "+4915112345678", "type": "text", "text": {"body": "a"}}
    assert_error(await env.send(body, token=None), 190, 401)
    assert_error(await env.send(body, token="not-a-token"), 190, 401)


async def test_valid_token_wrong_phone_number_id_is_100(env: Env) -> None:
    env.sim.add_number(
        phone_number_id="999",
        display_phone_number="+1 555 0100",
        access_token="other",
        app_secret="s",
        webhook_url=None,
    )
    error = assert_error(await env.send({"messaging_product": "whatsapp"}, pnid="999"), 100)
    assert "999" in error["error_data"]["details"]


async def test_unknown_version_rejected_known_accepted(env: Env) -> None:
    body = {"messaging_product": "whatsapp", "to": "+4915112345678", "type": "text", "text": {"body": "a"}}
    assert_error(await env.send(body, version="v99.0"), 2500)
    assert_error(await env.send(body, version="latest"), 2500)
    assert (await env.send(body, version="v26.0")).status_code == 200


async def test_missing_messaging_product_and_recipient(env: Env) -> None:
    assert_error(await env.send({"to": "+4915112345678", "type": "text", "text": {"body": "a"}}), 100)
    assert_error(
        await env.send({"messaging_product": "whatsapp", "type": "text", "text": {"body": "a"}}), 131008
    )


async def test_template_unknown_and_param_mismatch(env: Env) -> None:
    def template(name: str, lang: str, params: list[str]) -> dict[str, Any]:
        return {
            "messaging_product": "whatsapp",
            "to": "+4915112345678",
            "type": "template",
            "template": {
                "name": name,
                "language": {"code": lang},
                "components": [{"type": "body", "parameters": [{"type": "text", "text": p} for p in params]}],
            },
        }

    assert_error(await env.send(template("gibt_es_nicht", "de", ["a", "b"])), 132001)
    assert_error(await env.send(template("termin_erinnerung", "en_US", ["a", "b"])), 132001)
    assert_error(await env.send(template("termin_erinnerung", "de", ["a"])), 132000)
    ok = await env.send(template("termin_erinnerung", "de", ["Frau Müller", "3. Mai"]))
    assert ok.status_code == 200
    [msg] = env.sim.business_messages(PNID)
    assert msg.text == "Hallo Frau Müller, Ihr Termin ist am 3. Mai."


def interactive_buttons(titles: list[str]) -> dict[str, Any]:
    return {
        "messaging_product": "whatsapp",
        "to": "+4915112345678",
        "type": "interactive",
        "interactive": {
            "type": "button",
            "body": {"text": "Termin bestätigen?"},
            "action": {
                "buttons": [
                    {"type": "reply", "reply": {"id": f"b{i}", "title": t}} for i, t in enumerate(titles)
                ]
            },
        },
    }


def interactive_list(rows: list[str]) -> dict[str, Any]:
    return {
        "messaging_product": "whatsapp",
        "to": "+4915112345678",
        "type": "interactive",
        "interactive": {
            "type": "list",
            "body": {"text": "Bitte wählen"},
            "action": {
                "button": "Auswahl",
                "sections": [
                    {"title": "A", "rows": [{"id": f"r{i}", "title": t} for i, t in enumerate(rows)]}
                ],
            },
        },
    }


async def test_interactive_validation(env: Env) -> None:
    assert (await env.send(interactive_buttons(["Ja", "Nein", "Später"]))).status_code == 200
    assert_error(await env.send(interactive_buttons(["a", "b", "c", "d"])), 131009)
    assert_error(await env.send(interactive_buttons(["x" * 21])), 131009)
    assert (await env.send(interactive_list([f"Zeile {i}" for i in range(10)]))).status_code == 200
    assert_error(await env.send(interactive_list([f"Zeile {i}" for i in range(11)])), 131009)
    assert_error(await env.send(interactive_list(["y" * 25])), 131009)
    assert len(env.sim.business_messages(PNID)) == 2


async def test_mark_as_read_and_typing(env: Env) -> None:
    inbound = await env.sim.patient_send_text(user=env.patient, phone_number_id=PNID, text="Frage")
    body = {"messaging_product": "whatsapp", "status": "read", "message_id": inbound}
    response = await env.send(body)
    assert response.status_code == 200
    assert response.json() == {"success": True}
    assert all(m.read_by_business for m in env.sim.conversation(PNID, env.patient) if m.direction == "in")
    typing = await env.send(body | {"typing_indicator": {"type": "text"}})
    assert typing.json() == {"success": True}
    assert_error(await env.send(body | {"message_id": "wamid.unknown"}), 131009)


async def test_throughput_limit_130429_sliding_second() -> None:
    env = await make_env(rate_limit_per_s=5)
    try:
        for _ in range(5):
            assert (await env.send_text()).status_code == 200
        assert_error(await env.send_text(), 130429)
        # Mark-as-read counts toward the same budget.
        inbound = env.sim.conversation(PNID, env.patient)[0].wamid
        assert_error(
            await env.send({"messaging_product": "whatsapp", "status": "read", "message_id": inbound}), 130429
        )
        env.clock.advance(0.5)
        assert_error(await env.send_text(), 130429)
        env.clock.advance(0.6)
        assert (await env.send_text()).status_code == 200
    finally:
        await env.sim.stop()
        await env.client.aclose()


async def test_pair_limit_131056_burst_45_then_one_per_6s() -> None:
    env = await make_env(rate_limit_per_s=1000)
    try:
        for _ in range(45):
            assert (await env.send_text()).status_code == 200
        assert_error(await env.send_text(), 131056)
        env.clock.advance(5.9)
        assert_error(await env.send_text(), 131056)
        env.clock.advance(0.2)
        assert (await env.send_text()).status_code == 200
        assert_error(await env.send_text(), 131056)
        assert len(env.sim.business_messages(PNID)) == 46
    finally:
        await env.sim.stop()
        await env.client.aclose()


async def test_pair_limit_can_be_disabled() -> None:
    env = await make_env(SimulatorConfig(pair_limit_enabled=False), rate_limit_per_s=1000)
    try:
        for _ in range(50):
            assert (await env.send_text()).status_code == 200
    finally:
        await env.sim.stop()
        await env.client.aclose()


async def test_fail_next_send_sync_and_async(env: Env) -> None:
    env.sim.fail_next_send(PNID, 131016)
    assert_error(await env.send_text(), 131016, 503)
    env.sim.fail_next_send(PNID, 131026, asynchronous=True)
    response = await env.send_text()
    assert response.status_code == 200
    wamid = response.json()["messages"][0]["id"]
    await env.sim.drain()
    [failed] = env.receiver.statuses(wamid)
    assert failed["status"] == "failed"
    assert failed["errors"][0]["code"] == 131026
    assert (await env.send_text()).status_code == 200


async def test_unknown_recipient_accepted_then_failed_131026(env: Env) -> None:
    response = await env.send_text(to="+4917000000000")
    assert response.status_code == 200
    assert response.json()["contacts"] == [{"input": "+4917000000000", "wa_id": "4917000000000"}]
    await env.sim.drain()
    [status] = env.receiver.statuses(response.json()["messages"][0]["id"])
    assert (status["status"], status["errors"][0]["code"]) == ("failed", 131026)


async def test_to_without_plus_is_flagged(env: Env) -> None:
    response = await env.send_text(to=env.patient.wa_id)
    assert response.status_code == 200
    [msg] = env.sim.business_messages(PNID)
    assert msg.warnings == ["to_without_plus"]


async def test_reaction_only_sent_status(env: Env) -> None:
    inbound = env.sim.conversation(PNID, env.patient)[0].wamid
    body = {
        "messaging_product": "whatsapp",
        "to": f"+{env.patient.wa_id}",
        "type": "reaction",
        "reaction": {"message_id": inbound, "emoji": "👍"},
    }
    response = await env.send(body)
    assert response.status_code == 200
    await env.sim.drain()
    assert [s["status"] for s in env.receiver.statuses(response.json()["messages"][0]["id"])] == ["sent"]
    assert_error(await env.send(body | {"reaction": {"message_id": "wamid.nope", "emoji": "👍"}}), 131009)


async def test_media_send_by_link_and_bad_id(env: Env) -> None:
    base = {"messaging_product": "whatsapp", "to": f"+{env.patient.wa_id}", "type": "image"}
    ok = await env.send(base | {"image": {"link": "https://example.org/a.png", "caption": "Befund"}})
    assert ok.status_code == 200
    assert_error(await env.send(base | {"image": {"id": "123456"}}), 131009)
    assert_error(await env.send(base | {"image": {}}), 100)
    assert_error(
        await env.send(base | {"image": {"link": "https://e.org/x.png", "caption": "c" * 1025}}), 100
    )


async def test_phone_number_object_get(env: Env) -> None:
    response = await env.client.get(f"/v23.0/{PNID}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    assert response.json()["display_phone_number"] == "+49 30 1234567"
