"""The backup file: a tar stream encrypted with age, written and read without holding it in memory.

pyrage encrypts and decrypts in a worker thread and talks to Python file objects in small pieces
(8 KiB reads, 64 KiB writes), so the archive is never whole in memory: a bounded :class:`Pipe` of
byte chunks sits between the event loop (which reads the database) and pyrage's thread. The tar
framing is written and parsed here, push-style, because the reader is fed by pyrage rather than
pulling from a file: only plain regular-file members, which ``tar`` reads as usual
(``age -d -i key.txt backup.age | tar t``).

Nothing decrypted is ever written to disk by this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import tarfile
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyrage
from pyrage import x25519

from pforte.errors import PforteError

BLOCK = 512
RECORD = 20 * BLOCK
CHUNK = 1 << 20  # bytes handed across the pipe at a time
DEPTH = 8  # chunks the pipe holds before the producer waits
_RECIPIENT = re.compile(r"age1[02-9ac-hj-np-z]{58}")


class BackupError(PforteError):
    """A backup cannot be written, read or restored; the message says why in one line."""

    code = "backup"


# -- keys --------------------------------------------------------------------------------------------


def parse_recipient(text: str) -> x25519.Recipient:
    """An age X25519 public key (``age1…``); a secret key is refused without being echoed."""
    value = text.strip()
    if value.upper().startswith("AGE-SECRET-KEY-"):
        raise BackupError(
            "that is an age SECRET key; give its public key (age1…) and keep the secret key offline"
        )
    if not _RECIPIENT.fullmatch(value):
        raise BackupError("not an age X25519 public key (expected age1 followed by 58 characters)")
    try:
        return x25519.Recipient.from_str(value)
    except pyrage.RecipientError:
        raise BackupError("not a valid age X25519 public key (checksum does not match)") from None


def load_identities(path: Path) -> list[x25519.Identity]:
    """The age X25519 identities in a key file as ``age-keygen`` writes it (comments allowed)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise BackupError(f"identity file not found: {path}") from None
    except (OSError, UnicodeDecodeError):
        raise BackupError(f"identity file cannot be read: {path}") from None
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            out.append(x25519.Identity.from_str(line))
        except pyrage.IdentityError:
            raise BackupError(f"identity file {path} holds something that is not an age identity") from None
    if not out:
        raise BackupError(f"identity file {path} holds no age identity")
    return out


# -- tar framing -------------------------------------------------------------------------------------


def tar_header(name: str, size: int, mtime: int) -> bytes:
    """The 512-byte ustar header of a regular file."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o600
    info.type = tarfile.REGTYPE
    return info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


def tar_padding(size: int) -> bytes:
    """Zeros that bring a member's data to a whole block."""
    return b"\0" * (-size % BLOCK)


def tar_trailer(written: int) -> bytes:
    """The two zero blocks that end an archive, padded to a whole record as tar does."""
    total = written + 2 * BLOCK
    return b"\0" * (2 * BLOCK + (-total % RECORD))


@dataclass(frozen=True, slots=True)
class Begin:
    """A member starts."""

    name: str
    size: int


@dataclass(frozen=True, slots=True)
class Data:
    """Some of the current member's bytes."""

    data: bytes


@dataclass(frozen=True, slots=True)
class End:
    """The current member is complete."""

    name: str


Event = Begin | Data | End


class TarParser:
    """Push parser for the archives :func:`tar_header` writes: regular files only."""

    def __init__(self) -> None:
        self._header = bytearray()
        self._name = ""
        self._left = 0
        self._skip = 0
        self._zeros = 0
        self.ended = False

    def feed(self, chunk: bytes) -> list[Event]:
        """Parse the next bytes of the stream into events."""
        out: list[Event] = []
        view = memoryview(chunk)
        pos, size = 0, len(view)
        while pos < size:
            if self._left:
                n = min(self._left, size - pos)
                out.append(Data(bytes(view[pos : pos + n])))
                pos += n
                self._left -= n
                if not self._left:
                    out.append(End(self._name))
                continue
            if self._skip:
                n = min(self._skip, size - pos)
                pos += n
                self._skip -= n
                continue
            if self.ended:
                if any(view[pos:]):
                    raise BackupError("the archive has data after its end")
                break
            n = min(BLOCK - len(self._header), size - pos)
            self._header += view[pos : pos + n]
            pos += n
            if len(self._header) == BLOCK:
                out.extend(self._member(bytes(self._header)))
                self._header.clear()
        return out

    def _member(self, block: bytes) -> list[Event]:
        if not any(block):
            self._zeros += 1
            self.ended = self._zeros == 2
            return []
        if self._zeros:
            raise BackupError("the archive has a stray end marker")
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "strict")
        except (tarfile.HeaderError, UnicodeDecodeError):
            raise BackupError("the archive has a damaged member header") from None
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise BackupError("the archive holds something other than plain files")
        self._name, self._left, self._skip = info.name, info.size, -info.size % BLOCK
        if info.size == 0:
            return [Begin(info.name, 0), End(info.name)]
        return [Begin(info.name, info.size)]

    def close(self) -> None:
        """Fail unless the stream ended exactly at the end of the archive."""
        if not self.ended or self._left or self._header:
            raise BackupError("the archive is incomplete")


# -- the pipe between the event loop and pyrage's thread -------------------------------------------


class _Aborted(Exception):
    """The other side of the pipe has gone away."""


class Pipe:
    """A bounded, thread-safe queue of byte chunks with end-of-stream and error propagation."""

    def __init__(self, depth: int = DEPTH) -> None:
        self._chunks: deque[bytes] = deque()
        self._depth = depth
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self._aborted = False

    def try_put(self, chunk: bytes) -> bool:
        """Queue a chunk if there is room (never blocks)."""
        with self._cond:
            if self._aborted:
                raise _Aborted
            if len(self._chunks) >= self._depth:
                return False
            self._chunks.append(chunk)
            self._cond.notify_all()
            return True

    def put(self, chunk: bytes) -> None:
        """Queue a chunk, waiting while the pipe is full."""
        with self._cond:
            while len(self._chunks) >= self._depth and not self._aborted:
                self._cond.wait()
            if self._aborted:
                raise _Aborted
            self._chunks.append(chunk)
            self._cond.notify_all()

    def close(self, error: BaseException | None = None) -> None:
        """No more chunks; the reader gets ``error`` (if any) after the queued ones."""
        with self._cond:
            self._closed = True
            self._error = error
            self._cond.notify_all()

    def abort(self) -> None:
        """The reader stops; a waiting or later ``put`` raises, a waiting ``get`` ends."""
        with self._cond:
            self._aborted = True
            self._closed = True
            self._chunks.clear()
            self._cond.notify_all()

    def _take(self, wait: bool) -> bytes | None:
        with self._cond:
            while not self._chunks and not self._closed and wait:
                self._cond.wait()
            if self._chunks:
                chunk = self._chunks.popleft()
                self._cond.notify_all()
                return chunk
            if self._closed:
                if self._error is not None:
                    raise self._error
                return b""
            return None

    def get(self) -> bytes:
        """The next chunk, waiting for it; ``b""`` at the end of the stream."""
        chunk = self._take(wait=True)
        assert chunk is not None
        return chunk

    def try_get(self) -> bytes | None:
        """The next chunk if one is ready (``b""`` at the end), else None."""
        return self._take(wait=False)


class _PipeReader:
    """What pyrage reads from when encrypting: ``read(n)`` over the pipe's chunks."""

    def __init__(self, pipe: Pipe) -> None:
        self._pipe = pipe
        self._buf = memoryview(b"")

    def read(self, n: int = -1) -> bytes:
        if not self._buf:
            self._buf = memoryview(self._pipe.get())
            if not self._buf:
                return b""
        if n is None or n < 0:
            n = len(self._buf)
        out = bytes(self._buf[:n])
        self._buf = self._buf[n:]
        return out


class _PipeWriter:
    """What pyrage writes plaintext to when decrypting: collected into CHUNK-sized pieces."""

    def __init__(self, pipe: Pipe) -> None:
        self._pipe = pipe
        self._buf = bytearray()

    def write(self, data: Any) -> int:
        self._buf += data
        if len(self._buf) >= CHUNK:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buf:
            self._pipe.put(bytes(self._buf))
            self._buf.clear()


class _HashingReader:
    """The backup file as pyrage reads it, hashed on the way (to compare with ``create``'s sha256)."""

    def __init__(self, fh: Any, digest: Any) -> None:
        self._fh = fh
        self._digest = digest

    def read(self, n: int = -1) -> bytes:
        data: bytes = self._fh.read(n)
        self._digest.update(data)
        return data


class _HashingWriter:
    """The output file, counting and hashing the ciphertext as it is written."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self.size = 0
        self.sha256 = hashlib.sha256()

    def write(self, data: Any) -> int:
        self._fh.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self._fh.flush()


# -- encrypt / decrypt -----------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def encrypt_to(
    path: Path, chunks: AsyncIterator[bytes], recipients: list[x25519.Recipient]
) -> tuple[int, str]:
    """Encrypt a stream of chunks into ``path`` (via ``path.tmp``, mode 0600); (size, sha256)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise BackupError(f"cannot write {tmp}: {exc.strerror}") from None
    os.fchmod(fd, 0o600)
    fh = os.fdopen(fd, "wb", buffering=CHUNK)
    out = _HashingWriter(fh)
    pipe = Pipe()

    def _encrypt() -> None:
        try:
            pyrage.encrypt_io(_PipeReader(pipe), out, recipients)
        finally:
            pipe.abort()

    worker = asyncio.ensure_future(asyncio.to_thread(_encrypt))
    try:
        try:
            async for chunk in chunks:
                if not pipe.try_put(chunk):
                    await asyncio.to_thread(pipe.put, chunk)
        except _Aborted:
            pass  # pyrage stopped; its error surfaces from the worker below
        except BaseException as exc:
            pipe.close(exc)
            with contextlib.suppress(BaseException):
                await worker
            raise
        else:
            pipe.close()
        try:
            await worker
        except OSError as exc:
            raise BackupError(f"writing the backup failed: {exc.strerror or exc}") from None
        except pyrage.EncryptError:
            raise BackupError("encrypting the backup failed") from None
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        return out.size, out.sha256.hexdigest()
    except BaseException:
        fh.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def _decrypt_error(exc: BaseException) -> BackupError:
    if isinstance(exc, pyrage.DecryptError) and "no matching keys" in str(exc).lower():
        return BackupError("this identity does not open the backup (it was encrypted to another key)")
    return BackupError("the backup is damaged, truncated or not a pforte backup (decryption failed)")


async def decrypt_chunks(
    path: Path, identities: list[x25519.Identity], digest: Any = None
) -> AsyncIterator[bytes]:
    """Decrypt ``path`` as a stream of plaintext chunks; a wrong key or any damage raises BackupError.

    Every chunk is authenticated before it is yielded, but truncation is only detected at the end:
    callers must not act on the content until the iteration finished without an error. ``digest``
    (a hashlib object), if given, is fed the file's bytes as they are read.
    """
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        raise BackupError(f"backup file not found: {path}") from None
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror}") from None
    pipe = Pipe()

    def _decrypt() -> None:
        writer = _PipeWriter(pipe)
        try:
            with fh:
                pyrage.decrypt_io(_HashingReader(fh, digest or hashlib.sha256()), writer, identities)
            writer.flush()
        except _Aborted:
            return
        except BaseException as exc:
            pipe.close(_decrypt_error(exc))
        else:
            pipe.close()

    worker = asyncio.ensure_future(asyncio.to_thread(_decrypt))
    try:
        while True:
            chunk = pipe.try_get()
            if chunk is None:
                chunk = await asyncio.to_thread(pipe.get)
            if not chunk:
                break
            yield chunk
    finally:
        pipe.abort()
        await worker
