"""DESIGN invariant 1 / DSK I.3b, I.9b: nothing readable at rest.

pforte is filled through the real paths (signed webhooks from the simulator, staff replies through
the outbox, an inbound photo), then the raw SQLite file with its WAL, every PostgreSQL row (as text,
bytea included) and every blob file are searched for the known plaintexts.
"""

from __future__ import annotations

import json

import asyncpg
import pytest
from sqlalchemy import text
from tests.conftest import PNID

from pforte.conversations import service as conv
from pforte.crypto.envelope import FieldCipher
from pforte.models import Base

SECRETS = {
    "body": "Mein Blutzucker war heute früh 342, ist das schlimm",
    "caption": "Ausschlag am linken Unterarm seit Dienstag",
    "name": "Theodora Quellenbrunn",
    "phone": "4917655501234",
    "bsuid": "DE.8765432109876543",
    "reply": "Bitte kommen Sie morgen um 8 Uhr nüchtern in die Ambulanz",
    "image": "PIXELDATA-SECRET-WOUND-PHOTO",
    "username": "theo_quelle",
}


def _needles() -> dict[str, list[bytes]]:
    out = {}
    for key, value in SECRETS.items():
        forms = {value.encode(), value.encode("utf-16-le"), json.dumps(value).encode()}
        forms.add(value[: max(12, len(value) // 2)].encode())  # a fragment is a leak too
        out[key] = sorted(forms)
    return out


async def _fill(world) -> None:
    patient = world.sim.add_user(
        name=SECRETS["name"], wa_id=SECRETS["phone"], user_id=SECRETS["bsuid"], username=SECRETS["username"]
    )
    await world.sim.patient_send_text(user=patient, phone_number_id=PNID, text=SECRETS["body"])
    await world.sim.patient_send_media(
        user=patient,
        phone_number_id=PNID,
        kind="image",
        data=b"\x89PNG\r\n\x1a\n" + SECRETS["image"].encode() * 20,
        mime_type="image/png",
        caption=SECRETS["caption"],
    )
    await world.settle()
    async with world.services.db.transaction() as s:
        (row,) = await conv.list_(
            session=s, keys=world.services.keys, org_id=world.org_id, now=world.services.clock.now()
        )
        await conv.send_text(
            session=s,
            keys=world.services.keys,
            org_id=world.org_id,
            conversation_id=row.id,
            user_id=world.staff_id,
            text=SECRETS["reply"],
            now=world.services.clock.now(),
        )
    await world.settle()
    # The data really is there and readable through pforte: the search below is meaningful.
    async with world.services.db.transaction() as s:
        view = await conv.get(
            session=s,
            keys=world.services.keys,
            org_id=world.org_id,
            conversation_id=row.id,
            now=world.services.clock.now(),
        )
    texts = [m.text for m in view.messages]
    assert SECRETS["body"] in texts and SECRETS["caption"] in texts and SECRETS["reply"] in texts
    assert view.contact_name == SECRETS["name"] and view.contact_phone == SECRETS["phone"]
    assert [a.state for m in view.messages for a in m.attachments] == ["stored"]


def _search(blob: bytes, where: str) -> list[str]:
    return [f"{key} in {where}" for key, forms in _needles().items() if any(f in blob for f in forms)]


@pytest.mark.dsk("I.3b")
async def test_no_plaintext_in_database_or_blob_store(world, db_kind):
    await _fill(world)
    leaks: list[str] = []
    if db_kind == "sqlite":
        path = world.services.settings.effective_database_url.split(":///", 1)[1]
        raw = b""
        for suffix in ("", "-wal"):
            try:
                with open(path + suffix, "rb") as fh:
                    raw += fh.read()
            except FileNotFoundError:
                pass
        assert len(raw) > 10_000
        leaks += _search(raw, "sqlite file")
    else:
        url = world.services.settings.effective_database_url.replace("postgresql+asyncpg", "postgresql")
        conn = await asyncpg.connect(url)
        try:
            dump = b""
            for table in Base.metadata.sorted_tables:
                rows = await conn.fetch(f'SELECT row_to_json(t)::text AS j FROM "{table.name}" t')
                dump += "\n".join(r["j"] for r in rows).encode()
                for col in table.columns:
                    if col.type.__class__.__name__ == "LargeBinary":
                        for r in await conn.fetch(f'SELECT "{col.name}" AS b FROM "{table.name}"'):
                            dump += bytes(r["b"] or b"")
            assert len(dump) > 2_000
            leaks += _search(dump, "postgresql rows")
        finally:
            await conn.close()
        async with world.services.db.engine.begin() as c:  # the search found the rows it looked at
            assert (await c.execute(text("SELECT count(*) FROM messages"))).scalar_one() == 3
    blob_files = [p for p in world.services.blobs.root.rglob("*") if p.is_file()]
    assert blob_files, "the photo must have been stored"
    for p in blob_files:
        leaks += _search(p.read_bytes(), f"blob {p.name}")
    assert leaks == []


def test_the_search_itself_finds_plaintext():
    """The detector is not blind: planting one secret is found."""
    planted = b"xx" + SECRETS["reply"].encode() + b"yy"
    assert _search(planted, "sample") == ["reply in sample"]
    sealed = FieldCipher(bytes(32)).seal(planted, b"aad")
    assert _search(sealed, "sample") == []  # ... and the same bytes encrypted are not
