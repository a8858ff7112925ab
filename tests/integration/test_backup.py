"""DSK I.9a / I.9b: backups exist, restore completely, and are useless to anyone but the controller.

pforte is filled through the real paths (signed webhooks from the simulator, an inbound photo per
patient), the real ``pforte backup`` commands run against it, and a restore goes into a fresh
instance (a new SQLite file or a new PostgreSQL database with its own data directory). Restored
conversations are compared through the service layer (decrypted bodies, names, attachment bytes).
Every refused restore is checked to have changed nothing: all rows, the blob files, the key ring.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import tarfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pyrage
import pytest
from pyrage import x25519
from sqlalchemy import inspect, select, text
from tests.conftest import PG_ADMIN, PNID, _pg_exec
from typer.testing import CliRunner

from pforte import migrate
from pforte.audit import service as audit
from pforte.backup import service as backup
from pforte.bootstrap import build_services
from pforte.cli import app
from pforte.config import Settings
from pforte.contacts.models import Contact
from pforte.conversations import service as conv
from pforte.conversations.models import Attachment, Message
from pforte.crypto.models import DataKey
from pforte.db import Database
from pforte.deletion import service as deletion
from pforte.models import Base
from pforte.orgs import service as orgs

A = {
    "name": "Theodora Quellenbrunn",
    "phone": "4917655501234",
    "body": "Mein Blutzucker war heute früh 342, ist das schlimm",
    "caption": "Ausschlag am linken Unterarm seit Dienstag",
    "image": "PIXELDATA-A-SECRET-WOUND-PHOTO",
}
B = {
    "name": "Bertram Felsenkamp",
    "phone": "4917655509876",
    "body": "Ich brauche ein neues Rezept für Ramipril fünf Milligramm",
    "caption": "Foto von meinem Medikationsplan",
    "image": "PIXELDATA-B-SECRET-MEDICATION-PLAN",
}


# -- running the real command line -----------------------------------------------------------------


def env_of(settings: Settings) -> dict[str, str]:
    """The environment a ``pforte`` command needs to act on this instance."""
    env = {
        "PFORTE_DATA_DIR": str(settings.data_dir),
        "PFORTE_DATABASE_URL": settings.effective_database_url,
        "PFORTE_LOG_LEVEL": "WARNING",
    }
    if settings.erasure_ledger_file is not None:
        env["PFORTE_ERASURE_LEDGER_FILE"] = str(settings.erasure_ledger_file)
    return env


async def pforte(settings: Settings, *args: str, ok: bool = True) -> Any:
    """Run ``pforte ARGS`` in a worker thread (the command runs its own event loop)."""
    result = await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env_of(settings))
    if ok:
        assert result.exit_code == 0, result.output
    return result


def refused(result: Any, fragment: str) -> None:
    """Exit status 2 and exactly one line on stderr, naming the problem."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pforte: "), result.stderr
    assert fragment in lines[0], lines[0]


# -- fixtures --------------------------------------------------------------------------------------


class Controller:
    """The data controller's age key pair; the identity file lives outside every data directory."""

    def __init__(self, directory: Path) -> None:
        self.identity = x25519.Identity.generate()
        self.public = str(self.identity.to_public())
        self.secret = str(self.identity)
        directory.mkdir(parents=True, exist_ok=True)
        self.key_file = directory / "controller-key.txt"
        self.key_file.write_text(f"# created: today\n# public key: {self.public}\n{self.secret}\n")
        self.key_file.chmod(0o600)


@pytest.fixture
def controller(tmp_path: Path) -> Controller:
    return Controller(tmp_path / "controller")


@pytest.fixture
async def fresh(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Settings]]]:
    """Makes settings for a fresh, never-migrated instance (SQLite file or PostgreSQL database)."""
    made: list[str] = []

    async def make(kind: str, *, ledger: Path | None = None, name: str = "fresh") -> Settings:
        if kind == "sqlite":
            url = f"sqlite+aiosqlite:///{tmp_path / (name + '.sqlite3')}"
        else:
            db = f"pforte_test_restore_{uuid.uuid4().hex[:10]}"
            await asyncio.to_thread(_pg_exec, f'CREATE DATABASE "{db}"')
            made.append(db)
            url = "postgresql+asyncpg://" + PG_ADMIN.split("://", 1)[1].rsplit("/", 1)[0] + "/" + db
        return Settings(data_dir=tmp_path / name, database_url=url, erasure_ledger_file=ledger)

    yield make
    for db in made:
        await asyncio.to_thread(_pg_exec, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def other(kind: str) -> str:
    return "postgresql" if kind == "sqlite" else "sqlite"


# -- filling and reading an instance ---------------------------------------------------------------


async def fill(world: Any) -> dict[str, Any]:
    """Patients A and B each send a text and a photo with a caption, through signed webhooks."""
    users = {}
    for key, p in (("A", A), ("B", B)):
        users[key] = world.sim.add_user(name=p["name"], wa_id=p["phone"])
        await world.sim.patient_send_text(user=users[key], phone_number_id=PNID, text=p["body"])
        await world.sim.patient_send_media(
            user=users[key],
            phone_number_id=PNID,
            kind="image",
            data=b"\x89PNG\r\n\x1a\n" + p["image"].encode() * 20,
            mime_type="image/png",
            caption=p["caption"],
        )
    await world.settle()
    return users


async def conversations(services: Any, org_id: str) -> dict[str, dict[str, Any]]:
    """Every conversation as staff would see it, by contact name, with attachment bytes."""
    out: dict[str, dict[str, Any]] = {}
    now = services.clock.now()
    async with services.db.transaction() as s:
        for row in await conv.list_(session=s, keys=services.keys, org_id=org_id, now=now):
            v = await conv.get(session=s, keys=services.keys, org_id=org_id, conversation_id=row.id, now=now)
            messages = []
            for m in v.messages:
                atts = []
                for a in m.attachments:
                    data = None
                    if a.state == "stored":
                        data, _, _ = await conv.read_attachment(
                            session=s,
                            keys=services.keys,
                            blobs=services.blobs,
                            org_id=org_id,
                            attachment_id=a.id,
                        )
                    atts.append((a.id, a.kind, a.mime_type, a.filename, a.state, a.size, data))
                messages.append((m.id, m.direction, m.type, m.text, m.status, m.created_at, atts))
            out[v.contact_name] = {
                "conversation_id": v.id,
                "contact_id": v.contact_id,
                "phone": v.contact_phone,
                "messages": messages,
            }
    return out


async def with_services(settings: Settings, fn: Callable[[Any], Any]) -> Any:
    """Run ``fn(services)`` against an instance (no background workers)."""
    services = build_services(settings.model_copy(update={"run_workers": False}))
    try:
        return await fn(services)
    finally:
        await services.stop()


async def table_rows(settings: Settings) -> dict[str, list[str]]:
    """Every row of every table (revision included), as sorted text: equal means nothing changed."""
    db = Database(settings.effective_database_url)
    out: dict[str, list[str]] = {}
    try:
        async with db.engine.connect() as c:
            names = await c.run_sync(lambda sc: inspect(sc).get_table_names())
            for name in sorted(names):
                rows = (await c.execute(text(f'SELECT * FROM "{name}"'))).all()
                out[name] = sorted(repr(tuple(r)) for r in rows)
    finally:
        await db.dispose()
    return out


def files(root: Path) -> dict[str, str]:
    """Every file below a directory with its SHA-256."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


async def state(settings: Settings) -> tuple[Any, ...]:
    """The whole observable state of an instance: rows, data directory (keys, blobs), ledger."""
    return (await table_rows(settings), files(settings.data_dir))


async def counts(settings: Settings) -> dict[str, int]:
    return {name: len(rows) for name, rows in (await table_rows(settings)).items()}


async def revision(settings: Settings) -> str | None:
    db = Database(settings.effective_database_url)
    try:
        async with db.engine.connect() as c:
            return await backup.current_revision(c)
    finally:
        await db.dispose()


# -- searching raw storage -------------------------------------------------------------------------


def needles(p: dict[str, str]) -> dict[str, list[bytes]]:
    out = {}
    for key, value in p.items():
        forms = {value.encode(), value.encode("utf-16-le"), json.dumps(value).encode()}
        forms.add(value[: max(12, len(value) // 2)].encode())
        out[key] = sorted(forms)
    return out


async def raw_storage(settings: Settings) -> list[tuple[str, bytes]]:
    """The database as stored (SQLite file and WAL; PostgreSQL every row and bytea) and every file."""
    out: list[tuple[str, bytes]] = []
    url = settings.effective_database_url
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1]
        for suffix in ("", "-wal"):
            if os.path.exists(path + suffix):
                with open(path + suffix, "rb") as fh:
                    out.append((f"sqlite{suffix}", fh.read()))
    else:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
        try:
            dump = b""
            for table in Base.metadata.sorted_tables:
                rows = await conn.fetch(f'SELECT row_to_json(t)::text AS j FROM "{table.name}" t')
                dump += "\n".join(r["j"] for r in rows).encode()
                for col in table.columns:
                    if col.type.__class__.__name__ == "LargeBinary":
                        for r in await conn.fetch(f'SELECT "{col.name}" AS b FROM "{table.name}"'):
                            dump += bytes(r["b"] or b"")
            out.append(("postgresql rows", dump))
        finally:
            await conn.close()
    for p in settings.data_dir.rglob("*"):
        if p.is_file():
            out.append((str(p.relative_to(settings.data_dir)), p.read_bytes()))
    return out


def leaks(storage: list[tuple[str, bytes]], searched: dict[str, list[bytes]]) -> list[str]:
    return [
        f"{key} in {where}"
        for where, blob in storage
        for key, forms in searched.items()
        if any(f in blob for f in forms)
    ]


# -- the tests -------------------------------------------------------------------------------------


async def make_backup(world: Any, controller: Controller, out: Path) -> Any:
    s = world.services.settings
    await pforte(s, "backup", "set-recipient", controller.public)
    return await pforte(s, "backup", "create", "--out", str(out))


@pytest.mark.dsk("I.9a")
async def test_round_trip_into_an_empty_instance(world, db_kind, controller, fresh, tmp_path):
    await fill(world)
    before = await conversations(world.services, world.org_id)
    assert {A["name"], B["name"]} <= before.keys()
    source_counts = await counts(world.services.settings)
    out = tmp_path / "backup.age"
    created = await make_backup(world, controller, out)
    assert "backup written" in created.stdout and "2 blob files" in created.stdout
    assert out.stat().st_mode & 0o777 == 0o600
    assert not out.with_name(out.name + ".tmp").exists()

    target = await fresh(db_kind)
    restored = await pforte(target, "backup", "restore", str(out), "--identity", str(controller.key_file))
    assert "restored:" in restored.stdout and "2 blob files" in restored.stdout

    after = await with_services(target, lambda sv: conversations(sv, world.org_id))
    assert after == before
    texts = [m[3] for c in after.values() for m in c["messages"]]
    assert A["body"] in texts and B["caption"] in texts
    images = [a[6] for c in after.values() for m in c["messages"] for a in m[6]]
    assert len(images) == 2 and all(img.startswith(b"\x89PNG") for img in images)
    # Every table came back row for row; the audit log has the backup entry in the source and the
    # restore entry in the target on top of the same history, and its chain still verifies.
    target_counts = await counts(target)
    source_counts["audit_events"] += 1  # backup.restore
    source_counts["audit_heads"] = target_counts["audit_heads"]  # the instance chain may be new
    assert target_counts == source_counts
    assert await revision(target) == backup.known_revisions()[-1]

    async def chain(sv: Any) -> tuple[Any, list[str]]:
        async with sv.db.transaction() as s:
            result = await audit.verify(s, audit.INSTANCE)
            rows = await s.execute(
                select(text("action")).select_from(text("audit_events")).where(text("chain = 'instance'"))
            )
            return result, list(rows.scalars())

    result, actions = await with_services(target, chain)
    # The backup's own audit entry is written after its snapshot, so only the restore shows here.
    assert result.ok and actions[-1] == "backup.restore" and "backup.create" not in actions


@pytest.mark.dsk("I.9a")
async def test_a_backup_restores_into_the_other_database(world, db_kind, controller, fresh, tmp_path):
    """A SQLite backup restores into PostgreSQL, a PostgreSQL backup into SQLite."""
    await fill(world)
    before = await conversations(world.services, world.org_id)
    out = tmp_path / "backup.age"
    await make_backup(world, controller, out)
    target = await fresh(other(db_kind))
    await pforte(target, "backup", "restore", str(out), "--identity", str(controller.key_file))
    assert await with_services(target, lambda sv: conversations(sv, world.org_id)) == before


@pytest.mark.dsk("I.9a")
async def test_restore_over_data_needs_force_and_then_replaces_it(world, controller, tmp_path):
    users = await fill(world)
    before = await conversations(world.services, world.org_id)
    out = tmp_path / "backup.age"
    await make_backup(world, controller, out)
    # After the backup: one more photo (a new row and a new blob file).
    await world.sim.patient_send_media(
        user=users["B"], phone_number_id=PNID, kind="image", data=b"\x89PNG later", mime_type="image/png"
    )
    await world.settle()
    s = world.services.settings
    blobs_with_later = files(world.services.blobs.root)
    assert len(blobs_with_later) == 3
    unchanged = await state(s)

    r = await pforte(s, "backup", "restore", str(out), "--identity", str(controller.key_file), ok=False)
    refused(r, "not empty")
    assert await state(s) == unchanged

    r = await pforte(s, "backup", "restore", str(out), "--identity", str(controller.key_file), "--force")
    assert "restored:" in r.stdout
    assert await conversations(world.services, world.org_id) == before
    assert len(files(world.services.blobs.root)) == 2  # the later photo's file went with its row


def _repack(path: Path, controller: Controller, change: Callable[[dict[str, bytes]], None]) -> bytes:
    """Decrypt a backup with the stdlib's tar, let ``change`` edit members, encrypt it again."""
    plain = pyrage.decrypt(path.read_bytes(), [controller.identity])
    members: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        for info in tar.getmembers():
            fh = tar.extractfile(info)
            assert fh is not None
            members[info.name] = fh.read()
    change(members)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return pyrage.encrypt(buf.getvalue(), [x25519.Recipient.from_str(controller.public)])


def _newer_schema(members: dict[str, bytes]) -> None:
    """Claim a schema revision this pforte has never heard of, with every hash made consistent."""
    header = json.loads(members["header.json"])
    header["schema_revision"] = "9999_from_the_future"
    members["header.json"] = json.dumps(header).encode()
    manifest = json.loads(members["manifest.json"])
    manifest["schema_revision"] = header["schema_revision"]
    manifest["members"][0].update(
        size=len(members["header.json"]), sha256=hashlib.sha256(members["header.json"]).hexdigest()
    )
    members["manifest.json"] = json.dumps(manifest).encode()


def _tamper(members: dict[str, bytes]) -> None:
    """Change one row and keep the archive well-formed (only the manifest hash disagrees)."""
    name = next(n for n in members if n.startswith("tables/messages/"))
    changed = members[name].replace(b'"in"', b'"out"', 1)
    assert changed != members[name]
    members[name] = changed


def _bad_inputs(out: Path, controller: Controller, tmp_path: Path) -> dict[str, tuple[Path, Path, str]]:
    """(backup file, identity file, expected message) for every way a restore must be refused."""
    data = out.read_bytes()
    cases: dict[str, tuple[Path, Path, str]] = {}

    def variant(name: str, content: bytes) -> Path:
        path = tmp_path / f"bad-{len(cases)}.age"
        path.write_bytes(content)
        return path

    other_key = Controller(tmp_path / "someone-else").key_file
    cases["wrong identity"] = (out, other_key, "does not open the backup")
    cases["missing identity file"] = (out, tmp_path / "no-such-key.txt", "identity file not found")
    cases["truncated file"] = (
        variant("t", data[: len(data) // 2]),
        controller.key_file,
        "damaged, truncated",
    )
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    cases["one flipped byte"] = (variant("f", bytes(flipped)), controller.key_file, "damaged, truncated")
    cases["newer schema"] = (
        variant("n", _repack(out, controller, _newer_schema)),
        controller.key_file,
        "newer than this pforte knows",
    )
    cases["a row changed under a valid encryption"] = (
        variant("r", _repack(out, controller, _tamper)),
        controller.key_file,
        "do not match its manifest",
    )
    cases["not a backup"] = (
        variant("x", b"hello, I am not encrypted\n" * 100),
        controller.key_file,
        "damaged",
    )
    return cases


@pytest.mark.dsk("I.9a")
async def test_a_bad_backup_or_key_is_refused_and_changes_nothing(world, controller, tmp_path):
    users = await fill(world)
    out = tmp_path / "backup.age"
    await make_backup(world, controller, out)
    # A later message: a restore that went ahead (even with --force) would visibly remove it.
    await world.sim.patient_send_text(user=users["A"], phone_number_id=PNID, text="später noch eine Frage")
    await world.settle()
    s = world.services.settings
    unchanged = await state(s)
    cases = _bad_inputs(out, controller, tmp_path)
    assert len(cases) == 7
    for case, (backup_file, identity, message) in cases.items():
        r = await pforte(
            s, "backup", "restore", str(backup_file), "--identity", str(identity), "--force", ok=False
        )
        assert r.exit_code == 2, f"{case}: {r.output}"
        assert r.stderr.count("\n") == 1 and message in r.stderr, f"{case}: {r.stderr}"
        assert await state(s) == unchanged, case
    # The same backup, untouched, does restore (the refusals above were about the damage).
    r = await pforte(s, "backup", "restore", str(out), "--identity", str(controller.key_file), "--force")
    assert "restored:" in r.stdout and await state(s) != unchanged


@pytest.mark.dsk("I.9a")
async def test_verify_reads_a_backup_without_restoring(world, controller, tmp_path):
    await fill(world)
    out = tmp_path / "backup.age"
    await make_backup(world, controller, out)
    s = world.services.settings
    unchanged = await state(s)
    r = await pforte(s, "backup", "verify", str(out), "--identity", str(controller.key_file))
    assert r.stdout.startswith("backup ok:") and "2 blob files" in r.stdout
    assert await state(s) == unchanged


async def schema_at(revision: str, tmp_path: Path) -> dict[str, list[str]]:
    """Tables and their columns at an older revision (a scratch SQLite database migrated to it)."""
    url = f"sqlite+aiosqlite:///{tmp_path / f'schema-{revision}.sqlite3'}"
    await asyncio.to_thread(migrate.upgrade, url, revision)
    db = Database(url)
    try:
        async with db.engine.connect() as c:

            def read(sc: Any) -> dict[str, list[str]]:
                i = inspect(sc)
                return {t: [col["name"] for col in i.get_columns(t)] for t in i.get_table_names()}

            return await c.run_sync(read)
    finally:
        await db.dispose()


def _as_of(schema: dict[str, list[str]], revision: str) -> Callable[[dict[str, bytes]], None]:
    """Rewrite a backup's members as if taken at ``revision``: its tables and columns only."""

    def change(members: dict[str, bytes]) -> None:
        header = json.loads(members["header.json"])
        keep: dict[str, list[int]] = {}
        tables = []
        for t in header["tables"]:
            if t["name"] in schema:
                idx = [i for i, (c, _) in enumerate(t["columns"]) if c in schema[t["name"]]]
                keep[t["name"]] = idx
                tables.append({"name": t["name"], "columns": [t["columns"][i] for i in idx]})
        header.update(schema_revision=revision, tables=tables)
        members["header.json"] = json.dumps(header).encode()
        manifest = json.loads(members["manifest.json"])
        listed = []
        for m in manifest["members"]:
            name = m["name"]
            if name.startswith("tables/"):
                table = name.split("/")[1]
                if table not in keep:
                    del members[name]
                    continue
                rows = [json.loads(line) for line in members[name].splitlines()]
                members[name] = b"".join(
                    json.dumps([r[i] for i in keep[table]]).encode() + b"\n" for r in rows
                )
            data = members[name]
            listed.append({**m, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        manifest.update(
            schema_revision=revision,
            members=listed,
            tables={t: n for t, n in manifest["tables"].items() if t in keep},
        )
        manifest_bytes = json.dumps(manifest).encode()
        del members["manifest.json"]
        members["manifest.json"] = manifest_bytes

    return change


@pytest.mark.dsk("I.9a")
async def test_an_older_backup_is_restored_and_migrated(world, db_kind, controller, fresh, tmp_path):
    """A backup taken at the previous schema goes into a current instance and comes out at the head,
    every message and attachment intact (a table rebuild during the upgrade must not cascade)."""
    await fill(world)
    before = await conversations(world.services, world.org_id)
    out = tmp_path / "backup.age"
    await make_backup(world, controller, out)
    revisions = backup.known_revisions()
    head_tables = (await table_rows(world.services.settings)).keys()
    # The newest earlier revision whose tables differ from the head's (a revision that changes only
    # constraints leaves the backup's content as it is); the restore then runs every later one.
    for old in reversed(revisions[:-1]):
        schema = await schema_at(old, tmp_path)
        if schema.keys() != head_tables:
            break
    assert schema.keys() < head_tables  # the schemas do differ
    older = tmp_path / "older.age"
    older.write_bytes(_repack(out, controller, _as_of(schema, old)))

    target = await fresh(db_kind, name="current")
    await asyncio.to_thread(migrate.upgrade, target.effective_database_url)  # a started, empty instance
    r = await pforte(target, "backup", "restore", str(older), "--identity", str(controller.key_file))
    assert f"schema {old} (migrated to {revisions[-1]})" in r.stdout
    assert await revision(target) == revisions[-1]
    assert await with_services(target, lambda sv: conversations(sv, world.org_id)) == before
    rows = await table_rows(target)
    assert any("backup.restore" in e for e in rows["audit_events"])


@pytest.mark.dsk("I.9a")
@pytest.mark.dsk("I.9b")
async def test_an_erased_contact_stays_erased_when_an_earlier_backup_is_restored(
    world, db_kind, controller, fresh, tmp_path
):
    """The key proof: erase A after the backup; restoring the backup brings back B but not A."""
    await fill(world)
    before = await conversations(world.services, world.org_id)
    a, b = before[A["name"]], before[B["name"]]
    # A's ciphertexts as stored: none of them may reappear anywhere after the restore.
    async with world.services.db.transaction() as s:
        contact = (await s.execute(select(Contact).where(Contact.id == a["contact_id"]))).scalar_one()
        wrapped = (await s.execute(select(DataKey.wrapped).where(DataKey.id == contact.dek_id))).scalar_one()
        bodies = list(
            (await s.execute(select(Message.body_enc).where(Message.contact_id == contact.id))).scalars()
        )
        a_blobs = list(
            (
                await s.execute(select(Attachment.blob_name).where(Attachment.contact_id == contact.id))
            ).scalars()
        )
    a_files = [world.services.blobs._path(n).read_bytes() for n in a_blobs]
    assert wrapped and len([x for x in bodies if x]) == 2 and len(a_files) == 1

    out = tmp_path / "backup.age"
    await make_backup(world, controller, out)

    sv = world.services
    async with sv.db.transaction() as s:
        await deletion.erase_contact(
            s,
            sv.eraser,
            org_id=world.org_id,
            contact_id=a["contact_id"],
            actor=audit.CLI,
            reason="erasure_request",
            now=sv.clock.now(),
        )
    finished = False
    while not finished:
        async with sv.db.transaction() as s:
            finished, _ = await deletion.purge_erased_step(s, sv.eraser, a["contact_id"])
    ledger = sv.settings.effective_erasure_ledger
    assert ledger.exists()

    target = await fresh(db_kind, ledger=ledger)
    r = await pforte(target, "backup", "restore", str(out), "--identity", str(controller.key_file))
    assert "erasure ledger: 2 entries re-applied" in r.stdout and "contact 1" in r.stdout

    after = await with_services(target, lambda s: conversations(s, world.org_id))
    assert A["name"] not in after
    assert after == {B["name"]: b}

    async def leftovers(s: Any) -> dict[str, int]:
        async with s.db.transaction() as t:
            out = {}
            for model, col in (
                (Contact, Contact.id),
                (Message, Message.contact_id),
                (Attachment, Attachment.contact_id),
            ):
                out[model.__tablename__] = len(
                    (await t.execute(select(model).where(col == a["contact_id"]))).all()
                )
            out["data_keys"] = len(
                (await t.execute(select(DataKey).where(DataKey.id == contact.dek_id))).all()
            )
            return out

    assert await with_services(target, leftovers) == {
        "contacts": 0,
        "messages": 0,
        "attachments": 0,
        "data_keys": 0,
    }
    restored_blobs = {p.name for p in (target.data_dir / "blobs").rglob("*") if p.is_file()}
    assert len(restored_blobs) == 1 and not restored_blobs & set(a_blobs)

    storage = await raw_storage(target)
    assert sum(len(blob) for _, blob in storage) > 10_000  # the search below looked at real data
    assert leaks(storage, needles(A)) == []
    ciphertexts = {
        "wrapped data key": [wrapped],
        "message body": [x for x in bodies if x],
        "photo file": a_files,
    }
    assert leaks(storage, ciphertexts) == []
    # ... and the detector is not blind: B's photo file is found as it is stored.
    b_file = next(blob for where, blob in storage if where.startswith("blobs/"))
    assert leaks(storage, {"B's photo": [b_file]}) != []


@pytest.mark.dsk("I.9b")
async def test_the_server_never_holds_the_controllers_secret_key(world, controller, tmp_path):
    s = world.services.settings
    r = await pforte(s, "backup", "create", "--out", str(tmp_path / "none.age"), ok=False)
    refused(r, "no backup recipient set")

    r = await pforte(s, "backup", "set-recipient", controller.secret, ok=False)
    refused(r, "SECRET key")
    assert controller.secret not in r.output
    r = await pforte(s, "backup", "set-recipient", "age1notakey", ok=False)
    refused(r, "not an age X25519 public key")

    await fill(world)
    out = tmp_path / "backup.age"
    r = await make_backup(world, controller, out)
    shown = await pforte(s, "backup", "show-recipient")
    assert shown.stdout.splitlines()[0] == controller.public
    assert s.effective_backup_recipient_file.read_text().count(controller.public) == 1

    secret_forms = {"secret key": [controller.secret.encode(), controller.secret.lower().encode()]}
    assert leaks(await raw_storage(s), secret_forms) == []
    # The backup itself is age ciphertext: no plaintext, no key ring, no patient data in it.
    raw = out.read_bytes()
    assert raw.startswith(b"age-encryption.org/v1\n")
    assert leaks([("backup", raw)], {**needles(A), **needles(B), "keyring": [b'"keks"']}) == []
    r = await pforte(s, "backup", "create", "--out", str(out), ok=False)
    refused(r, "exists")


@pytest.mark.dsk("I.9a")
async def test_the_snapshot_does_not_see_later_writes(world, db_kind):
    """What ``backup create`` reads comes from one transaction, however long it runs."""
    sv = world.services
    async with backup.snapshot(sv.db) as snap:
        assert await backup.current_revision(snap) == backup.known_revisions()[-1]  # snapshot starts here
        if db_kind == "postgresql":
            iso = (await snap.exec_driver_sql("SHOW transaction_isolation")).scalar()
            ro = (await snap.exec_driver_sql("SHOW transaction_read_only")).scalar()
            assert (iso, ro) == ("repeatable read", "on")
        async with sv.db.transaction() as s:
            await orgs.create(session=s, keys=sv.keys, name="Später", slug="spaeter", now=sv.clock.now())
        seen = (await snap.exec_driver_sql("SELECT count(*) FROM organisations")).scalar()
    async with sv.db.transaction() as s:
        now_there = len(await orgs.list_(session=s))
    assert (seen, now_there) == (1, 2)


@pytest.mark.dsk("I.9b")
async def test_an_erased_organisation_stays_erased_after_restoring_an_older_backup(
    world, db_kind, controller, fresh, tmp_path
):
    """Erasing relies on cascades for an organisation's rows; they must hold during a restore that
    also upgrades the schema (SQLite runs that upgrade with foreign keys off), and its KEK must not
    come back into the key ring."""
    await fill(world)
    out = tmp_path / "backup.age"
    await make_backup(world, controller, out)
    old = backup.known_revisions()[-2]
    older = tmp_path / "older.age"
    older.write_bytes(_repack(out, controller, _as_of(await schema_at(old, tmp_path), old)))
    sv = world.services
    async with sv.db.transaction() as s:
        _, kek_ids = await deletion.delete_organisation(
            s,
            sv.eraser,
            org_id=world.org_id,
            actor=audit.CLI,
            reason="organisation_closed",
            now=sv.clock.now(),
        )
    assert kek_ids
    for kek_id in kek_ids:
        sv.keys.provider.destroy_kek(kek_id)

    target = await fresh(db_kind, ledger=sv.settings.effective_erasure_ledger)
    r = await pforte(target, "backup", "restore", str(older), "--identity", str(controller.key_file))
    assert "organisation 1" in r.stdout
    rows = await table_rows(target)
    owned = ("organisations", "channels", "staff_users", "data_keys", "contacts", "conversations")
    gone = (*owned, "messages", "attachments", "message_templates")
    assert {t: len(rows[t]) for t in gone} == dict.fromkeys(gone, 0)
    assert not [job for job in rows["jobs"] if world.org_id in job]  # system jobs (no organisation) stay
    assert files(target.data_dir / "blobs") == {}
    ring = target.effective_key_file
    assert not ring.exists() or not set(kek_ids) & json.loads(ring.read_text())["keks"].keys()


@pytest.mark.dsk("I.9a")
async def test_a_restored_instance_ends_sessions_and_does_not_resend_what_was_waiting(
    world, db_kind, controller, fresh, tmp_path
):
    """A message queued at backup time may have gone out since: after a restore it waits for a person."""
    from pforte.conversations.models import Message
    from pforte.outbox.models import Job
    from pforte.staff.models import StaffSession

    await fill(world)
    assert (await world.login()).status_code == 303
    sv = world.services
    async with sv.db.transaction() as s:
        (row, *_) = await conv.list_(session=s, keys=sv.keys, org_id=world.org_id, now=sv.clock.now())
        queued = await conv.send_text(
            session=s,
            keys=sv.keys,
            org_id=world.org_id,
            conversation_id=row.id,
            user_id=world.staff_id,
            text="Ihr Befund ist da",
            now=sv.clock.now(),
        )  # not settled: the outbox has not sent it when the backup is taken
    out = tmp_path / "backup.age"
    await make_backup(world, controller, out)
    target = await fresh(db_kind)
    restored = await pforte(target, "backup", "restore", str(out), "--identity", str(controller.key_file))
    assert "sessions ended: 1; messages waiting to be sent put up for review: 1" in restored.stdout

    async def state(sv2: Any) -> tuple[Any, ...]:
        async with sv2.db.transaction() as s:
            m = (await s.execute(select(Message).where(Message.id == queued.id))).scalar_one()
            jobs = (await s.execute(select(Job.state).where(Job.kind == "send_message"))).scalars().all()
            sessions = (await s.execute(select(StaffSession))).scalars().all()
            return m.status, m.review_reason, list(jobs), sessions

    status, reason, jobs, sessions = await with_services(target, state)
    assert (status, reason, jobs, sessions) == ("review", "restored_from_backup", ["review"], [])
