"""WhatsApp Graph API client and adapter against httpx.MockTransport."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import pytest_asyncio

from pforte.channels.base import (
    ChannelDownError,
    ChannelError,
    InvalidRequestError,
    MediaRef,
    NeedsTemplateError,
    OutboundMessage,
    OutcomeUnknownError,
    PermanentError,
    ProviderUnavailableError,
    RateLimitedError,
    RetryableError,
    SendResult,
    UndeliverableError,
)
from pforte.channels.whatsapp.adapter import MediaIntegrityError, WhatsAppAdapter
from pforte.channels.whatsapp.client import GraphClient, MediaInfo, MediaTooLargeError

BASE = "https://graph.example.test"
PNID = "109876543210987"
TOKEN = "EAAtest-token-0123456789"
MESSAGES_URL = f"{BASE}/v25.0/{PNID}/messages"
WAMID = "wamid.HBgNNDkxNTExMjM0NTY3OBUCABEYEkZBS0VPVVRCT1VORA0001AA=="
INBOUND_WAMID = "wamid.HBgNNDkxNTExMjM0NTY3OBUCABIYIEZBS0VJTkJPVU5E0001AA=="
BSUID = "DE.1234567890123456"
SECRET_TEXT = "Ihr Befund: Verdacht auf etwas Vertrauliches"
MEDIA_URL = "https://lookaside.example.test/whatsapp_business/attachments/?mid=1400000000000005"
FILE = b"\x89PNG fake image bytes " * 50
FILE_SHA_B64 = base64.b64encode(hashlib.sha256(FILE).digest()).decode()
FILE_SHA_HEX = hashlib.sha256(FILE).hexdigest()

Handler = Callable[[httpx.Request], httpx.Response]


@dataclass
class FakeGraph:
    """Answers queued per (method, url) and records every request."""

    routes: dict[tuple[str, str], Handler] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)

    def on(self, method: str, url: str, handler: Handler | httpx.Response) -> None:
        """Register a handler (or a fixed response) for one method and URL."""
        self.routes[(method, url)] = handler if callable(handler) else (lambda _req, r=handler: r)

    def handle(self, request: httpx.Request) -> httpx.Response:
        """The MockTransport entry point."""
        self.requests.append(request)
        key = (request.method, str(request.url))
        if key not in self.routes:
            return httpx.Response(404, json={"error": {"code": 100, "message": "no route in fake"}})
        return self.routes[key](request)

    def body(self, index: int = -1) -> Any:
        """The JSON body of a recorded request."""
        return json.loads(self.requests[index].content)


@pytest_asyncio.fixture
async def graph() -> AsyncIterator[tuple[GraphClient, FakeGraph]]:
    """A GraphClient wired to a FakeGraph."""
    fake = FakeGraph()
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake.handle)) as http:
        client = GraphClient(
            http=http, base_url=BASE + "/", version="v25.0", phone_number_id=PNID, access_token=TOKEN
        )
        yield client, fake


def accepted(status: str | None = None) -> httpx.Response:
    """Meta's answer to an accepted send."""
    message: dict[str, Any] = {"id": WAMID}
    if status:
        message["message_status"] = status
    return httpx.Response(
        200,
        json={
            "messaging_product": "whatsapp",
            "contacts": [{"input": "+4915112345678"}],
            "messages": [message],
        },
    )


def meta_error(code: int, status: int = 400, details: str = "Generic Meta wording.") -> httpx.Response:
    """Meta's error envelope."""
    return httpx.Response(
        status,
        json={
            "error": {
                "message": f"(#{code}) Some title",
                "type": "OAuthException",
                "code": code,
                "error_data": {"messaging_product": "whatsapp", "details": details},
                "fbtrace_id": "Az8or2yhqkZfEZ-_4Qn_Bam",
            }
        },
    )


def text_to_phone(text: str = "Hallo", **kw: Any) -> OutboundMessage:
    """A text message to a phone number."""
    return OutboundMessage(to_user_id=BSUID, to_phone="+4915112345678", kind="text", text=text, **kw)


# --------------------------------------------------------------------------- request bodies


@pytest.mark.asyncio
async def test_send_text_exact_body_and_headers(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    fake.on("POST", MESSAGES_URL, accepted())
    result = await client.send(text_to_phone())
    assert result == SendResult(external_id=WAMID, message_status=None)
    req = fake.requests[0]
    assert req.headers["authorization"] == f"Bearer {TOKEN}"
    assert req.headers["content-type"] == "application/json"
    assert TOKEN not in str(req.url)
    assert fake.body() == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "+4915112345678",  # 'to' wins over the BSUID when both are known
        "type": "text",
        "text": {"body": "Hallo", "preview_url": False},
    }


@pytest.mark.asyncio
async def test_send_adds_plus_to_bare_phone(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    fake.on("POST", MESSAGES_URL, accepted())
    await client.send(OutboundMessage(to_user_id=None, to_phone="4915112345678", kind="text", text="Hi"))
    assert fake.body()["to"] == "+4915112345678"


@pytest.mark.asyncio
async def test_send_to_bsuid_uses_recipient(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    fake.on("POST", MESSAGES_URL, accepted())
    await client.send(OutboundMessage(to_user_id=BSUID, to_phone=None, kind="text", text="Hi"))
    body = fake.body()
    assert body["recipient"] == BSUID and "to" not in body


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        (
            OutboundMessage(
                to_user_id=None, to_phone="+4915112345678", kind="image", media_id="77", text="Plan"
            ),
            {"type": "image", "image": {"id": "77", "caption": "Plan"}},
        ),
        (
            OutboundMessage(to_user_id=None, to_phone="+4915112345678", kind="image", media_id="77"),
            {"type": "image", "image": {"id": "77"}},
        ),
        (
            OutboundMessage(
                to_user_id=None,
                to_phone="+4915112345678",
                kind="document",
                media_id="88",
                text="Befund",
                filename="befund.pdf",
            ),
            {"type": "document", "document": {"id": "88", "caption": "Befund", "filename": "befund.pdf"}},
        ),
        (
            OutboundMessage(
                to_user_id=None,
                to_phone="+4915112345678",
                kind="template",
                template_name="termin_erinnerung",
                template_language="de",
                template_params=("Dienstag", "09:30"),
            ),
            {
                "type": "template",
                "template": {
                    "name": "termin_erinnerung",
                    "language": {"code": "de"},
                    "components": [
                        {
                            "type": "body",
                            "parameters": [
                                {"type": "text", "text": "Dienstag"},
                                {"type": "text", "text": "09:30"},
                            ],
                        }
                    ],
                },
            },
        ),
        (
            OutboundMessage(
                to_user_id=None,
                to_phone="+4915112345678",
                kind="template",
                template_name="hallo",
                template_language="de",
            ),
            {"type": "template", "template": {"name": "hallo", "language": {"code": "de"}}},
        ),
        (
            OutboundMessage(
                to_user_id=None,
                to_phone="+4915112345678",
                kind="text",
                text="Ja",
                reply_to_external_id=INBOUND_WAMID,
            ),
            {
                "type": "text",
                "text": {"body": "Ja", "preview_url": False},
                "context": {"message_id": INBOUND_WAMID},
            },
        ),
    ],
    ids=["image_caption", "image_plain", "document", "template_params", "template_plain", "text_reply"],
)
async def test_send_bodies(
    graph: tuple[GraphClient, FakeGraph], msg: OutboundMessage, expected: dict[str, Any]
) -> None:
    client, fake = graph
    fake.on("POST", MESSAGES_URL, accepted())
    await client.send(msg)
    assert fake.body() == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "+4915112345678",
        **expected,
    }


@pytest.mark.asyncio
async def test_send_returns_pacing_status(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    fake.on("POST", MESSAGES_URL, accepted("held_for_quality_assessment"))
    result = await client.send(
        OutboundMessage(
            to_user_id=BSUID, to_phone=None, kind="template", template_name="t", template_language="de"
        )
    )
    assert result.message_status == "held_for_quality_assessment"


@pytest.mark.asyncio
async def test_send_text_length_limit(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    fake.on("POST", MESSAGES_URL, accepted())
    await client.send(text_to_phone("a" * 4096))
    with pytest.raises(InvalidRequestError):
        await client.send(text_to_phone("a" * 4097))
    assert len(fake.requests) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "msg",
    [
        OutboundMessage(to_user_id=None, to_phone=None, kind="text", text="x"),
        OutboundMessage(to_user_id=BSUID, to_phone=None, kind="text", text=""),
        OutboundMessage(to_user_id=BSUID, to_phone=None, kind="image"),
        OutboundMessage(to_user_id=BSUID, to_phone=None, kind="image", media_id="1", text="c" * 1025),
        OutboundMessage(to_user_id=BSUID, to_phone=None, kind="template", template_name="t"),
    ],
    ids=["no_recipient", "empty_text", "image_no_id", "long_caption", "template_no_language"],
)
async def test_send_rejects_incomplete_messages_locally(
    graph: tuple[GraphClient, FakeGraph], msg: OutboundMessage
) -> None:
    client, fake = graph
    with pytest.raises(InvalidRequestError):
        await client.send(msg)
    assert fake.requests == []


@pytest.mark.asyncio
async def test_send_accepted_without_id_is_outcome_unknown(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    fake.on("POST", MESSAGES_URL, httpx.Response(200, json={"messaging_product": "whatsapp", "messages": []}))
    with pytest.raises(OutcomeUnknownError):
        await client.send(text_to_phone())


@pytest.mark.asyncio
async def test_mark_read_body(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    fake.on("POST", MESSAGES_URL, httpx.Response(200, json={"success": True}))
    await client.mark_read(INBOUND_WAMID)
    assert fake.body() == {"messaging_product": "whatsapp", "status": "read", "message_id": INBOUND_WAMID}
    assert fake.requests[0].headers["authorization"] == f"Bearer {TOKEN}"


# --------------------------------------------------------------------------- error mapping


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("code", "http_status", "cls"),
    [
        (130429, 400, RateLimitedError),
        (131056, 400, RateLimitedError),
        (4, 400, RateLimitedError),
        (80007, 400, RateLimitedError),
        (131048, 400, RateLimitedError),
        (1, 500, ProviderUnavailableError),
        (2, 503, ProviderUnavailableError),
        (131000, 500, ProviderUnavailableError),
        (131016, 503, ProviderUnavailableError),
        (131057, 400, ProviderUnavailableError),
        (190, 401, ChannelDownError),
        (0, 401, ChannelDownError),
        (3, 400, ChannelDownError),
        (10, 403, ChannelDownError),
        (200, 403, ChannelDownError),
        (299, 403, ChannelDownError),
        (131031, 400, ChannelDownError),
        (368, 400, ChannelDownError),
        (131047, 400, NeedsTemplateError),
        (131026, 400, UndeliverableError),
        (131049, 400, UndeliverableError),
        (131050, 400, UndeliverableError),
        (130497, 400, UndeliverableError),
        (131021, 400, UndeliverableError),
        (100, 400, InvalidRequestError),
        (131008, 400, InvalidRequestError),
        (131009, 400, InvalidRequestError),
        (131053, 400, InvalidRequestError),
        (132000, 400, InvalidRequestError),
        (132001, 404, InvalidRequestError),
        (132012, 400, InvalidRequestError),
        (132015, 400, InvalidRequestError),
        (132016, 400, InvalidRequestError),
        (132018, 400, InvalidRequestError),
        (131062, 400, InvalidRequestError),
        (133010, 400, PermanentError),
        (300, 400, PermanentError),
        (999999, 500, ProviderUnavailableError),
    ],
)
async def test_error_codes_map_to_classes(
    graph: tuple[GraphClient, FakeGraph], code: int, http_status: int, cls: type[ChannelError]
) -> None:
    client, fake = graph
    fake.on("POST", MESSAGES_URL, meta_error(code, http_status, details="Generic Meta wording."))
    with pytest.raises(ChannelError) as info:
        await client.send(text_to_phone(SECRET_TEXT))
    exc = info.value
    assert type(exc) is cls
    assert (exc.provider_code, exc.http_status, exc.detail) == (code, http_status, "Generic Meta wording.")
    assert SECRET_TEXT not in str(exc) and TOKEN not in str(exc) and "4915112345678" not in str(exc)


@pytest.mark.asyncio
async def test_error_detail_falls_back_to_message_title(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    fake.on(
        "POST",
        MESSAGES_URL,
        httpx.Response(400, json={"error": {"code": 131047, "message": "(#131047) Re-engagement"}}),
    )
    with pytest.raises(NeedsTemplateError) as info:
        await client.send(text_to_phone())
    assert info.value.detail == "(#131047) Re-engagement"


@pytest.mark.asyncio
async def test_rate_limit_retry_after_default_and_header(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    fake.on("POST", MESSAGES_URL, meta_error(131056))
    with pytest.raises(RateLimitedError) as info:
        await client.send(text_to_phone())
    assert info.value.retry_after == 6.0
    response = meta_error(130429)
    response.headers["Retry-After"] = "17"
    fake.on("POST", MESSAGES_URL, response)
    with pytest.raises(RateLimitedError) as info:
        await client.send(text_to_phone())
    assert info.value.retry_after == 17.0


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("response", "cls"),
    [
        (httpx.Response(502, text="<html>Bad Gateway</html>"), ProviderUnavailableError),
        (httpx.Response(503), ProviderUnavailableError),
        (httpx.Response(500, json={"error": "oops"}), ProviderUnavailableError),
        (httpx.Response(429, text="slow down"), RateLimitedError),
        (httpx.Response(404, text="not found"), PermanentError),
        (httpx.Response(400, json={"error": {"code": "100"}}), PermanentError),
    ],
)
async def test_unparseable_error_bodies(
    graph: tuple[GraphClient, FakeGraph], response: httpx.Response, cls: type[ChannelError]
) -> None:
    client, fake = graph
    fake.on("POST", MESSAGES_URL, response)
    with pytest.raises(ChannelError) as info:
        await client.send(text_to_phone())
    assert type(info.value) is cls
    assert info.value.http_status == response.status_code and info.value.provider_code is None


# --------------------------------------------------------------------------- transport failures


def raising(exc_type: type[httpx.TransportError]) -> Handler:
    """A handler that fails the way the network would."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("simulated", request=request)

    return handler


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("exc_type", "cls"),
    [
        (httpx.ConnectError, ProviderUnavailableError),
        (httpx.ConnectTimeout, ProviderUnavailableError),
        (httpx.PoolTimeout, ProviderUnavailableError),
        (httpx.ReadTimeout, OutcomeUnknownError),
        (httpx.WriteTimeout, OutcomeUnknownError),
        (httpx.RemoteProtocolError, OutcomeUnknownError),
        (httpx.ReadError, OutcomeUnknownError),
    ],
)
async def test_transport_failures_on_send(
    graph: tuple[GraphClient, FakeGraph], exc_type: type[httpx.TransportError], cls: type[ChannelError]
) -> None:
    client, fake = graph
    fake.on("POST", MESSAGES_URL, raising(exc_type))
    with pytest.raises(ChannelError) as info:
        await client.send(text_to_phone())
    assert type(info.value) is cls


@pytest.mark.asyncio
@pytest.mark.parametrize("exc_type", [httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.ConnectError])
async def test_transport_failures_on_idempotent_calls_are_retryable(
    graph: tuple[GraphClient, FakeGraph], exc_type: type[httpx.TransportError]
) -> None:
    client, fake = graph
    fake.on("POST", MESSAGES_URL, raising(exc_type))
    fake.on("GET", f"{BASE}/v25.0/555", raising(exc_type))
    fake.on("GET", MEDIA_URL, raising(exc_type))
    fake.on("DELETE", f"{BASE}/v25.0/555", raising(exc_type))
    with pytest.raises(ProviderUnavailableError):
        await client.mark_read(INBOUND_WAMID)
    with pytest.raises(ProviderUnavailableError):
        await client.get_media("555")
    with pytest.raises(ProviderUnavailableError):
        await client.download(MEDIA_URL, max_bytes=1000)
    with pytest.raises(ProviderUnavailableError):
        await client.delete_media("555")


# --------------------------------------------------------------------------- media


@pytest.mark.asyncio
async def test_upload_media_multipart(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    fake.on("POST", f"{BASE}/v25.0/{PNID}/media", httpx.Response(200, json={"id": "1500000000000001"}))
    media_id = await client.upload_media(
        data=b"%PDF-1.7 fake", mime_type="application/pdf", filename="befund.pdf"
    )
    assert media_id == "1500000000000001"
    req = fake.requests[0]
    assert req.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert req.headers["authorization"] == f"Bearer {TOKEN}"
    content = req.content
    assert b'name="messaging_product"\r\n\r\nwhatsapp' in content
    assert b'name="file"; filename="befund.pdf"' in content and b"%PDF-1.7 fake" in content
    assert b"Content-Type: application/pdf" in content


@pytest.mark.asyncio
async def test_get_media_and_delete(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    fake.on(
        "GET",
        f"{BASE}/v25.0/555",
        httpx.Response(
            200,
            json={
                "messaging_product": "whatsapp",
                "url": MEDIA_URL,
                "mime_type": "image/png",
                "sha256": FILE_SHA_B64,
                "file_size": len(FILE),
                "id": "555",
            },
        ),
    )
    fake.on("DELETE", f"{BASE}/v25.0/555", httpx.Response(200, json={"success": True}))
    info = await client.get_media("555")
    assert info == MediaInfo(url=MEDIA_URL, mime_type="image/png", sha256=FILE_SHA_B64, file_size=len(FILE))
    await client.delete_media("555")
    assert [(r.method, r.headers["authorization"]) for r in fake.requests] == [
        ("GET", f"Bearer {TOKEN}"),
        ("DELETE", f"Bearer {TOKEN}"),
    ]


@pytest.mark.asyncio
async def test_get_media_error_is_mapped(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    fake.on("GET", f"{BASE}/v25.0/555", meta_error(100))
    with pytest.raises(InvalidRequestError):
        await client.get_media("555")


@pytest.mark.asyncio
async def test_download_sends_bearer_and_returns_bytes(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    fake.on("GET", MEDIA_URL, httpx.Response(200, content=FILE, headers={"content-type": "image/png"}))
    assert await client.download(MEDIA_URL, max_bytes=len(FILE)) == FILE
    assert fake.requests[0].headers["authorization"] == f"Bearer {TOKEN}"


@pytest.mark.asyncio
async def test_download_over_limit_by_content_length(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    produced: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        produced.append(1)
        yield FILE

    headers = {"content-length": str(len(FILE))}
    fake.on("GET", MEDIA_URL, lambda _req: httpx.Response(200, content=body(), headers=headers))
    with pytest.raises(MediaTooLargeError):
        await client.download(MEDIA_URL, max_bytes=len(FILE) - 1)
    assert produced == []  # refused on the declared size, before reading any of the body


@pytest.mark.asyncio
async def test_download_over_limit_while_streaming_stops_early(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    produced: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(1000):
            produced.append(i)
            yield b"x" * 1024

    fake.on("GET", MEDIA_URL, lambda _req: httpx.Response(200, content=chunks()))
    with pytest.raises(MediaTooLargeError):
        await client.download(MEDIA_URL, max_bytes=10 * 1024)
    assert len(produced) < 20  # stopped reading soon after the limit, not at the end of the stream


@pytest.mark.asyncio
async def test_download_expired_url_is_permanent_404(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    fake.on("GET", MEDIA_URL, httpx.Response(404, text="gone"))
    with pytest.raises(PermanentError) as info:
        await client.download(MEDIA_URL, max_bytes=1000)
    assert info.value.http_status == 404


@pytest.mark.asyncio
async def test_download_refuses_plain_http_when_graph_is_https(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    for url in ("http://lookaside.example.test/x", "file:///etc/passwd"):
        with pytest.raises(InvalidRequestError):
            await client.download(url, max_bytes=1000)
    assert fake.requests == []


# --------------------------------------------------------------------------- adapter.fetch_media


def media_lookup(sha256: str | None = FILE_SHA_B64, size: int | None = None) -> httpx.Response:
    """Meta's answer to GET /{media-id}."""
    return httpx.Response(
        200,
        json={
            "url": MEDIA_URL,
            "mime_type": "image/png",
            "sha256": sha256,
            "file_size": size or len(FILE),
            "id": "555",
        },
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("ref_sha", [FILE_SHA_B64, FILE_SHA_HEX, FILE_SHA_HEX.upper(), None])
async def test_fetch_media_via_lookup(graph: tuple[GraphClient, FakeGraph], ref_sha: str | None) -> None:
    client, fake = graph
    fake.on("GET", f"{BASE}/v25.0/555", media_lookup())
    fake.on("GET", MEDIA_URL, httpx.Response(200, content=FILE))
    adapter = WhatsAppAdapter(client)
    data, mime = await adapter.fetch_media(
        MediaRef(media_id="555", mime_type=None, sha256=ref_sha), max_bytes=10**6
    )
    assert (data, mime) == (FILE, "image/png")
    assert [str(r.url) for r in fake.requests] == [f"{BASE}/v25.0/555", MEDIA_URL]


@pytest.mark.asyncio
async def test_fetch_media_uses_webhook_url_directly(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    fake.on("GET", MEDIA_URL, httpx.Response(200, content=FILE))
    ref = MediaRef(media_id="555", mime_type="image/jpeg", sha256=FILE_SHA_B64, url=MEDIA_URL)
    data, mime = await WhatsAppAdapter(client).fetch_media(ref, max_bytes=10**6)
    assert (data, mime) == (FILE, "image/jpeg")
    assert [str(r.url) for r in fake.requests] == [MEDIA_URL]


@pytest.mark.asyncio
async def test_fetch_media_refreshes_an_expired_webhook_url(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    stale = MEDIA_URL + "&stale=1"
    fake.on("GET", stale, httpx.Response(404, text="expired"))
    fake.on("GET", f"{BASE}/v25.0/555", media_lookup())
    fake.on("GET", MEDIA_URL, httpx.Response(200, content=FILE))
    ref = MediaRef(media_id="555", mime_type="image/png", sha256=FILE_SHA_B64, url=stale)
    data, _ = await WhatsAppAdapter(client).fetch_media(ref, max_bytes=10**6)
    assert data == FILE
    assert [str(r.url) for r in fake.requests] == [stale, f"{BASE}/v25.0/555", MEDIA_URL]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "bad_sha",
    [
        base64.b64encode(hashlib.sha256(b"other").digest()).decode(),
        hashlib.sha256(b"other").hexdigest(),
        "not-a-digest",
        "",
    ],
)
async def test_fetch_media_sha256_mismatch(graph: tuple[GraphClient, FakeGraph], bad_sha: str) -> None:
    client, fake = graph
    fake.on("GET", f"{BASE}/v25.0/555", media_lookup(sha256=bad_sha or FILE_SHA_B64))
    fake.on("GET", MEDIA_URL, httpx.Response(200, content=FILE))
    ref = MediaRef(media_id="555", mime_type="image/png", sha256=bad_sha or "AAAA")
    with pytest.raises(MediaIntegrityError) as info:
        await WhatsAppAdapter(client).fetch_media(ref, max_bytes=10**6)
    assert isinstance(info.value, PermanentError) and info.value.code == "media_integrity"


@pytest.mark.asyncio
async def test_fetch_media_checks_lookup_sha_when_ref_has_none(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    fake.on("GET", f"{BASE}/v25.0/555", media_lookup(sha256=hashlib.sha256(b"other").hexdigest()))
    fake.on("GET", MEDIA_URL, httpx.Response(200, content=FILE))
    with pytest.raises(MediaIntegrityError):
        await WhatsAppAdapter(client).fetch_media(MediaRef("555", None, None), max_bytes=10**6)


@pytest.mark.asyncio
async def test_fetch_media_too_large_by_lookup_skips_download(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    fake.on("GET", f"{BASE}/v25.0/555", media_lookup(size=50_000_000))
    with pytest.raises(MediaTooLargeError):
        await WhatsAppAdapter(client).fetch_media(MediaRef("555", None, FILE_SHA_B64), max_bytes=10**6)
    assert len(fake.requests) == 1


@pytest.mark.asyncio
async def test_adapter_send_and_mark_read_delegate(graph: tuple[GraphClient, FakeGraph]) -> None:
    client, fake = graph
    fake.on(
        "POST",
        MESSAGES_URL,
        lambda req: accepted() if b'"text"' in req.content else httpx.Response(200, json={"success": True}),
    )
    fake.on("POST", f"{BASE}/v25.0/{PNID}/media", httpx.Response(200, json={"id": "1500"}))
    adapter = WhatsAppAdapter(client)
    assert adapter.channel_ref == PNID
    assert (await adapter.send(text_to_phone())).external_id == WAMID
    await adapter.mark_read(INBOUND_WAMID)
    assert await adapter.upload_media(data=b"x", mime_type="image/png", filename="a.png") == "1500"
    assert fake.body(1)["status"] == "read"


def test_error_tree_is_what_the_outbox_expects() -> None:
    assert issubclass(RateLimitedError, RetryableError) and issubclass(
        ProviderUnavailableError, RetryableError
    )
    assert not issubclass(OutcomeUnknownError, RetryableError)
    assert issubclass(MediaTooLargeError, PermanentError) and issubclass(MediaIntegrityError, PermanentError)
