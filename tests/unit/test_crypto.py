"""Envelope encryption, key wrapping, the key file and the blind index (DSK I.3b, I.9b)."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime

import pytest

from pforte.clock import FakeClock
from pforte.crypto.blind_index import blind_index, normalise_phone
from pforte.crypto.blobs import BlobStore
from pforte.crypto.envelope import FieldCipher, aad_for
from pforte.crypto.keys import FileKeyProvider, KeyService
from pforte.errors import ConfigError, CryptoError

KEY = bytes(range(32))


@pytest.mark.dsk("I.3b")
def test_seal_open_round_trip_and_fresh_nonces():
    c = FieldCipher(KEY)
    a = c.seal_text("Befund", "messages", "body", "m1")
    b = c.seal_text("Befund", "messages", "body", "m1")
    assert a != b  # random nonce
    assert c.open_text(a, "messages", "body", "m1") == "Befund"
    assert b"Befund" not in a


@pytest.mark.parametrize(
    "where", [("messages", "body", "m2"), ("messages", "details", "m1"), ("contacts", "body", "m1")]
)
def test_ciphertext_moved_to_another_row_column_or_table_fails(where):
    c = FieldCipher(KEY)
    sealed = c.seal_text("Befund", "messages", "body", "m1")
    with pytest.raises(CryptoError):
        c.open_text(sealed, *where)


def test_flipped_bit_and_wrong_key_fail():
    c = FieldCipher(KEY)
    sealed = bytearray(c.seal(b"x" * 40, aad_for("t", "c", "r")))
    sealed[20] ^= 1
    with pytest.raises(CryptoError):
        c.open(bytes(sealed), aad_for("t", "c", "r"))
    with pytest.raises(CryptoError):
        FieldCipher(bytes(32)).open(c.seal(b"x", b"a"), b"a")
    with pytest.raises(CryptoError):
        c.open(b"\x02" + bytes(40), b"a")


@pytest.mark.dsk("I.9b")
def test_key_file_is_0600_in_0700_dir_and_survives_reload(tmp_path):
    path = tmp_path / "keys" / "ring.json"
    p = FileKeyProvider(path)
    kek_id = p.create_kek()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert FileKeyProvider(path).get_kek(kek_id) == p.get_kek(kek_id)
    assert "key" not in json.dumps(p.list_keks())


@pytest.mark.dsk("I.9b")
def test_key_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "ring.json"
    FileKeyProvider(path).create_kek()
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        FileKeyProvider(path)


def test_a_kek_created_by_another_process_is_found(tmp_path):
    path = tmp_path / "ring.json"
    mine, other = FileKeyProvider(path), FileKeyProvider(path)
    kek = other.create_kek()
    assert mine.get_kek(kek) == other.get_kek(kek)
    with pytest.raises(CryptoError):
        mine.get_kek("kek-unknown")


def test_data_keys_are_stored_wrapped_and_destroyed_keys_cannot_be_used(tmp_path):
    clock = FakeClock()
    ks = KeyService(FileKeyProvider(tmp_path / "r.json"), clock=clock)
    kek = ks.provider.create_kek()
    row, key = ks.new_data_key(org_id="o", kek_id=kek, purpose="contact", now=datetime.now(UTC))
    assert row["wrapped"] != key and len(row["wrapped"]) == 40
    assert ks.unwrap(kek_id=kek, wrapped=row["wrapped"]) == key
    with pytest.raises(CryptoError, match="destroyed"):
        ks.unwrap(kek_id=kek, wrapped=None)
    other = ks.provider.create_kek()
    with pytest.raises(CryptoError):
        ks.unwrap(kek_id=other, wrapped=row["wrapped"])


def test_dek_cache_expires(tmp_path):
    clock = FakeClock()
    ks = KeyService(FileKeyProvider(tmp_path / "r.json"), clock=clock, ttl=60)
    row, _ = ks.new_data_key(org_id="o", kek_id=ks.provider.create_kek(), purpose="contact", now=clock.now())
    assert ks._cached(row["id"]) is not None
    clock.advance(61)
    assert ks._cached(row["id"]) is None


@pytest.mark.dsk("I.3a")
def test_blind_index_normalises_phone_formats_and_is_keyed():
    a = blind_index(KEY, "phone", "+49 151 1234-5678")
    assert a == blind_index(KEY, "phone", "0049 15112345678") == blind_index(KEY, "phone", "4915112345678")
    assert a != blind_index(bytes(32), "phone", "4915112345678")
    assert a != blind_index(KEY, "bsuid", "4915112345678")
    assert normalise_phone("+49 (30) 123") == "4930123"
    assert "4915112345678" not in a


@pytest.mark.dsk("I.3b")
def test_blob_store_encrypts_and_binds_to_attachment(tmp_path):
    store = BlobStore(tmp_path)
    c = FieldCipher(KEY)
    name = store.put(cipher=c, attachment_id="a1", data=b"wound photo bytes")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 1 and b"wound photo" not in files[0].read_bytes()
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert store.get(cipher=c, attachment_id="a1", name=name) == b"wound photo bytes"
    with pytest.raises(CryptoError):
        store.get(cipher=c, attachment_id="a2", name=name)
    store.delete(name)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
