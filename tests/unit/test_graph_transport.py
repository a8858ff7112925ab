"""The JSON POST transports of the send path, against a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import pytest_asyncio
from aiohttp import web

from pforte.channels.base import (
    NeedsTemplateError,
    OutboundMessage,
    OutcomeUnknownError,
    ProviderUnavailableError,
    RateLimitedError,
    SendResult,
)
from pforte.channels.whatsapp.client import GraphClient, build_send_body
from pforte.channels.whatsapp.transport import (
    AiohttpPoster,
    HttpxPoster,
    JsonAnswer,
    TransportFailure,
)

TOKEN = "EAAtest-transport-token-987"
WAMID = "wamid.X"
TIMEOUT = 0.6  # the poster's total timeout; its connect timeout is half of it


@dataclass
class Recorder:
    """What the server saw, and a switch that releases the slow handler."""

    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    peers: list[Any] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Server:
    """A running Graph stand-in."""

    base_url: str
    seen: Recorder


def _error(code: int) -> dict[str, Any]:
    return {
        "error": {
            "message": f"(#{code}) Some title",
            "type": "OAuthException",
            "code": code,
            "error_data": {"messaging_product": "whatsapp", "details": "Generic Meta wording."},
        }
    }


def _app(seen: Recorder) -> web.Application:
    async def messages(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        seen.bodies.append(raw)
        seen.headers.append(dict(request.headers))
        seen.peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        mode = request.match_info["mode"]
        if mode == "ok":
            return web.json_response({"messaging_product": "whatsapp", "messages": [{"id": WAMID}]})
        if mode == "template":
            return web.json_response(_error(131047), status=400)
        if mode == "rate":
            return web.json_response(_error(130429), status=429, headers={"Retry-After": "7"})
        if mode == "notjson":
            return web.Response(status=200, text="<html>ok</html>", content_type="text/html")
        if mode == "hangup":
            # The request was read in full; the connection drops before any answer.
            assert request.transport is not None
            request.transport.close()
            await seen.release.wait()
            return web.Response(status=200)
        if mode == "slow":
            await seen.release.wait()
            return web.json_response({"messages": [{"id": WAMID}]})
        raise web.HTTPNotFound()

    app = web.Application()
    app.router.add_post("/v25.0/{mode}/messages", messages)
    return app


@pytest_asyncio.fixture
async def server() -> AsyncIterator[Server]:
    """An aiohttp server on an ephemeral port."""
    seen = Recorder()
    runner = web.AppRunner(_app(seen), handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Server(base_url=f"http://127.0.0.1:{port}", seen=seen)
    finally:
        seen.release.set()
        await runner.cleanup()


@pytest_asyncio.fixture
async def poster() -> AsyncIterator[AiohttpPoster]:
    """An AiohttpPoster with a short timeout."""
    p = AiohttpPoster(timeout=TIMEOUT, limit=4)
    try:
        yield p
    finally:
        await p.close()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client for the media calls (unused by send and mark_read here)."""
    async with httpx.AsyncClient() as client:
        yield client


def client_for(base_url: str, mode: str, http: httpx.AsyncClient, poster: AiohttpPoster) -> GraphClient:
    """A GraphClient whose phone number id selects the server's behaviour."""
    return GraphClient(
        http=http, base_url=base_url, version="v25.0", phone_number_id=mode, access_token=TOKEN, poster=poster
    )


def msg(text: str = "Grüße aus der Praxis") -> OutboundMessage:
    """A text message to a phone number."""
    return OutboundMessage(
        to_user_id="DE.1234567890123456", to_phone="+4915112345678", kind="text", text=text
    )


def free_port() -> int:
    """A port on 127.0.0.1 that nobody listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --------------------------------------------------------------------------- answers


@pytest.mark.asyncio
async def test_send_posts_exact_body_and_headers(
    server: Server, http: httpx.AsyncClient, poster: AiohttpPoster
) -> None:
    client = client_for(server.base_url, "ok", http, poster)
    message = msg()
    assert await client.send(message) == SendResult(external_id=WAMID, message_status=None)
    assert await client.send(message) == SendResult(external_id=WAMID, message_status=None)

    raw = server.seen.bodies[0]
    assert json.loads(raw) == build_send_body(message)
    assert raw == json.dumps(build_send_body(message), separators=(",", ":"), ensure_ascii=False).encode()
    assert "Grüße".encode() in raw  # UTF-8, not \\u escapes
    headers = server.seen.headers[0]
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert headers["Content-Type"] == "application/json"
    assert headers["Content-Length"] == str(len(raw))
    # The second send reused the pooled connection.
    assert len(server.seen.peers) == 2 and server.seen.peers[0] == server.seen.peers[1]


@pytest.mark.asyncio
async def test_graph_error_maps_to_needs_template(
    server: Server, http: httpx.AsyncClient, poster: AiohttpPoster
) -> None:
    with pytest.raises(NeedsTemplateError) as info:
        await client_for(server.base_url, "template", http, poster).send(msg())
    assert info.value.provider_code == 131047 and info.value.http_status == 400


@pytest.mark.asyncio
async def test_rate_limit_carries_retry_after(
    server: Server, http: httpx.AsyncClient, poster: AiohttpPoster
) -> None:
    answer = await poster.post_json(f"{server.base_url}/v25.0/rate/messages", {"a": 1}, {})
    assert answer == JsonAnswer(status=429, data=_error(130429), retry_after="7")
    with pytest.raises(RateLimitedError) as info:
        await client_for(server.base_url, "rate", http, poster).send(msg())
    assert info.value.retry_after == 7.0 and info.value.provider_code == 130429


@pytest.mark.asyncio
async def test_unreadable_body(server: Server, http: httpx.AsyncClient, poster: AiohttpPoster) -> None:
    answer = await poster.post_json(f"{server.base_url}/v25.0/notjson/messages", {}, {})
    assert answer == JsonAnswer(status=200, data=None, retry_after=None)
    client = client_for(server.base_url, "notjson", http, poster)
    with pytest.raises(OutcomeUnknownError) as info:
        await client.send(msg())
    assert info.value.http_status == 200
    with pytest.raises(ProviderUnavailableError):
        await client.mark_read("wamid.IN")


# --------------------------------------------------------------------------- transport failures


@pytest.mark.asyncio
async def test_connection_dropped_after_request_is_maybe_sent(
    server: Server, http: httpx.AsyncClient, poster: AiohttpPoster
) -> None:
    url = f"{server.base_url}/v25.0/hangup/messages"
    with pytest.raises(TransportFailure) as info:
        await poster.post_json(url, {"a": 1}, {"Authorization": f"Bearer {TOKEN}"})
    assert info.value.sent is True
    assert str(info.value) == info.value.name == "ServerDisconnectedError"
    assert server.seen.bodies == [b'{"a":1}']

    client = client_for(server.base_url, "hangup", http, poster)
    with pytest.raises(OutcomeUnknownError) as unknown:
        await client.send(msg())
    assert str(unknown.value) == "transport failure after sending (ServerDisconnectedError)"
    assert TOKEN not in str(unknown.value) and "127.0.0.1" not in str(unknown.value)
    # Not resent by aiohttp: the server saw each POST exactly once.
    assert len(server.seen.bodies) == 2
    # mark_read is idempotent, so the same failure is retryable there.
    with pytest.raises(ProviderUnavailableError):
        await client.mark_read("wamid.IN")


@pytest.mark.asyncio
async def test_timeout_waiting_for_answer_is_maybe_sent(
    server: Server, http: httpx.AsyncClient, poster: AiohttpPoster
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TransportFailure) as info:
        await poster.post_json(f"{server.base_url}/v25.0/slow/messages", {}, {})
    assert info.value.sent is True and info.value.name == "TimeoutError"
    assert TIMEOUT * 0.9 <= loop.time() - started < TIMEOUT + 1.0
    with pytest.raises(OutcomeUnknownError):
        await client_for(server.base_url, "slow", http, poster).send(msg())
    assert len(server.seen.bodies) == 2


@pytest.mark.asyncio
async def test_refused_connection_is_not_sent(http: httpx.AsyncClient, poster: AiohttpPoster) -> None:
    base_url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TransportFailure) as info:
        await poster.post_json(f"{base_url}/v25.0/ok/messages", {}, {})
    assert info.value.sent is False and info.value.name == "ClientConnectorError"
    with pytest.raises(ProviderUnavailableError) as err:
        await client_for(base_url, "ok", http, poster).send(msg())
    assert str(err.value) == "transport failure (ClientConnectorError)"


@pytest.mark.asyncio
async def test_waiting_for_a_pooled_connection_is_not_sent(server: Server) -> None:
    poster = AiohttpPoster(timeout=TIMEOUT, limit=1)
    try:
        url = f"{server.base_url}/v25.0/slow/messages"
        first = asyncio.create_task(poster.post_json(url, {"n": 1}, {}))
        await asyncio.sleep(0.05)  # the first request holds the only connection
        with pytest.raises(TransportFailure) as info:
            await poster.post_json(url, {"n": 2}, {})
        assert info.value.sent is False and info.value.name == "ConnectionTimeoutError"
        with pytest.raises(TransportFailure) as first_info:
            await first
        assert first_info.value.sent is True
        assert server.seen.bodies == [b'{"n":1}']
    finally:
        await poster.close()


# --------------------------------------------------------------------------- httpx poster


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("exc_type", "sent"),
    [
        (httpx.ConnectError, False),
        (httpx.ConnectTimeout, False),
        (httpx.PoolTimeout, False),
        (httpx.ReadTimeout, True),
        (httpx.RemoteProtocolError, True),
    ],
)
async def test_httpx_poster_failures(exc_type: type[httpx.TransportError], sent: bool) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("simulated", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(TransportFailure) as info:
            await HttpxPoster(client).post_json("https://graph.example.test/x", {}, {})
    assert info.value.sent is sent and info.value.name == exc_type.__name__


@pytest.mark.asyncio
async def test_httpx_poster_answer() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(429, json={"error": {"code": 130429}}, headers={"Retry-After": "3"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        answer = await HttpxPoster(client).post_json(
            "https://graph.example.test/x", {"k": "ä"}, {"Authorization": "Bearer t"}
        )
    assert answer == JsonAnswer(status=429, data={"error": {"code": 130429}}, retry_after="3")
    assert json.loads(seen[0].content) == {"k": "ä"} and seen[0].headers["authorization"] == "Bearer t"
