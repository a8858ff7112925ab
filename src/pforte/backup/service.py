"""Backups that exist and are useless to anyone but the controller (DSK I.9a, I.9b).

A backup is one file, encrypted with age to the controller's public key. The server stores only
that public key; the matching identity stays with the controller, offline. The file holds a tar
stream (``age -d -i key.txt backup.age | tar t`` lists it):

* ``header.json`` first: format version, schema revision, source dialect, time, every table's
  columns and how their values are written (so a restore can refuse a newer schema at once);
* ``tables/<table>/<nnnnnn>.jsonl``: every row, one JSON array per line, in foreign-key order, from
  ONE read transaction (PostgreSQL ``REPEATABLE READ, READ ONLY``; SQLite one WAL read
  transaction). Binary columns are base64, times ISO 8601 UTC, JSON columns their JSON text; the
  dump is dialect-neutral, so a SQLite backup restores into PostgreSQL and back;
* ``blobs/<aa>/<name>``: the attachment files the snapshot refers to, copied as they are (they are
  already AES-GCM ciphertext);
* ``keyring.json``: the KEKs (read before and after the snapshot began, so every KEK the snapshot
  can refer to is in it). Safe only because the whole archive is encrypted to the controller;
* ``manifest.json`` last: the header's facts again, per-table row counts and every member's size
  and SHA-256.

Restoring is the dangerous direction, so it runs in this order and stops at the first problem:

1. **Decrypt and verify everything first** (pass 1): age authentication of every chunk and of the
   end of the stream, every member present in order with its manifest hash, row counts, schema
   revision known to this pforte, every KEK the rows refer to present, no KEK that would clash
   with the target's key ring. Nothing decrypted is written anywhere; a wrong key, a truncated or
   tampered file or a newer schema changes nothing.
2. **Check the target**: a target holding an organisation, audit entry or tombstone is refused
   unless ``--force``; bring the (empty or forced) target's schema to the backup's revision. This
   step is outside the transaction: with ``--force`` and a target at another revision, a failure
   later leaves the old data at the backup's schema (restore again).
3. **One transaction** (pass 2, decrypting again and re-checking every hash as it goes): wipe the
   tables (reverse foreign-key order), bulk-insert every row, migrate them to this pforte's schema
   if the backup was older (Alembic on the same connection: transactional DDL on both databases),
   then **re-apply the erasure ledger** (``deletion.service.reapply``) so what was erased after the
   backup was taken stays erased. Data keys the ledger names are inserted already destroyed, so
   their wrapped key never reaches the target's storage, and only blob files still referred to
   after the re-application are written. The KEKs still needed are merged into the key ring (none
   dropped), the audit entry written, then commit. A failure rolls back and removes the blob files
   this restore wrote.
4. After commit: remove blob files of the wiped data that nothing refers to any more.

Run a restore with pforte stopped: it replaces the database under a running server.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import asyncpg
from alembic import command
from alembic.script import ScriptDirectory
from pyrage import x25519
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    cast,
    column,
    delete,
    insert,
    inspect,
    literal,
    select,
    table,
    union,
    update,
)
from sqlalchemy import types as sqltypes
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from pforte import migrate
from pforte.audit import service as audit
from pforte.backup.archive import (
    BackupError,
    Begin,
    Data,
    Event,
    TarParser,
    decrypt_chunks,
    encrypt_to,
    parse_recipient,
    tar_header,
    tar_padding,
    tar_trailer,
)
from pforte.config import Settings
from pforte.crypto.keys import FileKeyProvider, KeyProvider
from pforte.db import Database, UTCDateTime
from pforte.deletion import service as deletion

FORMAT = "pforte-backup"
VERSION = 1
HEADER = "header.json"
MANIFEST = "manifest.json"
KEYRING = "keyring.json"
PART_BYTES = 8 << 20  # rows per table part are cut at about this size
MAX_JSON_MEMBER = 64 << 20  # largest header, manifest, key ring or table part a restore accepts
INSERT_BATCH = 1000
READ_BATCH = 2000
BLOB_CHUNK = 1 << 20
HISTORY_TABLES = ("organisations", "audit_events", "tombstones")  # a target holding any is not empty
_TABLE_PART = re.compile(r"tables/([a-z_][a-z0-9_]{0,62})/(\d{6})\.jsonl")
_BLOB = re.compile(r"blobs/([0-9a-f]{2})/([0-9a-f]{32})")
_INSERT_TYPES: dict[str, Any] = {
    "str": String(),
    "int": BigInteger(),
    "float": Float(),
    "bool": Boolean(),
    "bytes": LargeBinary(),
    "datetime": UTCDateTime(),
    "json": JSON(none_as_null=True),
}


# -- the recipient ---------------------------------------------------------------------------------


def fingerprint(recipient: str) -> str:
    """A short, stable fingerprint of a public key to compare by eye."""
    digest = hashlib.sha256(recipient.encode()).hexdigest()[:16]
    return "sha256:" + ":".join(digest[i : i + 4] for i in range(0, 16, 4))


def set_recipient(settings: Settings, text: str) -> str:
    """Validate and store the controller's age public key; returns it normalised."""
    value = str(parse_recipient(text))
    path = settings.effective_backup_recipient_file
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("# pforte backups are encrypted to this age public key (the secret key stays offline)\n")
        fh.write(value + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return value


def get_recipient(settings: Settings) -> str | None:
    """The stored public key, or None if none was set."""
    path = settings.effective_backup_recipient_file
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    keys = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if len(keys) != 1:
        raise BackupError(f"backup recipient file {path} is damaged; run pforte backup set-recipient again")
    return str(parse_recipient(keys[0]))


# -- schema revisions ------------------------------------------------------------------------------


def known_revisions() -> list[str]:
    """This pforte's migrations, oldest first (the last one is the head)."""
    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    return [r.revision for r in reversed(list(script.walk_revisions()))]


current_revision = migrate.revision_of  # the schema revision a backup records and a restore needs


def _upgrade_in(sync_conn: Any, url: str, revision: str) -> None:
    """Upgrade inside the caller's open transaction (migrations/env.py takes a given connection)."""
    cfg = migrate.alembic_config(url)
    cfg.attributes["connection"] = sync_conn
    command.upgrade(cfg, revision)


def _migrate(url: str, revision: str, *, down: bool = False) -> None:
    if down:
        command.downgrade(migrate.alembic_config(url), revision)
    else:
        migrate.upgrade(url, revision)


# -- values ----------------------------------------------------------------------------------------


def column_kind(column: Any) -> str:
    """How a column's values are written into the dump."""
    t = column.type
    if isinstance(t, sqltypes.TypeDecorator):
        t = t.impl_instance
    if isinstance(t, sqltypes.JSON):
        return "json"
    if isinstance(t, sqltypes.LargeBinary):
        return "bytes"
    if isinstance(t, sqltypes.DateTime):
        return "datetime"
    if isinstance(t, sqltypes.Boolean):
        return "bool"
    if isinstance(t, sqltypes.Integer):
        return "int"
    if isinstance(t, sqltypes.Float):
        return "float"
    if isinstance(t, sqltypes.String):
        return "str"
    raise BackupError(f"column {column.table.name}.{column.name} has a type backups cannot carry yet")


def _b64(value: Any) -> str:
    return base64.b64encode(bytes(value)).decode()


def _iso(value: datetime) -> str:
    if value.tzinfo is None:  # SQLite keeps UTC without a zone
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat()


def _from_json(value: str) -> Any:
    parsed = json.loads(value)
    return JSON.NULL if parsed is None else parsed  # JSON null, not SQL NULL


def _unb64(value: str) -> bytes:
    return base64.b64decode(value, validate=True)


# Per kind, how a non-NULL value is written into the dump and read back (None: as it is).
_ENCODE: dict[str, Callable[[Any], Any] | None] = {"bytes": _b64, "datetime": _iso}
_DECODE: dict[str, Callable[[Any], Any] | None] = {
    "bytes": _unb64,
    "datetime": datetime.fromisoformat,
    "json": _from_json,
    "float": float,
}
_DECODE_COPY = {**_DECODE, "json": None}  # COPY through asyncpg takes JSON as its text


def _codec(
    table: dict[str, Callable[[Any], Any] | None], kinds: Sequence[str]
) -> Callable[[Sequence[Any]], list[Any]]:
    """A function converting one row's values, with each column's converter looked up once."""
    fns = [table.get(k) for k in kinds]

    def convert(row: Sequence[Any]) -> list[Any]:
        if len(row) != len(fns):
            raise BackupError("a row in the backup does not have its table's columns")
        return [v if fn is None or v is None else fn(v) for fn, v in zip(fns, row, strict=True)]

    return convert


def _insert_table(name: str, columns: Sequence[tuple[str, str]]) -> Table:
    return Table(name, MetaData(), *(Column(c, _INSERT_TYPES[k]) for c, k in columns))


# -- the snapshot ------------------------------------------------------------------------------------


@asynccontextmanager
async def snapshot(db: Database) -> AsyncIterator[AsyncConnection]:
    """One read-only transaction that sees the whole database as of its first query."""
    async with db.engine.connect() as conn:
        if db.dialect == "postgresql":
            await conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            await conn.begin()
            try:
                yield conn
            finally:
                await conn.rollback()
        else:
            # The sqlite3 module only begins transactions before writes; begin one by hand so every
            # SELECT reads the same WAL snapshot.
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.exec_driver_sql("BEGIN")
            try:
                yield conn
            finally:
                await conn.exec_driver_sql("ROLLBACK")


# -- the key ring ----------------------------------------------------------------------------------


def read_keyring(provider: KeyProvider) -> dict[str, dict[str, Any]]:
    """Every KEK the provider holds right now (the file is re-read, not a cached copy)."""
    if isinstance(provider, FileKeyProvider):
        provider = FileKeyProvider(provider.path)
    return {
        kek_id: {
            "key": base64.b64encode(provider.get_kek(kek_id)).decode(),
            "created_at": meta.get("created_at"),
        }
        for kek_id, meta in provider.list_keks().items()
    }


def _import_keks(provider: KeyProvider, keks: dict[str, dict[str, Any]]) -> list[str]:
    """Add KEKs the ring lacks (never replacing or dropping one); returns the ids added."""
    if not keks:
        return []
    if not isinstance(provider, FileKeyProvider):
        raise BackupError("restoring keys needs the file key provider")
    # FileKeyProvider has no public import yet: use its own lock, load and atomic save.
    exclusive = getattr(provider, "_exclusive", None)
    with exclusive() if exclusive is not None else provider._lock:
        provider._load()
        added = [k for k in sorted(keks) if k not in provider._keks]
        for kek_id in added:
            provider._keks[kek_id] = {
                "key": keks[kek_id]["key"],
                "created_at": keks[kek_id].get("created_at"),
            }
        if added:
            provider._save()
    return added


# -- writing ---------------------------------------------------------------------------------------


@dataclass
class Member:
    """One archive member as the manifest lists it."""

    name: str
    size: int
    sha256: str
    rows: int | None = None

    def doc(self) -> dict[str, Any]:
        """The manifest entry."""
        d: dict[str, Any] = {"name": self.name, "size": self.size, "sha256": self.sha256}
        if self.rows is not None:
            d["rows"] = self.rows
        return d


@dataclass
class Written:
    """What :func:`build` put into the archive (filled in while it streams)."""

    revision: str | None = None
    rows: dict[str, int] = field(default_factory=dict)
    blobs: int = 0
    blob_bytes: int = 0
    missing_blobs: int = 0
    keks: int = 0


class _Tar:
    """Frames members and remembers their sizes and hashes."""

    def __init__(self, mtime: int) -> None:
        self.mtime = mtime
        self.members: list[Member] = []
        self.written = 0

    def file(self, name: str, data: bytes, rows: int | None = None) -> list[bytes]:
        self.members.append(Member(name, len(data), hashlib.sha256(data).hexdigest(), rows))
        return self._account([tar_header(name, len(data), self.mtime), data, tar_padding(len(data))])

    def _account(self, pieces: list[bytes]) -> list[bytes]:
        self.written += sum(len(p) for p in pieces)
        return pieces

    async def blob(self, name: str, path: Path) -> AsyncIterator[bytes]:
        fh = await asyncio.to_thread(path.open, "rb")
        try:
            size = os.fstat(fh.fileno()).st_size
            digest = hashlib.sha256()
            yield self._account([tar_header(name, size, self.mtime)])[0]
            left = size
            while left:
                chunk = await asyncio.to_thread(fh.read, min(BLOB_CHUNK, left))
                if not chunk:
                    raise BackupError("a blob file shrank while it was being backed up")
                digest.update(chunk)
                left -= len(chunk)
                yield self._account([chunk])[0]
            yield self._account([tar_padding(size)])[0]
            self.members.append(Member(name, size, digest.hexdigest()))
        finally:
            fh.close()


async def _table_parts(
    conn: AsyncConnection, table: Table, kinds: list[str], seen_blobs: set[str] | None
) -> AsyncIterator[tuple[bytes, int]]:
    """A table's rows as JSON lines, cut into parts of about PART_BYTES."""
    cols = [
        cast(c, Text).label(c.name) if k == "json" else c for c, k in zip(table.columns, kinds, strict=True)
    ]
    blob_at = list(table.columns.keys()).index("blob_name") if seen_blobs is not None else -1
    q = select(*cols).order_by(*table.primary_key.columns).execution_options(yield_per=READ_BATCH)
    encode = _codec(_ENCODE, kinds)
    result = await conn.stream(q)
    buf: list[bytes] = []
    size = rows = 0
    async for batch in result.partitions():
        for row in batch:
            line = json.dumps(
                encode(row),
                separators=(",", ":"),
                ensure_ascii=False,
            ).encode()
            buf.append(line + b"\n")
            size += len(line) + 1
            rows += 1
            if seen_blobs is not None and row[blob_at]:
                seen_blobs.add(row[blob_at])
            if size >= PART_BYTES:
                yield b"".join(buf), rows
                buf, size, rows = [], 0, 0
    if rows:
        yield b"".join(buf), rows


def _json(doc: Any) -> bytes:
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


async def build(
    *,
    db: Database,
    tables: Sequence[Table],
    keyring: Callable[[], dict[str, dict[str, Any]]],
    blob_root: Path,
    now: datetime,
    written: Written,
    require_revision: str | None = None,
) -> AsyncIterator[bytes]:
    """The plaintext archive as a stream of chunks (to be encrypted by :func:`encrypt_to`)."""
    tar = _Tar(int(now.timestamp()))
    tables = [t for t in tables if t.name != "alembic_version"]  # the revision goes into the header
    ring = keyring()
    blob_names: set[str] = set()
    kinds = {t.name: [column_kind(c) for c in t.columns] for t in tables}
    async with snapshot(db) as conn:
        revision = await current_revision(conn)  # the first query: the snapshot starts here
        if require_revision is not None and revision != require_revision:
            raise BackupError(
                f"the database is at schema {revision}, this pforte expects {require_revision}; "
                "run pforte migrate first"
            )
        written.revision = revision
        ring = {**keyring(), **ring}  # plus KEKs made since the first read (the snapshot may use them)
        header = {
            "format": FORMAT,
            "version": VERSION,
            "created_at": now.astimezone(UTC).isoformat(),
            "schema_revision": revision,
            "source_dialect": db.dialect,
            "pforte_version": _pforte_version(),
            "tables": [
                {
                    "name": t.name,
                    "columns": [[c.name, k] for c, k in zip(t.columns, kinds[t.name], strict=True)],
                }
                for t in tables
            ],
        }
        for piece in tar.file(HEADER, _json(header)):
            yield piece
        for t in tables:
            written.rows[t.name] = 0
            seq = 0
            async for data, rows in _table_parts(
                conn, t, kinds[t.name], blob_names if t.name == "attachments" else None
            ):
                seq += 1
                written.rows[t.name] += rows
                for piece in tar.file(f"tables/{t.name}/{seq:06d}.jsonl", data, rows):
                    yield piece
    # The snapshot is closed: blob files are immutable, and a file deleted since the snapshot
    # belongs to an erasure that the ledger repeats on restore.
    missing = []
    for name in sorted(blob_names):
        path = blob_root / name[:2] / name
        if not _BLOB.fullmatch(f"blobs/{name[:2]}/{name}") or not path.is_file():
            missing.append(name)
            continue
        async for piece in tar.blob(f"blobs/{name[:2]}/{name}", path):
            yield piece
        written.blobs += 1
        written.blob_bytes += tar.members[-1].size
    written.missing_blobs = len(missing)
    written.keks = len(ring)
    for piece in tar.file(KEYRING, _json({"version": 1, "keks": ring})):
        yield piece
    manifest = {
        **{k: v for k, v in header.items() if k != "tables"},
        "tables": {t.name: written.rows[t.name] for t in tables},
        "blobs": {"count": written.blobs, "bytes": written.blob_bytes, "missing": missing},
        "members": [m.doc() for m in tar.members],
    }
    for piece in tar.file(MANIFEST, _json(manifest)):
        yield piece
    yield tar_trailer(tar.written)


def _pforte_version() -> str:
    try:
        return importlib_metadata.version("pforte")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Created:
    """What ``backup create`` wrote."""

    path: Path
    size: int
    sha256: str
    revision: str
    rows: dict[str, int]
    blobs: int
    blob_bytes: int
    missing_blobs: int
    keks: int


def _check_out(out: Path) -> None:
    if out.exists():
        raise BackupError(f"{out} exists; choose a new file name")
    if not out.parent.is_dir():
        raise BackupError(f"directory {out.parent} does not exist")


async def create(services: Any, out: Path) -> Created:
    """Write an encrypted backup of the whole instance to ``out``; audit it afterwards."""
    from pforte.models import Base

    settings: Settings = services.settings
    recipient = get_recipient(settings)
    if recipient is None:
        raise BackupError("no backup recipient set; run pforte backup set-recipient age1… first")
    _check_out(out)
    now = services.clock.now()
    written = Written()
    size, sha = await encrypt_to(
        out,
        build(
            db=services.db,
            tables=Base.metadata.sorted_tables,
            keyring=lambda: read_keyring(services.keys.provider),
            blob_root=services.blobs.root,
            now=now,
            written=written,
            require_revision=known_revisions()[-1],
        ),
        [parse_recipient(recipient)],
    )
    assert written.revision is not None
    async with services.db.transaction() as session:
        await audit.record(
            session,
            org_id=None,
            actor=audit.CLI,
            action="backup.create",
            now=services.clock.now(),
            object_kind="backup",
            details={
                "schema": written.revision,
                "rows": sum(written.rows.values()),
                "tables": len(written.rows),
                "blobs": written.blobs,
                "missing_blobs": written.missing_blobs,
                "bytes": size,
                "sha256": sha,
                "recipient": fingerprint(recipient),
            },
        )
    return Created(
        path=out,
        size=size,
        sha256=sha,
        revision=written.revision,
        rows=dict(written.rows),
        blobs=written.blobs,
        blob_bytes=written.blob_bytes,
        missing_blobs=written.missing_blobs,
        keks=written.keks,
    )


# -- reading: pass 1, verify -------------------------------------------------------------------------


@dataclass
class Verified:
    """A backup that decrypted and checked out completely (held in memory: no row data)."""

    header: dict[str, Any]
    manifest: dict[str, Any]
    keyring: dict[str, dict[str, Any]]
    members: list[Member]
    sha256: str = ""  # of the encrypted file, to compare with what ``backup create`` printed

    @property
    def revision(self) -> str:
        """The schema revision the backup was taken at."""
        return str(self.header["schema_revision"])

    @property
    def columns(self) -> dict[str, list[tuple[str, str]]]:
        """Each table's (column, kind) pairs, in foreign-key order."""
        return {t["name"]: [(c, k) for c, k in t["columns"]] for t in self.header["tables"]}


def _load_json(name: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise BackupError(f"{name} in the backup is not valid JSON") from None


def _check_header(header: Any, revisions: list[str]) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise BackupError("not a pforte backup (no pforte header)")
    if header.get("version") != VERSION:
        raise BackupError(f"backup format {header.get('version')} is not one this pforte reads ({VERSION})")
    rev = header.get("schema_revision")
    if rev not in revisions:
        raise BackupError(
            f"the backup's schema {rev} is newer than this pforte knows (newest {revisions[-1]}); "
            "restore it with the pforte version that wrote it"
        )
    tables = header.get("tables")
    if not isinstance(tables, list) or not all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("columns"), list)
        for t in tables
    ):
        raise BackupError("the backup's header is damaged")
    for t in tables:
        for col in t["columns"]:
            if not (isinstance(col, list) and len(col) == 2 and col[1] in _INSERT_TYPES):
                raise BackupError("the backup's header names a column type this pforte does not know")


class _Checker:
    """Pass 1: follows the members, hashes and counts them, and checks the whole at the end."""

    PARSED = ("organisations", "data_keys", "attachments")  # rows read to check keys and blobs

    def __init__(self, revisions: list[str], target_ring: dict[str, dict[str, Any]]) -> None:
        self.revisions = revisions
        self.target_ring = target_ring
        self.members: list[Member] = []
        self.header: dict[str, Any] | None = None
        self.manifest: dict[str, Any] | None = None
        self.keyring: dict[str, dict[str, Any]] | None = None
        self.rows: dict[str, int] = {}
        self.kek_refs: set[str] = set()
        self.blob_refs: set[str] = set()
        self.blob_members: set[str] = set()
        self._seen: set[str] = set()
        self._name = ""
        self._hash = hashlib.sha256()
        self._size = 0
        self._lines = 0
        self._buf: bytearray | None = None

    def on(self, ev: Event) -> None:
        if isinstance(ev, Begin):
            self._begin(ev)
        elif isinstance(ev, Data):
            self._hash.update(ev.data)
            self._size += len(ev.data)
            self._lines += ev.data.count(b"\n")
            if self._buf is not None:
                self._buf += ev.data
        else:
            self._end()

    def _begin(self, ev: Begin) -> None:
        if self.manifest is not None:
            raise BackupError("the archive has members after its manifest")
        if not self.members and ev.name != HEADER:
            raise BackupError("not a pforte backup (the archive does not start with its header)")
        if ev.name in self._seen:
            raise BackupError("the archive repeats a member")
        self._seen.add(ev.name)
        table = _TABLE_PART.fullmatch(ev.name)
        buffered = ev.name in (HEADER, MANIFEST, KEYRING) or bool(table and table.group(1) in self.PARSED)
        if not (ev.name in (HEADER, MANIFEST, KEYRING) or table or _BLOB.fullmatch(ev.name)):
            raise BackupError("the archive holds a member a pforte backup does not have")
        if (buffered or table) and ev.size > MAX_JSON_MEMBER:
            raise BackupError("the archive holds an oversized member")
        self._name, self._hash, self._size, self._lines = ev.name, hashlib.sha256(), 0, 0
        self._buf = bytearray() if buffered else None

    def _end(self) -> None:
        name, data = self._name, bytes(self._buf) if self._buf is not None else b""
        table = _TABLE_PART.fullmatch(name)
        member = Member(name, self._size, self._hash.hexdigest(), self._lines if table else None)
        self.members.append(member)
        if name == HEADER:
            header = _load_json(name, data)
            _check_header(header, self.revisions)
            self.header = header
        elif table:
            self._table_part(table.group(1), data)
        elif name == KEYRING:
            self.keyring = self._ring(_load_json(name, data))
        elif name == MANIFEST:
            manifest = _load_json(name, data)
            if not isinstance(manifest, dict):
                raise BackupError("the backup's manifest is damaged")
            self.manifest = manifest
        else:
            self.blob_members.add(name.rsplit("/", 1)[1])

    def _table_part(self, table: str, data: bytes) -> None:
        assert self.header is not None
        columns = {t["name"]: [c for c, _ in t["columns"]] for t in self.header["tables"]}
        if table not in columns:
            raise BackupError("the archive holds rows of a table its header does not list")
        self.rows[table] = self.rows.get(table, 0) + self._lines
        if table not in self.PARSED:
            return
        cols = columns[table]
        try:
            for line in data.splitlines():
                row = dict(zip(cols, _load_json(self._name, line), strict=True))
                if table == "organisations":
                    self.kek_refs.add(str(row["kek_id"]))
                elif table == "data_keys" and row.get("wrapped") is not None:
                    self.kek_refs.add(str(row["kek_id"]))
                elif table == "attachments" and row.get("blob_name"):
                    self.blob_refs.add(str(row["blob_name"]))
        except (ValueError, TypeError, KeyError):
            raise BackupError(f"a row of table {table} in the backup is malformed") from None

    def _ring(self, doc: Any) -> dict[str, dict[str, Any]]:
        keks = doc.get("keks") if isinstance(doc, dict) else None
        if not isinstance(keks, dict):
            raise BackupError("the backup's key ring is damaged")
        for kek_id, entry in keks.items():
            try:
                ok = len(base64.b64decode(entry["key"], validate=True)) == 32
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                raise BackupError("the backup's key ring is damaged")
            mine = self.target_ring.get(kek_id)
            if mine is not None and mine["key"] != entry["key"]:
                raise BackupError(f"key {kek_id} exists in this key ring with different key material")
        return keks

    def finish(self) -> Verified:
        if self.header is None or self.manifest is None or self.keyring is None:
            raise BackupError("the archive is incomplete (header, key ring or manifest missing)")
        m = self.manifest
        for key in ("format", "version", "created_at", "schema_revision", "source_dialect"):
            if m.get(key) != self.header.get(key):
                raise BackupError("the backup's manifest does not match its header")
        listed = m.get("members")
        if listed != [x.doc() for x in self.members[:-1]]:
            raise BackupError("the archive's members do not match its manifest (sizes, hashes or order)")
        header_tables = [t["name"] for t in self.header["tables"]]
        counts = m.get("tables")
        if not isinstance(counts, dict) or set(counts) != set(header_tables):
            raise BackupError("the backup's manifest does not list the header's tables")
        for name in header_tables:
            if counts[name] != self.rows.get(name, 0):
                raise BackupError(
                    f"table {name} holds {self.rows.get(name, 0)} rows, the manifest says {counts[name]}"
                )
        missing = set((m.get("blobs") or {}).get("missing") or [])
        if self.blob_refs != self.blob_members | missing or self.blob_members & missing:
            raise BackupError("the archive's blob files do not match its attachments")
        absent = self.kek_refs - self.keyring.keys() - self.target_ring.keys()
        if absent:
            raise BackupError(f"the backup lacks {len(absent)} key-encryption key(s) its rows need")
        return Verified(header=self.header, manifest=m, keyring=self.keyring, members=self.members)


async def verify(
    path: Path, identities: list[x25519.Identity], *, target_ring: dict[str, dict[str, Any]] | None = None
) -> Verified:
    """Decrypt and check the whole backup without writing anything (pass 1)."""
    checker = _Checker(known_revisions(), target_ring or {})
    parser = TarParser()
    digest = hashlib.sha256()
    async for chunk in decrypt_chunks(path, identities, digest):
        for ev in parser.feed(chunk):
            checker.on(ev)
    parser.close()
    verified = checker.finish()
    verified.sha256 = digest.hexdigest()
    return verified


# -- restoring: pass 2, apply ------------------------------------------------------------------------


@dataclass(frozen=True)
class Restored:
    """What ``backup restore`` did."""

    revision: str
    upgraded_to: str | None
    rows: dict[str, int]
    blobs: int
    missing_blobs: int
    ledger_entries: int
    reapplied: dict[str, int]
    keys_added: int
    wiped: bool
    orphans_removed: int
    sha256: str
    quiesced: dict[str, int]


def _names(sync_conn: Any) -> list[str]:
    return [n for n in inspect(sync_conn).get_table_names() if n != "alembic_version"]


def _reflect(sync_conn: Any) -> list[Table]:
    md = MetaData()
    md.reflect(sync_conn, only=_names(sync_conn))
    return list(md.sorted_tables)


async def target_has_history(conn: AsyncConnection) -> bool:
    """Whether a database holds anything a restore must not overwrite without --force."""
    names = set(await conn.run_sync(_names))
    for name in HISTORY_TABLES:
        if (
            name in names
            and (await conn.execute(select(literal(1)).select_from(table(name)).limit(1))).first()
        ):
            return True
    return False


async def _finish_cascades(conn: AsyncConnection) -> None:
    """SQLite with foreign keys off (an upgrade inside the restore): do what ``ON DELETE`` would have
    done for rows the ledger's re-application orphaned; any other broken reference refuses the restore.
    """
    while True:
        problems = [tuple(r) for r in await conn.exec_driver_sql("PRAGMA foreign_key_check")]
        if not problems:
            return
        orphans: dict[tuple[str, int], list[int]] = {}
        for child, rowid, _parent, fk_id in problems:
            orphans.setdefault((str(child), int(fk_id)), []).append(int(rowid))
        for (child, fk_id), rowids in orphans.items():
            listed = await conn.exec_driver_sql(f'PRAGMA foreign_key_list("{child}")')
            fk = [tuple(r) for r in listed if r[0] == fk_id]
            action, columns = fk[0][6], [r[3] for r in fk]
            t = table(child, column("rowid"), *(column(c) for c in columns))
            if action == "CASCADE":
                await conn.execute(delete(t).where(t.c.rowid.in_(rowids)))
            elif action == "SET NULL":
                await conn.execute(update(t).where(t.c.rowid.in_(rowids)).values(dict.fromkeys(columns)))
            else:
                raise BackupError(f"restored rows of table {child} refer to rows that do not exist")


def _blob_files(root: Path) -> set[Path]:
    if not root.exists():
        return set()
    return {p for p in root.glob("*/*") if p.is_file() and _BLOB.fullmatch(f"blobs/{p.parent.name}/{p.name}")}


class _Applier:
    """Pass 2: inserts rows, re-applies the ledger, writes surviving blobs, checking every hash."""

    def __init__(
        self,
        *,
        conn: AsyncConnection,
        services: Any,
        verified: Verified,
        erased_keys: dict[str, str],
        upgrade_to: str | None,
    ) -> None:
        self.conn = conn
        self.upgrade_to = upgrade_to
        self.services = services
        self.v = verified
        self.erased_keys = erased_keys
        self.expected = verified.members
        self.columns = verified.columns
        self.tables = {name: _insert_table(name, cols) for name, cols in self.columns.items()}
        self.index = 0
        self.rows: dict[str, int] = dict.fromkeys(self.columns, 0)
        self.destroyed_on_insert = 0
        self.tables_done = False
        self.survivors: set[str] = set()
        self.reapplied: dict[str, int] = {}
        self.quiesced: dict[str, int] = {}
        self.kek_refs: set[str] = set()
        self.written: list[Path] = []
        self.blobs = 0
        self.ledger_entries = 0
        self._name = ""
        self._hash = hashlib.sha256()
        self._buf: bytearray | None = None
        self._fh: Any = None
        self._part: Path | None = None
        self._final: Path | None = None

    async def on(self, ev: Event) -> None:
        if isinstance(ev, Begin):
            await self._begin(ev)
        elif isinstance(ev, Data):
            self._hash.update(ev.data)
            if self._buf is not None:
                self._buf += ev.data
            elif self._fh is not None:
                await asyncio.to_thread(self._fh.write, ev.data)
        else:
            await self._end()

    async def _begin(self, ev: Begin) -> None:
        if self.index >= len(self.expected) or self.expected[self.index].name != ev.name:
            raise BackupError("the backup changed while it was being restored")
        self._name, self._hash, self._buf, self._fh = ev.name, hashlib.sha256(), None, None
        table = _TABLE_PART.fullmatch(ev.name)
        if not table and ev.name != HEADER and not self.tables_done:
            await self._after_tables()
        if table or ev.name in (HEADER, KEYRING, MANIFEST):
            self._buf = bytearray()
            return
        blob = _BLOB.fullmatch(ev.name)
        assert blob is not None
        if blob.group(2) in self.survivors:
            final = self.services.blobs.root / blob.group(1) / blob.group(2)
            if final.exists():
                return  # the same blob (names are random 128-bit): restoring into its own instance
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._final, self._part = final, final.with_suffix(".part")
            fd = os.open(self._part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            self._fh = os.fdopen(fd, "wb")

    async def _end(self) -> None:
        want = self.expected[self.index]
        self.index += 1
        data = bytes(self._buf) if self._buf is not None else b""
        ok = self._hash.hexdigest() == want.sha256
        if self._fh is not None:
            fh, part, final = self._fh, self._part, self._final
            self._fh = None
            assert part is not None and final is not None
            await asyncio.to_thread(_close_durable, fh)
            if not ok:
                part.unlink(missing_ok=True)
            else:
                os.replace(part, final)
                self.written.append(final)
                self.blobs += 1
        if not ok:
            raise BackupError("the backup changed while it was being restored")
        table = _TABLE_PART.fullmatch(self._name)
        if table:
            await self._insert(table.group(1), data)

    async def _insert(self, name: str, data: bytes) -> None:
        cols = self.columns[name]
        names = [c for c, _ in cols]
        # PostgreSQL takes rows through COPY on the same connection (about 10x faster than INSERT
        # batches); asyncpg wants JSON columns as their text there, which is what the dump holds.
        copy = self.conn.dialect.name == "postgresql"
        decode = _codec(_DECODE_COPY if copy else _DECODE, [k for _, k in cols])
        wrapped_at = names.index("wrapped") if name == "data_keys" else -1
        lines = data.splitlines()
        for first in range(0, len(lines), INSERT_BATCH):
            try:
                batch = [decode(json.loads(ln)) for ln in lines[first : first + INSERT_BATCH]]
            except (ValueError, TypeError):
                raise BackupError(f"a row of table {name} in the backup is malformed") from None
            if wrapped_at >= 0:
                self._destroy_erased_keys(names, batch)
            try:
                if copy:
                    raw = (await self.conn.get_raw_connection()).driver_connection
                    assert raw is not None
                    await raw.copy_records_to_table(name, columns=names, records=batch)
                else:
                    rows = [dict(zip(names, values, strict=True)) for values in batch]
                    await self.conn.execute(insert(self.tables[name]), rows)
            except (DBAPIError, asyncpg.PostgresError):
                raise BackupError(f"the target database refused rows of table {name}") from None
        self.rows[name] += len(lines)

    def _destroy_erased_keys(self, names: list[str], batch: list[list[Any]]) -> None:
        """Data keys erased after this backup: their wrapped key never reaches the target's storage."""
        at = {c: names.index(c) for c in ("id", "wrapped", "destroyed_at")}
        for values in batch:
            erased = self.erased_keys.get(values[at["id"]])
            if erased is not None and values[at["wrapped"]] is not None:
                values[at["wrapped"]] = None
                values[at["destroyed_at"]] = values[at["destroyed_at"]] or datetime.fromisoformat(erased)
                self.destroyed_on_insert += 1

    async def _after_tables(self) -> None:
        """All rows are in: migrate them to this pforte's schema, erase again what the ledger names,
        then see which blob files and KEKs are still needed."""
        self.tables_done = True
        if self.upgrade_to is not None:
            await self.conn.run_sync(_upgrade_in, self.services.db.url, self.upgrade_to)
        entries = self.services.ledger.read()
        self.ledger_entries = len(entries)
        self.reapplied = await deletion.reapply(self.conn, self.services.eraser, entries)
        if self.upgrade_to is not None and self.conn.dialect.name == "sqlite":
            await _finish_cascades(self.conn)
        if self.destroyed_on_insert:
            self.reapplied["data_key"] = self.reapplied.get("data_key", 0) + self.destroyed_on_insert
        self.quiesced = await _quiesce(self.conn)
        att = table("attachments", column("blob_name"))
        q = select(att.c.blob_name).where(att.c.blob_name.is_not(None))
        self.survivors = {str(n) for n in (await self.conn.execute(q)).scalars()}
        orgs = table("organisations", column("kek_id"))
        keys = table("data_keys", column("kek_id"), column("wrapped"))
        refs = union(select(orgs.c.kek_id), select(keys.c.kek_id).where(keys.c.wrapped.is_not(None)))
        self.kek_refs = {str(k) for k in (await self.conn.execute(refs)).scalars()}

    def discard_written(self) -> None:
        """Remove the blob files this restore wrote (after a rollback)."""
        if self._fh is not None:
            self._fh.close()
            if self._part is not None:
                self._part.unlink(missing_ok=True)
        for path in self.written:
            path.unlink(missing_ok=True)


async def _quiesce(conn: AsyncConnection) -> dict[str, int]:
    """What a restored instance must not simply resume.

    * Staff sessions: everyone logs in again (a session of the backup's time is not proof of today).
    * Messages that were waiting to be sent when the backup was taken may have gone out since: they
      are put up for review (resend or mark as not sent), never sent again automatically.
    """
    from pforte.conversations.models import Message
    from pforte.outbox.models import Job
    from pforte.staff.models import StaffSession

    sessions = await conn.execute(delete(StaffSession))
    waiting = select(Job.id).where(Job.kind == "send_message", Job.state.in_(("queued", "running")))
    jobs = await conn.execute(update(Job).where(Job.id.in_(waiting)).values(state="review", locked_by=None))
    msgs = await conn.execute(
        update(Message)
        .where(Message.direction == "out", Message.status.in_(("queued", "sending")))
        .values(status="review", review_reason="restored_from_backup")
    )
    return {
        "sessions_ended": int(getattr(sessions, "rowcount", 0) or 0),
        "send_jobs_to_review": int(getattr(jobs, "rowcount", 0) or 0),
        "messages_to_review": int(getattr(msgs, "rowcount", 0) or 0),
    }


def _close_durable(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()


async def restore(
    services: Any, path: Path, identities: list[x25519.Identity], *, force: bool = False
) -> Restored:
    """Restore a backup into this instance (see the module's essay for the order of steps)."""
    db: Database = services.db
    url = db.url
    revisions = known_revisions()
    provider: KeyProvider = services.keys.provider
    verified = await verify(path, identities, target_ring=read_keyring(provider))

    if db.dialect == "sqlite" and ":///" in url:  # a fresh instance: its data directory may not exist yet
        Path(url.split(":///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
    async with db.engine.connect() as conn:
        current = await current_revision(conn)
        has_history = await target_has_history(conn)
        existing_tables = await conn.run_sync(_names)
    if has_history and not force:
        raise BackupError("the target database is not empty; restore into an empty one or add --force")
    if current is None and existing_tables:
        raise BackupError("the target database has tables but no pforte schema version; use an empty one")
    if current is not None and current not in revisions:
        raise BackupError(f"the target database is at schema {current}, newer than this pforte knows")
    want = verified.revision
    if current != want:
        down = current is not None and revisions.index(current) > revisions.index(want)
        await db.dispose()  # no pooled connection may hold the schema while it changes
        await asyncio.to_thread(_migrate, url, want, down=down)
    async with db.engine.connect() as conn:
        target = await conn.run_sync(_reflect)
    if {t.name: {c.name for c in t.columns} for t in target} != {
        name: {c for c, _ in cols} for name, cols in verified.columns.items()
    }:
        raise BackupError(f"the target's schema does not match the backup's (both claim revision {want})")

    erased_keys = {e.id: e.at for e in services.ledger.read() if e.kind == "data_key"}
    upgrade_to = revisions[-1] if want != revisions[-1] else None
    blobs_before = _blob_files(services.blobs.root)
    applier: _Applier | None = None
    try:
        async with db.engine.begin() as conn:
            if db.dialect == "sqlite":
                # Rows erased again below are overwritten with zeros, not left in free pages.
                await conn.exec_driver_sql("PRAGMA secure_delete=ON")
                if upgrade_to is not None:
                    # Alembic rebuilds tables on SQLite; dropping the old copy with foreign keys on
                    # would cascade-delete the children. The pragma only works outside a transaction,
                    # which the sqlite3 module has not begun yet (no row was written on it).
                    await conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
                    if (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar():
                        raise BackupError("cannot switch off foreign keys for the schema upgrade")
            if has_history or existing_tables:
                for t in reversed(target):
                    await conn.execute(delete(t))
            applier = _Applier(
                conn=conn,
                services=services,
                verified=verified,
                erased_keys=erased_keys,
                upgrade_to=upgrade_to,
            )
            parser = TarParser()
            async for chunk in decrypt_chunks(path, identities):
                for ev in parser.feed(chunk):
                    await applier.on(ev)
            parser.close()
            if applier.index != len(applier.expected):
                raise BackupError("the backup changed while it was being restored")
            needed = {k: v for k, v in verified.keyring.items() if k in applier.kek_refs}
            added = await asyncio.to_thread(_import_keks, provider, needed)
            await audit.record(
                conn,
                org_id=None,
                actor=audit.CLI,
                action="backup.restore",
                now=services.clock.now(),
                object_kind="backup",
                details={
                    "schema": want,
                    "sha256": verified.sha256,
                    "backup_created_at": verified.header["created_at"],
                    "source_dialect": verified.header["source_dialect"],
                    "rows": sum(applier.rows.values()),
                    "blobs": applier.blobs,
                    "ledger_entries": applier.ledger_entries,
                    "reapplied": applier.reapplied,
                    "quiesced": applier.quiesced,
                    "keys_added": len(added),
                    "forced": bool(has_history),
                },
            )
            if db.dialect == "sqlite":
                await conn.exec_driver_sql("PRAGMA secure_delete=OFF")
    except BaseException:
        if applier is not None:
            applier.discard_written()
        raise
    finally:
        if db.dialect == "sqlite":
            await db.dispose()  # no pooled connection keeps this restore's pragmas
    assert applier is not None

    orphans = [p for p in blobs_before if p.name not in applier.survivors]
    for p in orphans:
        p.unlink(missing_ok=True)
    present = {p.name for p in _blob_files(services.blobs.root)}
    return Restored(
        revision=want,
        upgraded_to=applier.upgrade_to,
        rows=dict(applier.rows),
        blobs=applier.blobs,
        missing_blobs=len(applier.survivors - present),
        ledger_entries=applier.ledger_entries,
        reapplied=dict(applier.reapplied),
        keys_added=len(added),
        wiped=bool(has_history or existing_tables),
        orphans_removed=len(orphans),
        sha256=verified.sha256,
        quiesced=dict(applier.quiesced),
    )
