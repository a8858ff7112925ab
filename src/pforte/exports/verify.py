"""Checking a signed conversation export (DSK II.2, I.5): signature, key state, files, completeness.

An archive is trusted only as far as its signature reaches. The signature covers manifest.json;
the manifest names every other file by SHA-256 and size, and every message by its content hash and
part count. So the checks run in this order and each names what it found wrong:

1. **The archive.** A readable ZIP holding exactly manifest.json, signature.json and the files the
   manifest lists; an extra, missing or doubled name is a problem of its own.
2. **The signature** over manifest.json's exact bytes, either against this instance's key registry
   (:func:`pforte.crypto.signing.check`: unknown, revoked-before-signing, out-of-validity and
   another organisation's keys are refused, with the reason) or offline against a public key the
   checker trusts, in which case revocation and validity cannot be checked and the result says so.
   ``signed_at`` is not itself signed, so it must equal the manifest's signed ``created_at``.
3. **Every file** against the SHA-256 and size the manifest lists.
4. **Every message** in messages.json: its content hash recomputed (and each part's), the list
   equal to the manifest's, indexes 1..N without gaps or repeats, every split message with all its
   parts 1..y, and every included attachment present with the hashes its message lists.

The archive is untrusted input: nothing is extracted to disk, entries are read in memory with size
limits, and a malformed file is a named problem, never an exception.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from pforte.channels.base import decode_sha256
from pforte.conversations import parts as parts_policy
from pforte.crypto import signing
from pforte.exports.service import (
    ATTACHMENTS,
    FORMAT,
    MANIFEST,
    MESSAGES,
    MESSAGES_FORMAT,
    SIGNATURE,
    SIGNATURE_FORMAT,
    TRANSCRIPT,
    VERSION,
)
from pforte.staff.models import StaffUser

MAX_JSON_BYTES = 256 * 1024 * 1024  # manifest.json and messages.json are parsed in memory
MAX_TOTAL_BYTES = 16 * 1024 * 1024 * 1024  # all entries together, as the ZIP declares them
CHUNK = 1024 * 1024
# What reading a damaged or hostile archive can raise (zipfile raises several kinds besides BadZipFile).
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    struct.error,
    OSError,
    EOFError,
    ValueError,
    RuntimeError,
    NotImplementedError,
)


@dataclass
class Result:
    """The outcome: ``ok`` only without problems; ``notes`` say what could not be checked."""

    ok: bool
    problems: list[str]
    summary: str
    notes: list[str] = field(default_factory=list)
    messages: int = 0
    attachments: int = 0
    key_id: str | None = None
    fingerprint: str | None = None
    owner_id: str | None = None
    owner: str | None = None
    signed_at: datetime | None = None
    offline: bool = False

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form (times as ISO 8601)."""
        out = asdict(self)
        out["signed_at"] = self.signed_at.isoformat() if self.signed_at else None
        return out


class _Unusable(Exception):
    """A file is too broken to check further (the reason is already among the problems)."""


class _Check:
    """The state of one verification: the archive, what was found, what could not be checked."""

    def __init__(self, data: bytes) -> None:
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.data = data
        self.zf: zipfile.ZipFile | None = None
        self.names: set[str] = set()
        self.digests: dict[str, tuple[str, int]] = {}  # name -> (sha256, size), for files read

    def problem(self, text: str) -> None:
        """Record one problem (each at most once)."""
        if text not in self.problems:
            self.problems.append(text)

    # -- the archive --

    def open(self) -> bool:
        """Open the ZIP and list its names; False if it is not a ZIP at all."""
        try:
            self.zf = zipfile.ZipFile(io.BytesIO(self.data))
            infos = self.zf.infolist()
        except _ZIP_ERRORS:
            self.problem("the file is not a readable ZIP archive")
            return False
        counts = Counter(i.filename for i in infos)
        for name, n in sorted(counts.items()):
            if n > 1:
                self.problem(f"{name} appears {n} times in the archive")
        self.names = set(counts)
        if sum(i.file_size for i in infos) > MAX_TOTAL_BYTES:
            self.problem("the archive declares more content than a conversation export can hold")
            return False
        return True

    def read(self, name: str, limit: int = MAX_JSON_BYTES) -> bytes:
        """A whole entry (for JSON files), with its digest noted; _Unusable if it cannot be read."""
        assert self.zf is not None
        info = self.zf.getinfo(name)
        if info.file_size > limit:
            self.problem(f"{name} is larger than {limit // (1024 * 1024)} MiB and was not read")
            raise _Unusable(name)
        try:
            data = self.zf.read(info)
        except _ZIP_ERRORS as exc:
            self.problem(f"{name} cannot be read from the archive ({_why(exc)})")
            raise _Unusable(name) from None
        self.digests[name] = (hashlib.sha256(data).hexdigest(), len(data))
        return data

    def digest(self, name: str) -> tuple[str, int] | None:
        """SHA-256 and size of an entry, read in chunks; None (a problem noted) if unreadable."""
        if name in self.digests:
            return self.digests[name]
        assert self.zf is not None
        h, size = hashlib.sha256(), 0
        try:
            with self.zf.open(name) as fh:
                while chunk := fh.read(CHUNK):
                    h.update(chunk)
                    size += len(chunk)
        except _ZIP_ERRORS as exc:
            self.problem(f"{name} cannot be read from the archive ({_why(exc)})")
            return None
        self.digests[name] = (h.hexdigest(), size)
        return self.digests[name]

    def json(self, name: str) -> Any:
        """A JSON entry parsed; _Unusable (with a problem) if it is missing or not JSON."""
        if name not in self.names:
            self.problem(f"{name} is missing")
            raise _Unusable(name)
        raw = self.read(name)
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            self.problem(f"{name} is not valid JSON")
            raise _Unusable(name) from None


def _why(exc: BaseException) -> str:
    text = str(exc)
    return "bad CRC" if "CRC" in text else type(exc).__name__


def _ts(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    return dt if dt.tzinfo is not None else None


def _is_hex(value: Any, length: int) -> bool:
    if not isinstance(value, str) or len(value) != length:
        return False
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True


# -- the manifest and its files -------------------------------------------------------------------


def _manifest_files(c: _Check, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's file list by path; problems for a malformed list, missing or extra files."""
    listed: dict[str, dict[str, Any]] = {}
    entries = manifest.get("files")
    if not isinstance(entries, list):
        c.problem("manifest.json has no list of files")
        return listed
    for e in entries:
        if (
            not isinstance(e, dict)
            or not isinstance(e.get("path"), str)
            or not _is_hex(e.get("sha256"), 64)
            or not isinstance(e.get("size"), int)
        ):
            c.problem("manifest.json lists a file in an unexpected form")
            continue
        if e["path"] in listed or e["path"] in (MANIFEST, SIGNATURE):
            c.problem(f"manifest.json lists {e['path']} more than once or lists itself")
            continue
        listed[e["path"]] = e
    for required in (MESSAGES, TRANSCRIPT):
        if required not in listed:
            c.problem(f"manifest.json does not list {required}")
    for path in sorted(listed):
        if path not in (MESSAGES, TRANSCRIPT) and not path.startswith(ATTACHMENTS):
            c.problem(f"manifest.json lists {path}, which a conversation export does not contain")
    expected = {MANIFEST, SIGNATURE, *listed}
    for name in sorted(c.names - expected):
        c.problem(f"unexpected file {name} (not listed in the manifest)")
    for name in sorted(expected - c.names):
        if name not in (MANIFEST, SIGNATURE):  # those two are reported where they are read
            c.problem(f"{name} is missing (listed in the manifest)")
    return listed


def _check_files(c: _Check, listed: dict[str, dict[str, Any]]) -> None:
    """Every listed file present has the SHA-256 and size the manifest states."""
    for path, e in listed.items():
        if path not in c.names:
            continue
        found = c.digest(path)
        if found is None:
            continue
        sha, size = found
        if sha != e["sha256"]:
            c.problem(f"{path} does not match its SHA-256 in the manifest (the file was changed)")
        elif size != e["size"]:
            c.problem(f"{path} has {size} bytes, the manifest says {e['size']}")


# -- the signature ---------------------------------------------------------------------------------


@dataclass
class _Signed:
    ok: bool
    key_id: str | None = None
    fingerprint: str | None = None
    owner_id: str | None = None
    owner: str | None = None  # the owner's e-mail address, if the account still exists
    signed_at: datetime | None = None


async def _check_signature(
    c: _Check,
    manifest: dict[str, Any],
    manifest_bytes: bytes,
    registry: AsyncSession | AsyncConnection | None,
    public_key_hex: str | None,
) -> _Signed:
    if SIGNATURE not in c.names:
        c.problem(f"{SIGNATURE} is missing: the export is not signed")
        return _Signed(False)
    try:
        sig = c.json(SIGNATURE)
    except _Unusable:
        return _Signed(False)
    if not isinstance(sig, dict):
        c.problem(f"{SIGNATURE} is not in the expected form")
        return _Signed(False)
    key_id, fp, signed_at = sig.get("key_id"), sig.get("fingerprint"), _ts(sig.get("signed_at"))
    sig_hex = sig.get("signature")
    out = _Signed(False, key_id if isinstance(key_id, str) else None, fp if isinstance(fp, str) else None)
    out.signed_at = signed_at
    if sig.get("format") != SIGNATURE_FORMAT:
        c.problem(f"{SIGNATURE}: unknown format {sig.get('format')!r}")
    if sig.get("algorithm") != signing.ALGORITHM:
        c.problem(f"{SIGNATURE}: unsupported algorithm {sig.get('algorithm')!r} (expected ed25519)")
        return out
    if sig.get("signed_file") != MANIFEST:
        c.problem(f"{SIGNATURE} signs {sig.get('signed_file')!r}, not {MANIFEST}")
        return out
    public = sig.get("public_key")
    if not _is_hex(public, 64) or signing.fingerprint_of(bytes.fromhex(str(public))) != fp:
        c.problem(f"{SIGNATURE}: its public key and fingerprint do not belong together")
    if not isinstance(key_id, str) or not _is_hex(sig_hex, 128) or signed_at is None:
        c.problem(f"{SIGNATURE} lacks a key id, a signature or a signing time")
        return out
    assert isinstance(sig_hex, str)
    created = _ts(manifest.get("created_at"))
    if created is None:
        c.problem(f"{MANIFEST} has no creation time")
        return out
    if signed_at != created:
        c.problem(f"{SIGNATURE}: signed_at differs from the manifest's (signed) created_at")
    # Judged at the signed time: signature.json's own signed_at is not covered by the signature.
    out.signed_at = signed_at = created
    claimed = manifest.get("signed_by")
    if not isinstance(claimed, dict) or claimed.get("key_id") != key_id or claimed.get("fingerprint") != fp:
        c.problem(f"{SIGNATURE} names another key than the manifest's signed_by")
    if public_key_hex is not None:
        if public != public_key_hex:
            c.problem(f"{SIGNATURE} names another public key than the given one")
        if not signing.signature_matches(public_key_hex, manifest_bytes, sig_hex):
            c.problem(
                "the signature over manifest.json does not match the given public key "
                f"{signing.fingerprint_of(bytes.fromhex(public_key_hex))[:16]}"
            )
            return out
        out.ok = True
        out.fingerprint = signing.fingerprint_of(bytes.fromhex(public_key_hex))
        c.notes.append(
            "checked offline against the given public key: whether the key was revoked or valid at "
            "the signing time could not be checked"
        )
        return out
    assert registry is not None
    verdict = await signing.check(
        registry, key_id=key_id, data=manifest_bytes, signature_hex=sig_hex, signed_at=signed_at
    )
    key = verdict.key
    if key is not None:
        out.fingerprint, out.owner_id = key.fingerprint, key.created_by
        if key.created_by:  # shown like ``pforte keys signing list`` does: by e-mail
            found = await registry.execute(select(StaffUser.email).where(StaffUser.id == key.created_by))
            out.owner = found.scalar_one_or_none()
    if not verdict.ok:
        c.problem(f"signature refused: {verdict.reason}")
        return out
    assert key is not None
    if key.org_id != manifest.get("organisation_id"):
        c.problem("signature refused: the key belongs to another organisation than the export")
        return out
    if fp != key.fingerprint or public != key.public_key:
        c.problem(f"{SIGNATURE} states a fingerprint or public key that is not the key's")
    if key.revoked_at is not None:
        c.notes.append(
            f"key {key.fingerprint[:16]} was revoked on {key.revoked_at:%Y-%m-%d %H:%M} UTC "
            f"({key.revoked_reason}); this export was signed before that and stays valid"
        )
    out.ok = True
    return out


# -- messages.json ---------------------------------------------------------------------------------


def _recomputed(direction: Any, type_: Any, text: Any, details: Any, media: list[Any]) -> str:
    return parts_policy.content_hash(
        direction=direction, type_=type_, body=text, details=details or {}, media=media
    )


def _check_attachments(
    c: _Check, label: str, msg: dict[str, Any], listed: dict[str, dict[str, Any]], used: set[str]
) -> int:
    """Every included file of a message present, with the hashes the message lists; returns how many."""
    included = 0
    for a in msg["attachments"]:
        aid = a["id"]
        if a["state"] != "included":
            continue
        path = a["path"]
        if not isinstance(path, str) or not path.startswith(ATTACHMENTS):
            c.problem(f"{label}: attachment {aid} has no path inside the archive")
            continue
        included += 1
        used.add(path)
        if path not in listed:
            c.problem(f"{label}: attachment {aid} ({path}) is not listed in the manifest")
        if path not in c.names:
            c.problem(f"{label}: attachment {aid} ({path}) is missing from the archive")
            continue
        found = c.digest(path)
        if found is None:
            continue
        sha, size = found
        if sha != a["sha256"] or size != a["size"]:
            c.problem(f"{label}: attachment {aid} ({path}) does not match its SHA-256 and size")
        declared = decode_sha256(a.get("media_sha256"))
        if declared is not None and declared.hex() != sha:
            c.problem(f"{label}: attachment {aid} ({path}) does not match the SHA-256 its message declared")
    return included


def _check_message(
    c: _Check, msg: dict[str, Any], label: str, listed: dict[str, dict[str, Any]], used: set[str]
) -> tuple[int, bool]:
    """Hashes, parts and files of one message; returns (files included, hash not recomputable)."""
    media = [(a["media_sha256"], a["file_name"]) for a in msg["attachments"]]
    unrecomputable = msg["hash_check"] == "file_deleted"
    if not unrecomputable:
        again = _recomputed(msg["direction"], msg["type"], msg["text"], msg["details"], media)
        if again != msg["sha256"]:
            c.problem(f"{label}: its content does not match its SHA-256 (the message was changed)")
    count = msg["part_count"]
    msg_parts = msg["parts"] or []
    if count is None:
        if msg_parts:
            c.problem(f"{label}: lists parts but is not a split message")
    else:
        if not isinstance(count, int) or count < 2:
            c.problem(f"{label}: the part count {count!r} is not a number of parts")
        else:
            seen = Counter(p["index"] for p in msg_parts)
            for i in range(1, count + 1):
                if seen[i] == 0:
                    c.problem(f"{label}: part {i} of {count} is missing")
                elif seen[i] > 1:
                    c.problem(f"{label}: part {i} of {count} appears {seen[i]} times")
            for i in sorted(k for k in seen if not (isinstance(k, int) and 1 <= k <= count)):
                c.problem(f"{label}: part {i!r} is outside 1..{count}")
        for p in msg_parts:
            plabel = f"{label}, part {p['index']}"
            if p["of"] != count:
                c.problem(f"{plabel}: says it is one of {p['of']}, the message has {count}")
            again = _recomputed(msg["direction"], p["type"], p["text"], None, [])
            if again != p["sha256"]:
                c.problem(f"{plabel}: its content does not match its SHA-256 (the part was changed)")
    return _check_attachments(c, label, msg, listed, used), unrecomputable


def _check_messages(
    c: _Check, manifest: dict[str, Any], listed: dict[str, dict[str, Any]]
) -> tuple[int, int]:
    """messages.json against the manifest; returns (messages, attachment files)."""
    if MESSAGES not in c.names:
        return 0, 0
    try:
        doc = c.json(MESSAGES)
    except _Unusable:
        return 0, 0
    if not isinstance(doc, dict) or not isinstance(doc.get("messages"), list):
        c.problem(f"{MESSAGES} is not in the expected form")
        return 0, 0
    if doc.get("format") != MESSAGES_FORMAT:
        c.problem(f"{MESSAGES}: unknown format {doc.get('format')!r}")
    for key in ("organisation_id", "conversation_id", "contact_id", "range"):
        if doc.get(key) != manifest.get(key):
            c.problem(f"{MESSAGES}: {key} differs from the manifest")
    total = manifest.get("message_count")
    if not isinstance(total, int) or total < 0:
        c.problem("manifest.json has no message count")
        return 0, 0
    if doc.get("count") != total:
        c.problem(f"{MESSAGES} says {doc.get('count')!r} messages, the manifest {total}")
    msgs: list[Any] = doc["messages"]
    by_index: dict[int, dict[str, Any]] = {}
    files = unrecomputable = 0
    used: set[str] = set()
    for pos, msg in enumerate(msgs, start=1):
        try:
            index = msg["index"]
            label = f"message {index} of {total}"
            if not isinstance(index, int) or not 1 <= index <= total:
                c.problem(f"message entry {pos} has index {index!r}, outside 1..{total}")
                continue
            if index in by_index:
                c.problem(f"{label} appears more than once")
                continue
            by_index[index] = msg
            if msg["of"] != total:
                c.problem(f"{label} says it is one of {msg['of']!r}")
            n, skipped = _check_message(c, msg, label, listed, used)
            files += n
            unrecomputable += skipped
        except (KeyError, TypeError, ValueError, AttributeError):
            c.problem(f"message entry {pos} of {MESSAGES} is not in the expected form")
    missing = [i for i in range(1, total + 1) if i not in by_index]
    for i in missing:
        c.problem(f"message {i} of {total} is missing (a gap in the numbering)")
    if len(msgs) != total and not missing:
        c.problem(f"{MESSAGES} holds {len(msgs)} messages, the manifest {total}")
    _against_manifest(c, manifest, by_index, total)
    for path in sorted(p for p in listed if p.startswith(ATTACHMENTS) and p not in used):
        c.problem(f"{path} belongs to no message")
    if unrecomputable:
        c.notes.append(
            f"{unrecomputable} message(s) had a file deleted before the export; their content hashes "
            "are as stored and could not be recomputed"
        )
    return total, files


def _against_manifest(c: _Check, manifest: dict[str, Any], by_index: dict[int, Any], total: int) -> None:
    """The manifest's (signed) list of messages equals messages.json's, message by message."""
    entries = manifest.get("messages")
    if not isinstance(entries, list):
        c.problem("manifest.json has no list of messages")
        return
    if len(entries) != total:
        c.problem(f"manifest.json lists {len(entries)} messages but counts {total}")
    for i, e in enumerate(entries, start=1):
        if not isinstance(e, dict) or e.get("index") != i:
            c.problem(f"manifest.json: its list of messages is out of order at position {i}")
            return
        msg = by_index.get(i)
        if msg is None:
            continue  # reported as a gap
        try:
            if (msg["id"], msg["sha256"], msg["part_count"]) != (
                e.get("id"),
                e.get("sha256"),
                e.get("parts"),
            ):
                c.problem(f"message {i} of {total} differs from the manifest's list (id, hash or parts)")
        except (KeyError, TypeError):
            continue  # reported as malformed


# -- the whole check -------------------------------------------------------------------------------


async def verify(
    data: bytes,
    *,
    registry: AsyncSession | AsyncConnection | None = None,
    public_key_hex: str | None = None,
) -> Result:
    """Check an export against this instance's key registry or, offline, a trusted public key."""
    if (registry is None) == (public_key_hex is None):
        raise ValueError("give exactly one of registry or public_key_hex")
    if public_key_hex is not None:
        public_key_hex = public_key_hex.strip().lower()
        if not _is_hex(public_key_hex, 64):
            raise ValueError("the public key must be 64 hexadecimal characters (a raw Ed25519 key)")
    c = _Check(data)
    offline = public_key_hex is not None
    if not c.open():
        return _result(c, _Signed(False), 0, 0, offline)
    try:
        manifest = c.json(MANIFEST)
        if not isinstance(manifest, dict):
            c.problem(f"{MANIFEST} is not in the expected form")
            raise _Unusable(MANIFEST)
    except _Unusable:
        c.problem("without a readable manifest nothing else can be checked")
        return _result(c, _Signed(False), 0, 0, offline)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        c.problem(f"{MANIFEST}: not a {FORMAT} version {VERSION} manifest")
    manifest_bytes = c.read(MANIFEST)
    signed = await _check_signature(c, manifest, manifest_bytes, registry, public_key_hex)
    listed = _manifest_files(c, manifest)
    _check_files(c, listed)
    n_msgs, n_files = _check_messages(c, manifest, listed)
    return _result(c, signed, n_msgs, n_files, offline)


def _result(c: _Check, signed: _Signed, messages: int, files: int, offline: bool) -> Result:
    ok = not c.problems and signed.ok
    if ok:
        assert signed.fingerprint is not None and signed.signed_at is not None
        by = (
            f"the given key {signed.fingerprint[:16]}"
            if offline
            else f"key {signed.fingerprint[:16]} (owner {signed.owner or signed.owner_id or 'unknown'})"
        )
        summary = (
            f"valid: {messages} messages, {files} attachments, signed by {by} on "
            f"{signed.signed_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC"
        )
        if offline:
            summary += " (revocation not checked)"
    else:
        summary = f"invalid: {len(c.problems)} problem{'s' if len(c.problems) != 1 else ''} found"
    return Result(
        ok=ok,
        problems=list(c.problems),
        summary=summary,
        notes=list(c.notes),
        messages=messages,
        attachments=files,
        key_id=signed.key_id,
        fingerprint=signed.fingerprint,
        owner_id=signed.owner_id,
        owner=signed.owner,
        signed_at=signed.signed_at,
        offline=offline,
    )
