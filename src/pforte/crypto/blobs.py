"""Encrypted attachment files on disk.

A blob is written as ``<blob_dir>/<aa>/<blob name>`` where the content is AES-GCM ciphertext under
the contact's data key, bound to the attachment's id. Files are written to a temporary name and
renamed, so a crash never leaves a half-written blob under a real name.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pforte.crypto.envelope import FieldCipher, aad_for


class BlobStore:
    """Stores and reads encrypted blobs; knows nothing about the database."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, name: str) -> Path:
        return self.root / name[:2] / name

    def put(self, *, cipher: FieldCipher, attachment_id: str, data: bytes) -> str:
        """Encrypt and write; return the blob name to store on the attachment row."""
        name = secrets.token_hex(16)
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_suffix(".part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(cipher.seal(data, aad_for("attachments", "blob", attachment_id)))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return name

    def get(self, *, cipher: FieldCipher, attachment_id: str, name: str) -> bytes:
        """Read and decrypt a blob."""
        return cipher.open(self._path(name).read_bytes(), aad_for("attachments", "blob", attachment_id))

    def delete(self, name: str) -> None:
        """Remove a blob file if present."""
        self._path(name).unlink(missing_ok=True)
