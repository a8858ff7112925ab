"""DESIGN invariant 6: every route with an object id, walked by an admin of ANOTHER organisation, is 404.

The route list is read from the app itself, so a route added later without scoping fails here.
"""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select
from starlette.routing import Route
from tests.conftest import PNID
from tests.web.test_inbox import HTML, csrf_of

from pforte.audit.service import Actor
from pforte.conversations.models import Attachment, Message
from pforte.retention import service as retention

ID_PARAMS = {"conversation_id", "attachment_id", "message_id", "channel_id", "hold_id"}
NOT_SCOPED_BY_ORG = {"/webhooks/whatsapp/{channel_id}"}  # authenticated by the channel's own secrets


def all_routes(routes, prefix: str = ""):
    """Every endpoint route, descending into included routers (FastAPI nests them)."""
    for r in routes:
        inner = getattr(r, "original_router", None)
        if inner is not None:
            yield from all_routes(inner.routes, prefix + r.include_context.prefix)
        elif isinstance(r, Route):
            yield prefix + r.path, r


async def _objects_of_org_one(world) -> dict[str, str]:
    await world.sim.patient_send_media(
        user=world.patient,
        phone_number_id=PNID,
        kind="image",
        data=b"\x89PNG\r\n\x1a\n" + b"p" * 40,
        mime_type="image/png",
    )
    await world.settle()
    async with world.services.db.transaction() as s:
        msg = (await s.execute(select(Message))).scalars().one()
        att = (await s.execute(select(Attachment))).scalars().one()
        hold = await retention.place_hold(
            s,
            org_id=world.org_id,
            target_kind="conversation",
            target_id=msg.conversation_id,
            kind="legal",
            actor=Actor("cli"),
            now=world.services.clock.now(),
        )
    return {
        "hold_id": hold.id,
        "conversation_id": msg.conversation_id,
        "message_id": msg.id,
        "attachment_id": att.id,
        "channel_id": world.channel_id,
    }


@pytest.mark.dsk("IV.2")
async def test_another_organisations_admin_gets_404_on_every_object_route(world):
    ids = await _objects_of_org_one(world)
    await world.add_other_org("admin@andere.test", role="admin")
    assert (await world.login("admin@andere.test")).status_code in (200, 303)
    token = csrf_of((await world.client.get("/", headers=HTML)).text)
    walked = []
    for template, route in all_routes(world.app.routes):
        if template in NOT_SCOPED_BY_ORG:
            continue
        params = set(re.findall(r"{(\w+)}", template))
        if not params & ID_PARAMS:
            continue
        assert params <= ID_PARAMS, f"unknown path parameter in {template}"
        path = template
        for name in params:
            path = path.replace("{" + name + "}", ids[name])
        for method in sorted(route.methods - {"HEAD"}):
            r = await world.client.request(
                method,
                path,
                headers={**HTML, "x-csrf-token": token},
                data={
                    "csrf_token": token,
                    "text": "x",
                    "access_token": "y",
                    "confirm": "yes",
                    "target": "contact",
                    "tags": "x",
                },
            )
            walked.append((method, template, r.status_code))
    assert len(walked) >= 8, walked
    assert [w for w in walked if w[2] != 404] == []
    # ... and nothing changed for the organisation that owns them.
    assert world.sim.business_messages(PNID) == []


@pytest.mark.parametrize("path", ["/", "/partials/conversations"])
@pytest.mark.dsk("IV.2")
async def test_lists_show_nothing_of_another_organisation(world, path):
    await _objects_of_org_one(world)
    await world.add_other_org("staff@andere.test", role="staff")
    await world.login("staff@andere.test")
    r = await world.client.get(path, headers=HTML)
    assert r.status_code == 200
    assert "Erika Mustermann" not in r.text and "data-conversation-id" not in r.text
