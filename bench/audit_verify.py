"""``audit.verify`` over a chain of 1,000,000 entries with signed checkpoints: entries/s and peak memory.

    .venv/bin/python bench/audit_verify.py --db sqlite --entries 1000000
    .venv/bin/python bench/audit_verify.py --db postgresql --entries 1000000
    make bench-audit-verify

Sets up a fresh instance through the CLI (SQLite file or throwaway PostgreSQL database, an
organisation, an admin, a signing key), then appends ``--entries`` entries to the organisation's chain
directly: hashes computed in Python exactly as ``audit.service.record`` does, rows bulk-inserted
(COPY on PostgreSQL, Core executemany on SQLite), a checkpoint every ``--checkpoint-every`` entries
signed with the organisation's key, the head moved to the end; then ``ANALYZE``.

Each verification runs in a child process of its own, so the peak RSS it reports (``VmHWM``) is
verify's: the RSS after start-up (imports, engine) is reported beside it. The first run must
find the chain intact; the second runs after one entry near the end was edited in SQL and must name
it (so the walk really reaches the end). The CLI run (``pforte audit verify --org bench``) adds
process start-up and the chain listing.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from common import PFORTE, PG_ADMIN, PY, base_args, emit, machine, peak_rss_mb
from inbox_pages import bulk_insert

BATCH = 10_000


def pforte(env: dict[str, str], *args: str) -> dict[str, Any]:
    """Run a pforte command; wall time, peak RSS, exit status and output."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([PFORTE, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    return {
        "seconds": round(seconds, 2),
        "exit": proc.returncode,
        "stdout": out.decode(),
        "stderr": err.decode(),
    }


class Instance:
    """A data directory and a fresh database."""

    def __init__(self, db: str) -> None:
        self.data = Path(tempfile.mkdtemp(prefix="pforte-bench-audit-"))
        self.pg_name: str | None = None
        self.env = {**os.environ, "PFORTE_DATA_DIR": str(self.data), "PFORTE_LOG_LEVEL": "WARNING"}
        if db == "postgresql":
            self.pg_name = f"pforte_bench_audit_{secrets.token_hex(4)}"
            subprocess.run([*PG_ADMIN, f'CREATE DATABASE "{self.pg_name}"'], check=True)
            self.env["PFORTE_DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:5432/{self.pg_name}"

    def cli(self, *args: str) -> str:
        r = pforte(self.env, *args)
        if r["exit"] != 0:
            raise RuntimeError(f"pforte {' '.join(args[:3])} failed: {r['stderr'][-2000:]}")
        return str(r["stdout"])

    def settings(self) -> Any:
        from pforte.config import Settings

        return Settings(
            data_dir=self.data, database_url=self.env.get("PFORTE_DATABASE_URL"), run_workers=False
        )

    def database_mb(self) -> float:
        if self.pg_name is None:
            return round(sum(p.stat().st_size for p in self.data.glob("pforte.sqlite3*")) / 1e6, 1)
        out = subprocess.run(
            [*PG_ADMIN[:-1], "-tAc", f"select pg_database_size('{self.pg_name}')"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return round(int(out.strip()) / 1e6, 1)

    def close(self) -> None:
        if self.pg_name:
            subprocess.run(
                [*PG_ADMIN, f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)'],
                check=False,
                capture_output=True,
            )
        shutil.rmtree(self.data, ignore_errors=True)


async def seed(settings: Any, entries: int, every: int) -> dict[str, Any]:
    """Append ``entries`` chained entries to the bench organisation's chain, checkpoints included."""
    from sqlalchemy import select, text, update

    from pforte.audit import checkpoints
    from pforte.audit import service as audit
    from pforte.audit.models import AuditCheckpoint, AuditEvent, AuditHead
    from pforte.bootstrap import build_services
    from pforte.crypto import signing
    from pforte.db import new_id, table_of
    from pforte.orgs.models import Organisation

    AE, CP, H = table_of(AuditEvent), table_of(AuditCheckpoint), table_of(AuditHead)
    sv = build_services(settings)
    started = time.perf_counter()
    hashing = 0.0
    try:
        async with sv.db.engine.connect() as c:
            org_id = (await c.execute(select(Organisation.id))).scalar_one()
            seq, prev = (await c.execute(select(H.c.seq, H.c.hash).where(H.c.chain == org_id))).one()
            key = await signing.active_key(c, org_id, sv.clock.now())
        assert key is not None
        at = key.valid_from + timedelta(seconds=1)
        pg = sv.db.dialect == "postgresql"
        done = 0
        while done < entries:
            rows = []
            marks = []  # (seq, hash, time) of the entries a checkpoint signs
            t0 = time.perf_counter()
            for _ in range(min(BATCH, entries - done)):
                seq += 1
                done += 1
                at += timedelta(microseconds=997)
                e = {
                    "chain": org_id,
                    "seq": seq,
                    "at": at,
                    "org_id": org_id,
                    "actor_kind": "system",
                    "actor_id": None,
                    "action": "messages.receive",
                    "object_kind": "channel",
                    "object_id": "0190a4c3d9e57c2a8b1f6e3d4c5b6a79",
                    "details": {"messages": seq % 50, "statuses": seq % 7, "contacts_new": seq % 3},
                }
                digest = audit.chain_hash(prev, e)
                rows.append({"id": new_id(), "prev_hash": prev, "hash": digest, **e})
                prev = digest
                if seq % every == 0 or done == entries:
                    marks.append((seq, digest, at + timedelta(milliseconds=1)))
            hashing += time.perf_counter() - t0
            if pg:  # COPY wants the JSON column as text
                for r in rows:
                    r["details"] = json.dumps(r["details"])
            async with sv.db.engine.begin() as c:
                await bulk_insert(c, AE, rows)
                for cp_seq, cp_hash, cp_at in marks:
                    sig = await signing.sign(
                        c,
                        sv.keys,
                        org_id=org_id,
                        data=checkpoints.checkpoint_bytes(org_id, cp_seq, cp_hash, cp_at),
                        now=cp_at,
                    )
                    await c.execute(
                        CP.insert().values(
                            id=new_id(),
                            chain=org_id,
                            seq=cp_seq,
                            head_hash=cp_hash,
                            at=cp_at,
                            key_id=sig.key_id,
                            signature=sig.signature,
                        )
                    )
                await c.execute(update(H).where(H.c.chain == org_id).values(seq=seq, hash=prev))
        async with sv.db.engine.connect() as c:
            await c.execute(text("ANALYZE"))
            await c.commit()
            n_cp = len((await c.execute(select(CP.c.id).where(CP.c.chain == org_id))).all())
        return {
            "org_id": org_id,
            "entries": seq,
            "checkpoints": n_cp,
            "seconds": round(time.perf_counter() - started, 1),
            "hashing_seconds": round(hashing, 1),
        }
    finally:
        await sv.stop()


async def tamper(settings: Any, org_id: str, seq: int) -> None:
    """Edit one entry's action in place, as someone at a database prompt would."""
    from sqlalchemy import text

    from pforte.bootstrap import build_services

    sv = build_services(settings)
    try:
        async with sv.db.engine.begin() as c:
            await c.execute(
                text("UPDATE audit_events SET action = 'messages.send' WHERE chain = :c AND seq = :s"),
                {"c": org_id, "s": seq},
            )
    finally:
        await sv.stop()


def child(url: str, data_dir: str, chain: str) -> None:
    """In a process of its own: build services, then time ``audit.verify`` of one chain."""
    from pforte.audit import service as audit
    from pforte.bootstrap import build_services
    from pforte.config import Settings

    async def main() -> dict[str, Any]:
        sv = build_services(Settings(data_dir=Path(data_dir), database_url=url or None, run_workers=False))
        try:
            async with sv.db.engine.connect() as c:
                await c.exec_driver_sql("SELECT 1")  # connect before the baseline is taken
            base = peak_rss_mb(os.getpid())
            t0 = time.perf_counter()
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            async with sv.db.engine.connect() as c:
                r = await audit.verify(c, chain)
            took = time.perf_counter() - t0
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            return {
                "ok": r.ok,
                "entries": r.entries,
                "first_bad_seq": r.first_bad_seq,
                "kind": r.kind,
                "checkpoints_ok": r.checkpoints_ok,
                "seconds": round(took, 2),
                "entries_per_s": round(r.entries / took) if took else None,
                "cpu_share": round((cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / took, 2),
                "rss_after_start_mb": base,
                "peak_rss_mb": peak_rss_mb(os.getpid()),
            }
        finally:
            await sv.stop()

    print(json.dumps(asyncio.run(main())))


def verify_in_child(inst: Instance, chain: str) -> dict[str, Any]:
    """Run ``child`` and return what it printed."""
    out = subprocess.run(
        [PY, __file__, "--child", inst.env.get("PFORTE_DATABASE_URL", ""), str(inst.data), chain],
        env=inst.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def run(db: str, entries: int, every: int) -> dict[str, Any]:
    """Seed, verify intact, verify via the CLI, tamper, verify again."""
    inst = Instance(db)
    try:
        inst.cli("migrate")
        inst.cli("org", "create", "--name", "Bench", "--slug", "bench")
        env = {**inst.env, "PFORTE_NEW_PASSWORD": "bench-password-1234"}
        subprocess.run(
            [PFORTE, "user", "create", "--org", "bench", "--email", "dpo@bench.test", "--role", "admin"],
            env=env,
            check=True,
            capture_output=True,
        )
        inst.cli("keys", "signing", "create", "--org", "bench", "--owner", "dpo@bench.test")
        seeded = asyncio.run(seed(inst.settings(), entries, every))
        org_id = seeded["org_id"]
        intact = verify_in_child(inst, org_id)
        if not intact["ok"]:
            raise RuntimeError(f"the seeded chain did not verify: {intact}")
        cli = pforte(inst.env, "audit", "verify", "--org", "bench", "--json")
        if cli["exit"] != 0:
            raise RuntimeError(f"pforte audit verify failed: {cli['stdout'][-2000:]} {cli['stderr'][-2000:]}")
        victim = seeded["entries"] - 10
        asyncio.run(tamper(inst.settings(), org_id, victim))
        broken = verify_in_child(inst, org_id)
        if (broken["ok"], broken["first_bad_seq"], broken["kind"]) != (False, victim, "changed"):
            raise RuntimeError(f"the edited entry was not named: {broken}")
        return {
            "scenario": "audit_verify",
            "db": db,
            "machine": machine(),
            "seed": seeded,
            "database_mb": inst.database_mb(),
            "verify": intact,
            "cli_seconds": cli["seconds"],
            "tampered": {
                k: broken[k] for k in ("first_bad_seq", "kind", "seconds", "entries_per_s", "peak_rss_mb")
            },
        }
    finally:
        inst.close()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        sys.exit(0)
    args = base_args(
        entries={"type": int, "default": 1_000_000},
        checkpoint_every={"type": int, "default": 10_000},
    )
    emit(run(args.db, args.entries, args.checkpoint_every), args.json_out)
