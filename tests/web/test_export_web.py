"""The "Export (signed)" link: admins and auditors download a signed ZIP, audited; staff 403, others 404."""

from __future__ import annotations

import json
import zipfile
from io import BytesIO

import pytest
from tests.conftest import PASSWORD
from tests.integration.test_signed_export import check, export_entries, story
from tests.web.test_inbox import HTML

from pforte.staff import service as staff

pytestmark = pytest.mark.dsk("II.2")


def link(conversation_id: str) -> str:
    """The download's path."""
    return f"/conversations/{conversation_id}/export.zip"


async def add_auditor(world) -> str:
    """An auditor of the test organisation; returns the id."""
    async with world.services.db.transaction() as s:
        user = await staff.create(
            session=s,
            org_id=world.org_id,
            email="audit@klinikum.test",
            display_name="Audit",
            password=PASSWORD,
            role="auditor",
            now=world.services.clock.now(),
        )
        return str(user.id)


async def test_admin_downloads_a_signed_export_that_verifies_and_is_audited(world):
    st = await story(world)
    await world.login(world.admin_email)
    page = await world.client.get(f"/conversations/{st.conversation_id}", headers=HTML)
    assert f'href="{link(st.conversation_id)}"' in page.text and "Export (signiert)" in page.text
    resp = await world.client.get(link(st.conversation_id), headers=HTML)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/zip"
    assert resp.headers["cache-control"] == "no-store"
    disposition = resp.headers["content-disposition"]
    assert disposition.startswith(f'attachment; filename="conversation-{st.conversation_id}-')
    assert "Erika" not in disposition
    result = await check(world, resp.content)
    assert result.ok, result.problems
    assert result.messages == 5 and result.attachments == 1
    html = zipfile.ZipFile(BytesIO(resp.content)).read("transcript.html").decode()
    assert '<html lang="de">' in html and "Nachricht 1 von 5" in html
    [entry] = await export_entries(world)
    assert (entry.actor_kind, entry.actor_id) == ("staff", st.admin_id)
    assert (entry.object_kind, entry.object_id) == ("conversation", st.conversation_id)


async def test_auditor_may_export_a_period(world):
    st = await story(world)
    auditor = await add_auditor(world)
    await world.login("audit@klinikum.test")
    page = await world.client.get(f"/conversations/{st.conversation_id}", headers=HTML)
    assert f'href="{link(st.conversation_id)}"' in page.text
    resp = await world.client.get(
        link(st.conversation_id), params={"from": "2000-01-01", "to": "2000-01-31"}, headers=HTML
    )
    assert resp.status_code == 200, resp.text
    manifest = json.loads(zipfile.ZipFile(BytesIO(resp.content)).read("manifest.json"))
    assert manifest["message_count"] == 0
    assert manifest["range"] == {"from": "1999-12-31T23:00:00+00:00", "until": "2000-01-31T23:00:00+00:00"}
    assert (await check(world, resp.content)).ok
    [entry] = await export_entries(world)
    assert (entry.actor_kind, entry.actor_id) == ("staff", auditor)

    bad = await world.client.get(link(st.conversation_id), params={"from": "gestern"}, headers=HTML)
    assert bad.status_code == 400
    assert len(await export_entries(world)) == 1


async def test_staff_see_no_link_and_get_403(world):
    st = await story(world)
    await world.login()  # the staff user
    page = await world.client.get(f"/conversations/{st.conversation_id}", headers=HTML)
    assert "export.zip" not in page.text and "Export (signiert)" not in page.text
    resp = await world.client.get(link(st.conversation_id), headers=HTML)
    assert resp.status_code == 403
    assert await export_entries(world) == []


async def test_another_organisations_admin_gets_404(world):
    st = await story(world)
    await world.add_other_org("admin@andere.test", role="admin")
    await world.login("admin@andere.test")
    resp = await world.client.get(link(st.conversation_id), headers=HTML)
    assert resp.status_code == 404
    assert "PK\x03\x04" not in resp.text
    assert await export_entries(world) == []


async def test_without_a_signing_key_the_download_is_refused(world):
    st = await story(world, with_key=False)
    await world.login(world.admin_email)
    resp = await world.client.get(link(st.conversation_id), headers=HTML)
    assert resp.status_code == 409
    assert 'data-error-code="no_signing_key"' in resp.text
    assert await export_entries(world) == []
