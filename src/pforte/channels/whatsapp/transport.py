"""JSON POST transports for the Graph API send path.

A failed request falls into one of two classes, and callers must treat them differently:

* ``sent=False``: the request cannot have reached the server (no connection could be made, or
  none became free in time). Retrying is safe.
* ``sent=True``: the request may have been written before the failure (a dropped connection, a
  timeout while waiting for the answer). Meta may have accepted the message, so resending could
  deliver it twice; a send in this state goes to human review instead.

Retrying a "maybe sent" message can give a patient the same message twice; dropping a failed
send without retry or review loses it. So "not sent" is retried, "maybe sent" is reviewed, and
when in doubt a failure counts as ``sent=True`` (a needless review is the cheaper mistake).

``HttpxPoster`` serves tests and the simulator; ``AiohttpPoster`` is the cheaper production path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import httpx

# httpx errors raised before any byte of the request left.
_HTTPX_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError)

# aiohttp errors raised before any byte of the request left. ClientConnectorError covers refused
# connections, DNS, proxy and TLS failures (it must be checked before its base ClientOSError);
# ConnectionTimeoutError is the connect timeout, which also covers waiting for a pooled
# connection; InvalidURL is raised before connecting.
_AIOHTTP_NOT_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.InvalidURL)

_JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class JsonAnswer:
    """An HTTP answer: status, parsed JSON body (None if not JSON) and the Retry-After header."""

    status: int
    data: Any
    retry_after: str | None


class TransportFailure(Exception):
    """The request failed without an HTTP answer; ``sent`` says whether it may have reached the server."""

    def __init__(self, name: str, *, sent: bool) -> None:
        super().__init__(name)
        self.name = name
        self.sent = sent


class JsonPoster(Protocol):
    """Posts a JSON body and returns the answer, or raises ``TransportFailure``."""

    async def post_json(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> JsonAnswer:
        """POST ``body`` as JSON to ``url``."""
        ...


def httpx_failure(exc: httpx.TransportError) -> TransportFailure:
    """Classify an httpx transport error."""
    return TransportFailure(type(exc).__name__, sent=not isinstance(exc, _HTTPX_NOT_SENT))


def aiohttp_failure(exc: BaseException) -> TransportFailure:
    """Classify an aiohttp (or timeout/OS) error raised while posting."""
    return TransportFailure(type(exc).__name__, sent=not isinstance(exc, _AIOHTTP_NOT_SENT))


def httpx_json(resp: httpx.Response) -> Any:
    """The parsed JSON body of an httpx response, or None if it is not JSON."""
    try:
        return resp.json()
    except ValueError:
        return None


class HttpxPoster:
    """A JsonPoster on an ``httpx.AsyncClient`` (tests, simulator)."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    async def post_json(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> JsonAnswer:
        """POST ``body`` as JSON to ``url``."""
        try:
            resp = await self._http.post(url, json=body, headers=headers)
        except httpx.TransportError as exc:
            raise httpx_failure(exc) from None
        return JsonAnswer(
            status=resp.status_code, data=httpx_json(resp), retry_after=resp.headers.get("retry-after")
        )


class AiohttpPoster:
    """A JsonPoster on a pooled ``aiohttp.ClientSession``, created on first use in the running loop."""

    def __init__(self, *, timeout: float, limit: int = 100) -> None:
        # The connect timeout (which includes waiting for a free pooled connection) must end well
        # before the total timeout: a request still connecting when the total timeout fires fails
        # with a plain timeout, which cannot be told apart from one while waiting for the answer.
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=timeout / 2)
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None or session.closed:
            # Keep-alive below the common server value of 5 s, so we never reuse a connection the
            # server is about to close (a POST on such a connection would end as "maybe sent").
            connector = aiohttp.TCPConnector(limit=self._limit, keepalive_timeout=4.0)
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
                headers=_JSON_HEADERS,
            )
            self._session = session
        return session

    async def post_json(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> JsonAnswer:
        """POST ``body`` as JSON to ``url``."""
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        session = self._get_session()
        try:
            # aiohttp never retries a POST by itself; redirects are not followed (a 3xx is an error).
            async with session.post(url, data=payload, headers=headers, allow_redirects=False) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except (aiohttp.ClientError, OSError) as exc:  # OSError includes TimeoutError (total timeout)
            raise aiohttp_failure(exc) from None
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        return JsonAnswer(status=status, data=data, retry_after=retry_after)

    async def close(self) -> None:
        """Close the session and its connections."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()
