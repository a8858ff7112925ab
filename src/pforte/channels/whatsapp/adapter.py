"""The WhatsApp channel adapter: the port's operations on top of the Graph API client.

Fetching inbound media checks the file against the SHA-256 Meta announced, so a truncated or
swapped download is never stored as the patient's file.
"""

from __future__ import annotations

import hashlib
import hmac

from pforte.channels.base import MediaRef, OutboundMessage, PermanentError, SendResult, decode_sha256
from pforte.channels.whatsapp.client import GraphClient, MediaTooLargeError

DEFAULT_MIME_TYPE = "application/octet-stream"
# Statuses with which a webhook's direct media URL has probably expired: look up a fresh one.
_STALE_URL_STATUSES = frozenset({401, 403, 404, 410})


class MediaIntegrityError(PermanentError):
    """A downloaded media file does not match the SHA-256 the provider announced."""

    code = "media_integrity"


class WhatsAppAdapter:
    """The WhatsApp Cloud API behind the channel port."""

    def __init__(self, client: GraphClient) -> None:
        self._client = client

    @property
    def channel_ref(self) -> str:
        """The business number (phone_number_id) this adapter serves."""
        return self._client.phone_number_id

    async def send(self, msg: OutboundMessage) -> SendResult:
        """Send one outbound message."""
        return await self._client.send(msg)

    async def mark_read(self, external_id: str) -> None:
        """Mark an inbound message as read."""
        await self._client.mark_read(external_id)

    async def upload_media(self, *, data: bytes, mime_type: str, filename: str) -> str:
        """Upload a file for a later send and return its media id."""
        return await self._client.upload_media(data=data, mime_type=mime_type, filename=filename)

    async def fetch_media(self, ref: MediaRef, *, max_bytes: int) -> tuple[bytes, str]:
        """Download an inbound media file, verify its SHA-256 and return (bytes, mime type)."""
        mime_type = ref.mime_type
        sha256 = ref.sha256
        data: bytes | None = None
        if ref.url:
            try:
                data = await self._client.download(ref.url, max_bytes=max_bytes)
            except PermanentError as exc:
                if type(exc) is not PermanentError or exc.http_status not in _STALE_URL_STATUSES:
                    raise
        if data is None:
            info = await self._client.get_media(ref.media_id)
            if info.file_size is not None and info.file_size > max_bytes:
                raise MediaTooLargeError("media is larger than the limit")
            mime_type = mime_type or info.mime_type
            sha256 = sha256 or info.sha256
            data = await self._client.download(info.url, max_bytes=max_bytes)
        if sha256 is not None:
            check_sha256(data, sha256)
        return data, mime_type or DEFAULT_MIME_TYPE


def check_sha256(data: bytes, expected: str) -> None:
    """Raise MediaIntegrityError unless ``data`` hashes to ``expected`` (base64 or hex)."""
    want = decode_sha256(expected)
    if want is None or not hmac.compare_digest(hashlib.sha256(data).digest(), want):
        raise MediaIntegrityError("media checksum does not match")
