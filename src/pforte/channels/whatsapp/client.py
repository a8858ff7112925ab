"""A thin client for the WhatsApp Cloud API (Graph API): send, mark read, media.

Every failure leaves as a ``pforte.channels.base.ChannelError``. The class is chosen from Meta's
error ``code`` (Meta asks clients to build on the code, not on titles or HTTP status); the
exception text is Meta's generic ``error_data.details`` or title, never message content.

Transport failures are split by whether the request can have reached Meta:

* connect errors and pool timeouts: the request never left -> ``ProviderUnavailableError``;
* a timeout or broken connection after sending: on a send this is ``OutcomeUnknownError``
  (the message may be out; resending could duplicate it); on idempotent calls it is retryable.

``send`` and ``mark_read`` go through a ``JsonPoster`` (aiohttp in production, see
``transport``); the rarer media calls use httpx.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from pforte.channels.base import (
    ChannelDownError,
    ChannelError,
    InvalidRequestError,
    NeedsTemplateError,
    OutboundMessage,
    OutcomeUnknownError,
    PermanentError,
    ProviderUnavailableError,
    RateLimitedError,
    SendResult,
    UndeliverableError,
)
from pforte.channels.whatsapp.transport import (
    HttpxPoster,
    JsonPoster,
    TransportFailure,
    httpx_failure,
    httpx_json,
)

TEXT_MAX = 4096
CAPTION_MAX = 1024
INTERACTIVE_BODY_MAX = 1024

RATE_LIMIT_CODES = frozenset({130429, 131056, 4, 80007, 131048})
UNAVAILABLE_CODES = frozenset({1, 2, 131000, 131016, 131057})
CHANNEL_DOWN_CODES = frozenset({190, 0, 3, 10, 131031, 368, *range(200, 300)})
NEEDS_TEMPLATE_CODES = frozenset({131047})
UNDELIVERABLE_CODES = frozenset({131026, 131049, 131050, 130497, 131021})
INVALID_REQUEST_CODES = frozenset(
    {100, 131008, 131009, 131053, 132000, 132001, 132012, 132015, 132016, 132018, 131062}
)

# Seconds to wait when Meta gives no Retry-After. Backing off further (131056: 4^X seconds) is
# the caller's job; these are only the first step.
DEFAULT_RETRY_AFTER: dict[int, float] = {
    130429: 1.0,  # throughput: 80 messages/s per number
    131056: 6.0,  # pair rate: about one message per 6 s to the same user
    4: 60.0,  # app call rate
    80007: 60.0,  # WABA call rate
    131048: 60.0,  # spam rate limit
    131057: 60.0,  # maintenance, usually under a minute
}


class MediaTooLargeError(PermanentError):
    """A media file is larger than the caller's limit."""

    code = "media_too_large"


@dataclass(frozen=True, slots=True)
class MediaInfo:
    """What ``GET /{media-id}`` returns: a short-lived download URL and the file's metadata."""

    url: str
    mime_type: str | None
    sha256: str | None
    file_size: int | None


class GraphClient:
    """The Cloud API endpoints pforte uses, for one business phone number."""

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        base_url: str,
        version: str,
        phone_number_id: str,
        access_token: str,
        poster: JsonPoster | None = None,
    ) -> None:
        self._http = http
        self._poster: JsonPoster = poster if poster is not None else HttpxPoster(http)
        self._root = f"{base_url.rstrip('/')}/{version.strip('/')}"
        self._phone_number_id = phone_number_id
        self._token = access_token
        self._https_only = urlsplit(base_url).scheme == "https"

    @property
    def phone_number_id(self) -> str:
        """The business number this client sends from."""
        return self._phone_number_id

    # ------------------------------------------------------------------ messages

    async def send(self, msg: OutboundMessage) -> SendResult:
        """Send one message; the answer only means Meta accepted it."""
        body = build_send_body(msg)
        data = await self._post_json(
            self._url(self._phone_number_id, "messages"), body, outcome_unknown_after_send=True
        )
        messages = data.get("messages") if isinstance(data, dict) else None
        first = messages[0] if isinstance(messages, list) and messages else None
        external_id = first.get("id") if isinstance(first, dict) else None
        if not isinstance(external_id, str) or not external_id:
            # Accepted but without a wamid: we cannot track it, and resending might duplicate it.
            raise OutcomeUnknownError("send accepted without a message id")
        status = first.get("message_status") if isinstance(first, dict) else None
        return SendResult(external_id=external_id, message_status=status if isinstance(status, str) else None)

    async def mark_read(self, external_id: str) -> None:
        """Mark an inbound message (and those before it) as read."""
        body = {"messaging_product": "whatsapp", "status": "read", "message_id": external_id}
        await self._post_json(self._url(self._phone_number_id, "messages"), body)

    # ------------------------------------------------------------------ media

    async def upload_media(self, *, data: bytes, mime_type: str, filename: str) -> str:
        """Upload a file for sending and return its media id."""
        # A repeated upload only leaves an unused media object behind (it expires after 30 days),
        # so upload failures are treated as retryable like the other idempotent calls.
        result = await self._call(
            lambda: self._http.post(
                self._url(self._phone_number_id, "media"),
                data={"messaging_product": "whatsapp", "type": mime_type},
                files={"file": (filename, data, mime_type)},
                headers=self._auth(),
            )
        )
        media_id = result.get("id") if isinstance(result, dict) else None
        if not isinstance(media_id, str) or not media_id:
            raise ProviderUnavailableError("upload answered without a media id")
        return media_id

    async def get_media(self, media_id: str) -> MediaInfo:
        """Look up a media object's download URL (valid for about 5 minutes) and metadata."""
        data = await self._call(lambda: self._http.get(self._url(media_id), headers=self._auth()))
        url = data.get("url") if isinstance(data, dict) else None
        if not isinstance(url, str) or not url:
            raise ProviderUnavailableError("media lookup answered without a url")
        size = data.get("file_size")
        if isinstance(size, str) and size.isdigit():
            size = int(size)
        return MediaInfo(
            url=url,
            mime_type=_opt_str(data.get("mime_type")),
            sha256=_opt_str(data.get("sha256")),
            file_size=size if isinstance(size, int) and not isinstance(size, bool) else None,
        )

    async def download(self, url: str, *, max_bytes: int) -> bytes:
        """Download a media URL with the bearer token, refusing more than ``max_bytes``."""
        self._check_download_url(url)
        try:
            async with self._http.stream("GET", url, headers=self._auth(), follow_redirects=True) as resp:
                if resp.status_code >= 300:
                    await resp.aread()
                    raise map_error(resp.status_code, httpx_json(resp))
                declared = resp.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise MediaTooLargeError("media is larger than the limit", http_status=resp.status_code)
                chunks: list[bytes] = []
                total = 0
                async for chunk in resp.aiter_bytes():
                    total += len(chunk)
                    if total > max_bytes:
                        raise MediaTooLargeError(
                            "media is larger than the limit", http_status=resp.status_code
                        )
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.TransportError as exc:
            raise _transport_error(httpx_failure(exc), outcome_unknown_after_send=False) from None

    async def delete_media(self, media_id: str) -> None:
        """Delete an uploaded media object."""
        await self._call(lambda: self._http.delete(self._url(media_id), headers=self._auth()))

    # ------------------------------------------------------------------ plumbing

    def _url(self, *parts: str) -> str:
        return "/".join((self._root, *parts))

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    def _check_download_url(self, url: str) -> None:
        # The bearer token goes with the download, so refuse anything that could leak it in clear.
        scheme = urlsplit(url).scheme
        if scheme not in ("http", "https") or (self._https_only and scheme != "https"):
            raise InvalidRequestError("media url has an unacceptable scheme")

    async def _post_json(
        self, url: str, body: dict[str, Any], *, outcome_unknown_after_send: bool = False
    ) -> Any:
        try:
            answer = await self._poster.post_json(url, body, self._auth())
        except TransportFailure as failure:
            raise _transport_error(failure, outcome_unknown_after_send=outcome_unknown_after_send) from None
        return _judge(
            answer.status,
            answer.data,
            answer.retry_after,
            outcome_unknown_after_send=outcome_unknown_after_send,
        )

    async def _call(self, request: Callable[[], Awaitable[httpx.Response]]) -> Any:
        try:
            resp = await request()
        except httpx.TransportError as exc:
            raise _transport_error(httpx_failure(exc), outcome_unknown_after_send=False) from None
        return _judge(
            resp.status_code,
            httpx_json(resp),
            resp.headers.get("retry-after"),
            outcome_unknown_after_send=False,
        )


def _judge(status: int, data: Any, retry_after: str | None, *, outcome_unknown_after_send: bool) -> Any:
    """The parsed body of a 2xx answer; raise the matching ChannelError for anything else."""
    if status >= 300:
        raise map_error(status, data, retry_after_header=retry_after)
    if data is None:
        if outcome_unknown_after_send:
            raise OutcomeUnknownError("provider answered with an unreadable body", http_status=status)
        raise ProviderUnavailableError("provider answered with an unreadable body", http_status=status)
    return data


def build_send_body(msg: OutboundMessage) -> dict[str, Any]:
    """The exact JSON body of ``POST /{phone-number-id}/messages`` for one outbound message."""
    body: dict[str, Any] = {"messaging_product": "whatsapp", "recipient_type": "individual"}
    if msg.to_phone:
        phone = msg.to_phone.strip()
        # Without '+', Meta prepends the business number's country code, which can misdeliver.
        body["to"] = phone if phone.startswith("+") else f"+{phone}"
    elif msg.to_user_id:
        body["recipient"] = msg.to_user_id
    else:
        raise InvalidRequestError("message has no recipient")

    if msg.kind == "text":
        if not msg.text:
            raise InvalidRequestError("text message has no body")
        if len(msg.text) > TEXT_MAX:
            raise InvalidRequestError(f"text body is longer than {TEXT_MAX} characters")
        body["type"] = "text"
        body["text"] = {"body": msg.text, "preview_url": False}
    elif msg.kind in ("image", "document"):
        if not msg.media_id:
            raise InvalidRequestError(f"{msg.kind} message has no media id")
        media: dict[str, Any] = {"id": msg.media_id}
        if msg.text:
            if len(msg.text) > CAPTION_MAX:
                raise InvalidRequestError(f"caption is longer than {CAPTION_MAX} characters")
            media["caption"] = msg.text
        if msg.kind == "document" and msg.filename:
            media["filename"] = msg.filename
        body["type"] = msg.kind
        body[msg.kind] = media
    elif msg.kind == "template":
        if not msg.template_name or not msg.template_language:
            raise InvalidRequestError("template message needs a name and a language")
        template: dict[str, Any] = {"name": msg.template_name, "language": {"code": msg.template_language}}
        if msg.template_params:
            template["components"] = [
                {"type": "body", "parameters": [{"type": "text", "text": p} for p in msg.template_params]}
            ]
        body["type"] = "template"
        body["template"] = template
    elif msg.kind == "interactive":
        if not msg.text or not 1 <= len(msg.buttons) <= 3:
            raise InvalidRequestError("an interactive message needs a body and 1 to 3 buttons")
        if len(msg.text) > INTERACTIVE_BODY_MAX:
            raise InvalidRequestError(f"interactive body is longer than {INTERACTIVE_BODY_MAX} characters")
        body["type"] = "interactive"
        body["interactive"] = {
            "type": "button",
            "body": {"text": msg.text},
            "action": {
                "buttons": [
                    {"type": "reply", "reply": {"id": bid, "title": title[:20]}} for bid, title in msg.buttons
                ]
            },
        }
    else:
        raise InvalidRequestError("unknown message kind")

    if msg.reply_to_external_id:
        body["context"] = {"message_id": msg.reply_to_external_id}
    return body


def map_error(status: int, payload: Any, *, retry_after_header: str | None = None) -> ChannelError:
    """Turn a non-2xx Graph API answer into the matching ChannelError (by Meta's error code)."""
    error = payload.get("error") if isinstance(payload, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    if not isinstance(error, dict) or not isinstance(code, int) or isinstance(code, bool):
        if status >= 500:
            return ProviderUnavailableError("provider error without details", http_status=status)
        if status == 429:
            return RateLimitedError(
                "rate limited", http_status=status, retry_after=_retry_after(retry_after_header)
            )
        return PermanentError("provider refused the request", http_status=status)

    error_data = error.get("error_data")
    data: dict[str, Any] = error_data if isinstance(error_data, dict) else {}
    detail = _opt_str(data.get("details")) or _title(error)
    kw: dict[str, Any] = {"provider_code": code, "http_status": status}
    retry_after = _retry_after(retry_after_header)
    if retry_after is None:
        retry_after = DEFAULT_RETRY_AFTER.get(code)

    if code in RATE_LIMIT_CODES:
        return RateLimitedError(detail, retry_after=retry_after, **kw)
    if code in UNAVAILABLE_CODES:
        return ProviderUnavailableError(detail, retry_after=retry_after, **kw)
    if code in CHANNEL_DOWN_CODES:
        return ChannelDownError(detail, **kw)
    if code in NEEDS_TEMPLATE_CODES:
        return NeedsTemplateError(detail, **kw)
    if code in UNDELIVERABLE_CODES:
        return UndeliverableError(detail, **kw)
    if code in INVALID_REQUEST_CODES:
        return InvalidRequestError(detail, **kw)
    if status >= 500:
        return ProviderUnavailableError(detail, retry_after=retry_after, **kw)
    return PermanentError(detail, **kw)


def _transport_error(failure: TransportFailure, *, outcome_unknown_after_send: bool) -> ChannelError:
    if not failure.sent or not outcome_unknown_after_send:
        return ProviderUnavailableError(f"transport failure ({failure.name})")
    return OutcomeUnknownError(f"transport failure after sending ({failure.name})")


def _title(error: dict[str, Any]) -> str:
    # "message" is "(#code) Title"; Meta's generic wording, safe to keep.
    return _opt_str(error.get("title")) or _opt_str(error.get("message")) or "provider error"


def _retry_after(header: str | None) -> float | None:
    if header is None:
        return None
    try:
        value = float(header.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
