"""Backup and restore of a ~1 GB instance: time, throughput and peak memory of the real commands.

    .venv/bin/python bench/backup.py --db sqlite --mb 1024 --messages 300000
    .venv/bin/python bench/backup.py --db postgresql --mb 256 --messages 100000

Builds an instance in a fresh data directory (SQLite file or throwaway PostgreSQL database):
organisation and channel through the CLI, then contacts with their own data keys, one conversation
each, encrypted messages of realistic length (Core bulk inserts with pforte's own key service and
field cipher) and image attachments of ``--blob-kb`` random bytes written through the real
``BlobStore`` until ``--mb`` of blobs exist. Then runs, each as its own process so its peak RSS is
its own (``wait4``): ``pforte backup create``, ``pforte backup verify`` and ``pforte backup restore``
into a second fresh instance, and checks the restored row and blob counts.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from common import PFORTE, PG_ADMIN, base_args, emit, machine
from inbox_pages import bulk_insert, texts

PNID = "100000000000991"


def pforte(env: dict[str, str], *args: str) -> dict[str, Any]:
    """Run a pforte command; its wall time, peak RSS and output (fails loudly on a non-zero exit)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([PFORTE, *args], env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"pforte {' '.join(args[:2])} failed: {stderr.strip()[-2000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "stdout": stdout}


class Instance:
    """A data directory and a database (SQLite file or a new PostgreSQL database)."""

    def __init__(self, db: str, root: Path, name: str) -> None:
        self.data = root / name
        self.pg_name: str | None = None
        self.env = {**os.environ, "PFORTE_DATA_DIR": str(self.data), "PFORTE_LOG_LEVEL": "WARNING"}
        if db == "postgresql":
            self.pg_name = f"pforte_bench_{name}_{os.urandom(4).hex()}"
            subprocess.run([*PG_ADMIN, f'CREATE DATABASE "{self.pg_name}"'], check=True)
            self.env["PFORTE_DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:5432/{self.pg_name}"

    def services(self) -> Any:
        from pforte.bootstrap import build_services
        from pforte.config import Settings

        url = self.env.get("PFORTE_DATABASE_URL")
        return build_services(Settings(data_dir=self.data, database_url=url, run_workers=False))

    def database_bytes(self) -> int:
        """Size of the database on disk."""
        if self.pg_name is None:
            return sum(p.stat().st_size for p in self.data.glob("pforte.sqlite3*"))
        out = subprocess.run(
            [*PG_ADMIN[:-1], "-tAc", f"select pg_database_size('{self.pg_name}')"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return int(out.strip())

    def close(self) -> None:
        if self.pg_name:
            subprocess.run(
                [*PG_ADMIN, f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)'],
                check=False,
                capture_output=True,
            )


async def seed(sv: Any, *, contacts: int, messages: int, mb: int, blob_kb: int) -> dict[str, Any]:
    """Bulk-insert contacts, keys, conversations, messages and attachments with their blob files."""
    from sqlalchemy import select

    from pforte.channels.models import Channel
    from pforte.contacts.models import Contact
    from pforte.conversations.models import Attachment, Conversation, Message
    from pforte.crypto.blind_index import blind_index
    from pforte.crypto.envelope import FieldCipher
    from pforte.crypto.models import DataKey
    from pforte.db import new_id, table_of
    from pforte.orgs.models import Organisation

    DK, C, CONV, M, ATT = (table_of(m) for m in (DataKey, Contact, Conversation, Message, Attachment))
    rng = random.Random(3)
    bodies = texts(rng)
    now = datetime.now(UTC)
    blobs_total = mb * 1024 // blob_kb
    per_conv = max(1, messages // contacts)
    step = max(1, 10_000 // per_conv)
    started = time.perf_counter()
    async with sv.db.engine.connect() as conn:
        org = (
            await conn.execute(select(Organisation.id, Organisation.kek_id, Organisation.index_key_id))
        ).one()
        channel_id = (await conn.execute(select(Channel.id))).scalar_one()
        ix_key = await sv.keys.raw_key(conn, org.index_key_id)
    n_msg = n_blob = blob_bytes = 0
    for first in range(0, contacts, step):
        rows: dict[Any, list[dict[str, Any]]] = {DK: [], C: [], CONV: [], M: [], ATT: []}
        for n in range(first, min(first + step, contacts)):
            key_row, key = sv.keys.new_data_key(org_id=org.id, kek_id=org.kek_id, purpose="contact", now=now)
            cipher = FieldCipher(key)
            cid, conv_id = new_id(), new_id()
            wa = f"4917{n:09d}"
            rows[DK].append(key_row)
            rows[C].append(
                {
                    "id": cid,
                    "org_id": org.id,
                    "dek_id": key_row["id"],
                    "bsuid_index": None,
                    "phone_index": blind_index(ix_key, "phone", wa),
                    "bsuid_enc": None,
                    "phone_enc": cipher.seal_text(wa, "contacts", "phone", cid),
                    "name_enc": None,
                    "profile_name_enc": cipher.seal_text(f"Patient {n}", "contacts", "profile_name", cid),
                    "username_enc": None,
                    "created_at": now,
                    "updated_at": now,
                }
            )
            t = now - timedelta(days=30)
            last_id = None
            for k in range(per_conv):
                mid = new_id()
                t += timedelta(minutes=3)
                n_msg += 1
                with_blob = (k == 0 and n_blob < blobs_total) or (k == 1 and n_blob < blobs_total - contacts)
                rows[M].append(
                    {
                        "id": mid,
                        "org_id": org.id,
                        "conversation_id": conv_id,
                        "channel_id": channel_id,
                        "contact_id": cid,
                        "direction": "in",
                        "type": "image" if with_blob else "text",
                        "external_id": f"wamid.backup{n_msg:012d}",
                        "status": "received",
                        "body_enc": cipher.seal_text(rng.choice(bodies), "messages", "body", mid),
                        "forwarded": False,
                        "provider_ts": t,
                        "created_at": t,
                    }
                )
                last_id = mid
                if with_blob:
                    aid = new_id()
                    data = os.urandom(blob_kb * 1024)
                    name = await asyncio.to_thread(sv.blobs.put, cipher=cipher, attachment_id=aid, data=data)
                    n_blob += 1
                    blob_bytes += len(data)
                    rows[ATT].append(
                        {
                            "id": aid,
                            "org_id": org.id,
                            "message_id": mid,
                            "contact_id": cid,
                            "kind": "image",
                            "media_id": f"media-{aid}",
                            "mime_type": "image/jpeg",
                            "expected_sha256": None,
                            "filename_enc": cipher.seal_text(f"foto-{n}.jpg", "attachments", "filename", aid),
                            "size": len(data),
                            "state": "stored",
                            "error_reason": None,
                            "attempts": 1,
                            "blob_name": name,
                            "created_at": t,
                        }
                    )
            rows[CONV].append(
                {
                    "id": conv_id,
                    "org_id": org.id,
                    "contact_id": cid,
                    "channel_id": channel_id,
                    "status": "open",
                    "unread_count": 0,
                    "last_activity_at": t,
                    "last_inbound_at": t,
                    "last_message_id": last_id,
                    "created_at": now - timedelta(days=30),
                }
            )
        async with sv.db.engine.begin() as conn:
            for table in (DK, C, CONV, M, ATT):
                if rows[table]:
                    await bulk_insert(conn, table, rows[table])
    return {
        "contacts": contacts,
        "messages": n_msg,
        "blobs": n_blob,
        "blob_mb": round(blob_bytes / 1e6, 1),
        "seed_seconds": round(time.perf_counter() - started, 1),
    }


async def table_counts(sv: Any) -> dict[str, int]:
    """Rows of the big tables."""
    from sqlalchemy import text

    out = {}
    async with sv.db.engine.connect() as conn:
        for name in ("contacts", "messages", "attachments"):
            out[name] = (await conn.execute(text(f"SELECT count(*) FROM {name}"))).scalar_one()
    return out


def with_services(inst: Instance, fn: Any) -> Any:
    """Run ``fn(services)`` in a fresh event loop."""

    async def main() -> Any:
        sv = inst.services()
        try:
            return await fn(sv)
        finally:
            await sv.stop()

    return asyncio.run(main())


def run(db: str, mb: int, messages: int, contacts: int, blob_kb: int, keep: bool) -> dict[str, Any]:
    """Seed, back up, verify, restore; measure each step."""
    from pyrage import x25519

    root = Path(tempfile.mkdtemp(prefix="pforte-bench-backup-"))
    source, target = Instance(db, root, "source"), Instance(db, root, "target")
    try:
        pforte(source.env, "migrate")
        pforte(source.env, "org", "create", "--name", "Bench", "--slug", "bench")
        pforte(
            source.env,
            "channel",
            "add-whatsapp",
            "--org",
            "bench",
            "--name",
            "Station",
            "--phone-number-id",
            PNID,
            "--display-phone-number",
            "+49 30 991",
            "--access-token",
            "bench-token",
            "--app-secret",
            "bench-secret",
        )
        seeded = with_services(
            source,
            lambda sv: seed(sv, contacts=contacts, messages=messages, mb=mb, blob_kb=blob_kb),
        )
        identity = x25519.Identity.generate()
        key_file = root / "controller-key.txt"
        key_file.write_text(f"{identity}\n")
        key_file.chmod(0o600)
        pforte(source.env, "backup", "set-recipient", str(identity.to_public()))
        out = root / "backup.age"
        size_db = source.database_bytes()
        created = pforte(source.env, "backup", "create", "--out", str(out))
        size = out.stat().st_size
        verified = pforte(source.env, "backup", "verify", str(out), "--identity", str(key_file))
        restored = pforte(target.env, "backup", "restore", str(out), "--identity", str(key_file))
        want = with_services(source, table_counts)
        got = with_services(target, table_counts)
        blob_files = sum(1 for p in (target.data / "blobs").rglob("*") if p.is_file())
        if got != want or blob_files != seeded["blobs"]:
            raise RuntimeError(f"restore incomplete: {got} vs {want}, {blob_files} blob files")
        mb_size = size / 1e6

        def step(r: dict[str, Any]) -> dict[str, Any]:
            return {
                "seconds": r["seconds"],
                "mb_per_s": round(mb_size / r["seconds"], 1),
                "peak_rss_mb": r["peak_rss_mb"],
            }

        return {
            "scenario": "backup",
            "db": db,
            "machine": machine(),
            "seed": seeded,
            "database_mb": round(size_db / 1e6, 1),
            "backup_mb": round(mb_size, 1),
            "create": step(created),
            "verify": step(verified),
            "restore": step(restored),
            "restored_rows": got,
            "restored_blob_files": blob_files,
        }
    finally:
        source.close()
        target.close()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    args = base_args(
        mb={"type": int, "default": 1024, "help": "MB of attachment blobs"},
        messages={"type": int, "default": 300_000},
        contacts={"type": int, "default": 3_000},
        blob_kb={"type": int, "default": 1024, "help": "size of each attachment"},
        keep={"action": "store_true", "help": "keep the data directories (printed path)"},
    )
    emit(run(args.db, args.mb, args.messages, args.contacts, args.blob_kb, args.keep), args.json_out)
