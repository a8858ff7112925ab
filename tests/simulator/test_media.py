"""Media: upload checks, info, bearer download, 5-minute URLs, delete, lifetimes."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest
from simkit import PNID, TOKEN, Env

pytestmark = pytest.mark.asyncio

AUTH = {"Authorization": f"Bearer {TOKEN}"}
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


async def upload(
    env: Env,
    data: bytes,
    mime: str,
    *,
    type_field: str | None = None,
    product: str = "whatsapp",
    headers: dict[str, str] | None = None,
) -> Any:
    fields = {"messaging_product": product}
    if type_field is not None:
        fields["type"] = type_field
    return await env.client.post(
        f"/v23.0/{PNID}/media",
        data=fields,
        files={"file": ("f", data, mime)},
        headers=AUTH if headers is None else headers,
    )


async def test_upload_get_download_expire_delete(env: Env) -> None:
    response = await upload(env, PNG, "image/png", type_field="image/png")
    assert response.status_code == 200, response.text
    media_id = response.json()["id"]
    assert media_id.isdigit()

    info = (await env.client.get(f"/v23.0/{media_id}", headers=AUTH)).json()
    assert info["messaging_product"] == "whatsapp"
    assert info["id"] == media_id
    assert info["mime_type"] == "image/png"
    assert info["file_size"] == len(PNG)
    assert info["sha256"] == base64.b64encode(hashlib.sha256(PNG).digest()).decode()
    assert info["url"].startswith("http://graph.test/whatsapp_business/attachments/?mid=")

    download = await env.client.get(info["url"], headers=AUTH)
    assert download.status_code == 200
    assert download.content == PNG
    assert download.headers["content-type"] == "image/png"
    assert (await env.client.get(info["url"])).status_code == 401
    assert (await env.client.get(info["url"], headers={"Authorization": "Bearer nope"})).status_code == 401

    env.clock.advance(301)
    assert (await env.client.get(info["url"], headers=AUTH)).status_code == 404
    fresh = (
        await env.client.get(f"/v23.0/{media_id}", params={"phone_number_id": PNID}, headers=AUTH)
    ).json()
    assert fresh["url"] != info["url"]
    assert (await env.client.get(fresh["url"], headers=AUTH)).content == PNG

    wrong = await env.client.get(f"/v23.0/{media_id}", params={"phone_number_id": "123"}, headers=AUTH)
    assert wrong.status_code == 400
    deleted = await env.client.delete(f"/v23.0/{media_id}", headers=AUTH)
    assert deleted.json() == {"success": True}
    gone = await env.client.get(f"/v23.0/{media_id}", headers=AUTH)
    assert gone.status_code == 400
    assert gone.json()["error"]["code"] == 100
    assert (await env.client.get(fresh["url"], headers=AUTH)).status_code == 404


async def test_upload_rejections(env: Env) -> None:
    async def code(response: Any) -> int:
        assert response.status_code == 400, response.text
        return response.json()["error"]["code"]

    assert await code(await upload(env, b"<html>", "text/html")) == 100
    assert await code(await upload(env, PNG, "image/png", product="")) == 100
    big = b"\xff\xd8\xff" + b"0" * (5 * 1024 * 1024)
    assert await code(await upload(env, big, "image/jpeg")) == 131053
    assert await code(await upload(env, PNG, "image/jpeg")) == 131053  # PNG bytes declared as JPEG
    assert await code(await upload(env, PNG, "image/png", type_field="image/jpeg")) == 131053
    no_auth = await upload(env, PNG, "image/png", headers={})
    assert no_auth.status_code == 401
    assert env.sim.media == {}


async def test_send_uploaded_image_by_id(env: Env) -> None:
    media_id = (await upload(env, PNG, "image/png")).json()["id"]
    body = {
        "messaging_product": "whatsapp",
        "to": f"+{env.patient.wa_id}",
        "type": "image",
        "image": {"id": media_id, "caption": "Ihr Rezept"},
    }
    response = await env.client.post(f"/v23.0/{PNID}/messages", json=body, headers=AUTH)
    assert response.status_code == 200
    [msg] = env.sim.business_messages(PNID)
    assert (msg.media_id, msg.mime_type, msg.text) == (media_id, "image/png", "Ihr Rezept")
    sticker = {
        "messaging_product": "whatsapp",
        "to": f"+{env.patient.wa_id}",
        "type": "sticker",
        "sticker": {"id": media_id},
    }
    bad = await env.client.post(f"/v23.0/{PNID}/messages", json=sticker, headers=AUTH)
    assert bad.json()["error"]["code"] == 131053


async def test_patient_media_downloadable_for_seven_days(env: Env) -> None:
    jpeg = b"\xff\xd8\xff\xe0" + b"1" * 500
    await env.sim.patient_send_media(
        user=env.patient, phone_number_id=PNID, kind="image", data=jpeg, mime_type="image/jpeg"
    )
    await env.sim.drain()
    image = env.receiver.messages()[-1]["image"]
    assert image["sha256"] == base64.b64encode(hashlib.sha256(jpeg).digest()).decode()
    info = (await env.client.get(f"/v23.0/{image['id']}", headers=AUTH)).json()
    assert (await env.client.get(info["url"], headers=AUTH)).content == jpeg
    env.clock.advance(days=7, seconds=1)
    expired = await env.client.get(f"/v23.0/{image['id']}", headers=AUTH)
    assert expired.json()["error"]["code"] == 100


async def test_inbound_media_over_100mb_is_131052(env: Env) -> None:
    huge = b"\0" * (100 * 1024 * 1024 + 1)
    await env.sim.patient_send_media(
        user=env.patient, phone_number_id=PNID, kind="video", data=huge, mime_type="video/mp4"
    )
    await env.sim.drain()
    message = env.receiver.messages()[-1]
    assert message["type"] == "unsupported"
    assert message["errors"][0]["code"] == 131052
