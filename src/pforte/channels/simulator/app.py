"""HTTP edge of the simulator: Graph API routes, media download, control API, phone page, ``run``.

Every ``GraphError`` raised by the simulator is rendered here, once, as Meta's error envelope.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import UploadFile
from starlette.staticfiles import StaticFiles

from pforte.channels.simulator.config import SimulatorConfig
from pforte.channels.simulator.payloads import GraphError
from pforte.channels.simulator.phone import PhoneFormError, build_phone_router, phone_error_response
from pforte.channels.simulator.state import Simulator
from pforte.clock import Clock
from pforte.web.security import NO_TELEMETRY

STATIC_DIR = Path(__file__).parent / "static"
_VERSION_RE = re.compile(r"^v\d+\.\d+$")


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _graph_error(error: GraphError) -> JSONResponse:
    headers = {"WWW-Authenticate": 'OAuth "Facebook Platform" "invalid_token"'} if error.code == 190 else None
    return JSONResponse(error.body(), status_code=error.http_status, headers=headers)


async def _json_body(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError as exc:
        raise GraphError(100, "The request body is not valid JSON.") from exc


def _check_path_version(sim: Simulator, version: str) -> None:
    if not _VERSION_RE.match(version):
        raise GraphError(2500, "Unknown path components.")
    sim.check_version(version)


def create_simulator_app(
    config: SimulatorConfig | None = None,
    *,
    clock: Clock | None = None,
    webhook_transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """Build the simulator ASGI app; the Simulator is ``app.state.sim``."""
    sim = Simulator(config or SimulatorConfig(), clock=clock, webhook_transport=webhook_transport)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await sim.start()
        try:
            yield
        finally:
            await sim.stop()

    app = FastAPI(
        title="pforte WhatsApp Cloud API simulator",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        telemetry=NO_TELEMETRY,
    )
    app.state.sim = sim

    @app.exception_handler(GraphError)
    async def on_graph_error(_request: Request, exc: GraphError) -> JSONResponse:
        sim.error_counts[exc.code] += 1
        return _graph_error(exc)

    @app.exception_handler(PhoneFormError)
    async def on_phone_error(_request: Request, exc: PhoneFormError) -> JSONResponse:
        return phone_error_response(exc)

    app.mount("/_sim/static", StaticFiles(directory=STATIC_DIR), name="sim_static")
    app.include_router(build_phone_router(sim))
    _add_control_routes(app, sim)
    _add_graph_routes(app, sim)
    return app


def _add_graph_routes(app: FastAPI, sim: Simulator) -> None:
    @app.get("/whatsapp_business/attachments/", name="media_download")
    async def media_download(request: Request) -> Response:
        try:
            media = sim.download(_bearer(request), request.query_params.get("hash", ""))
        except GraphError as exc:
            return _graph_error(exc)
        if media is None:
            return PlainTextResponse("Not Found", status_code=404)
        return Response(
            media.data,
            media_type=media.mime_type,
            headers={"Content-Length": str(media.file_size), "Cache-Control": "no-store"},
        )

    @app.post("/{version}/{phone_number_id}/messages")
    async def send_message(version: str, phone_number_id: str, request: Request) -> JSONResponse:
        _check_path_version(sim, version)
        number = sim.authorize_number(_bearer(request), phone_number_id)
        body = await _json_body(request)
        return JSONResponse(sim.send(number, body))

    @app.post("/{version}/{phone_number_id}/media")
    async def upload_media(version: str, phone_number_id: str, request: Request) -> JSONResponse:
        _check_path_version(sim, version)
        number = sim.authorize_number(_bearer(request), phone_number_id)
        try:
            form = await request.form(max_files=2, max_fields=20)
        except Exception as exc:  # malformed multipart
            raise GraphError(100, "The request must be multipart/form-data.") from exc
        upload = form.get("file")
        data = file_mime = filename = None
        if isinstance(upload, UploadFile):
            data = await upload.read()
            file_mime = upload.content_type
            filename = upload.filename
        type_field = form.get("type")
        product = form.get("messaging_product")
        result = sim.upload_media(
            number,
            messaging_product=product if isinstance(product, str) else None,
            data=data,
            file_mime=file_mime,
            type_field=type_field if isinstance(type_field, str) else None,
            filename=filename,
        )
        await form.close()
        return JSONResponse(result)

    @app.get("/{version}/{object_id}")
    async def get_object(version: str, object_id: str, request: Request) -> JSONResponse:
        _check_path_version(sim, version)
        token = _bearer(request)
        if object_id in sim.numbers:
            number = sim.authorize_number(token, object_id)
            return JSONResponse(
                {
                    "verified_name": number.verified_name,
                    "display_phone_number": number.display_phone_number,
                    "id": number.phone_number_id,
                    "quality_rating": "GREEN",
                }
            )
        info = sim.media_info(
            token,
            object_id,
            phone_number_id=request.query_params.get("phone_number_id"),
            base_url=str(request.base_url),
        )
        return JSONResponse(info)

    @app.delete("/{version}/{object_id}")
    async def delete_object(version: str, object_id: str, request: Request) -> JSONResponse:
        _check_path_version(sim, version)
        result = sim.delete_media(
            _bearer(request), object_id, phone_number_id=request.query_params.get("phone_number_id")
        )
        return JSONResponse(result)


def _add_control_routes(app: FastAPI, sim: Simulator) -> None:
    """A small JSON API to set up and drive a standalone simulator (no auth: bind it to localhost)."""

    async def payload(request: Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise _BadRequest("body must be a JSON object")
        return data

    @app.exception_handler(_BadRequest)
    async def on_bad_request(_request: Request, exc: _BadRequest) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    def need(data: dict[str, Any], key: str) -> str:
        value = data.get(key)
        if not isinstance(value, str) or not value:
            raise _BadRequest(f"{key} is required")
        return value

    def number_or_404(pnid: str) -> None:
        if pnid not in sim.numbers:
            raise _BadRequest("unknown phone_number_id", 404)

    def user_or_404(user_id: str) -> Any:
        if user_id not in sim.users:
            raise _BadRequest("unknown user", 404)
        return sim.users[user_id]

    @app.get("/_sim/numbers")
    async def list_numbers() -> JSONResponse:
        return JSONResponse([n.public() for n in sim.numbers.values()])

    @app.post("/_sim/numbers")
    async def create_number(request: Request) -> JSONResponse:
        data = await payload(request)
        try:
            number = sim.add_number(
                phone_number_id=need(data, "phone_number_id"),
                display_phone_number=need(data, "display_phone_number"),
                access_token=need(data, "access_token"),
                app_secret=need(data, "app_secret"),
                webhook_url=data.get("webhook_url"),
                verify_token=data.get("verify_token"),
                rate_limit_per_s=int(data.get("rate_limit_per_s", 80)),
                storage=data.get("storage", "default"),
                waba_id=data.get("waba_id"),
                verified_name=str(data.get("verified_name", "Pforte Test")),
            )
        except (TypeError, ValueError) as exc:
            raise _BadRequest(str(exc)) from exc
        return JSONResponse(number.public(), status_code=201)

    @app.post("/_sim/numbers/{phone_number_id}/verify")
    async def verify_number(phone_number_id: str) -> JSONResponse:
        number_or_404(phone_number_id)
        try:
            ok = await sim.verify_webhook(phone_number_id)
        except httpx.HTTPError:
            ok = False
        return JSONResponse({"verified": ok})

    @app.post("/_sim/templates")
    async def create_template(request: Request) -> JSONResponse:
        data = await payload(request)
        pnid = need(data, "phone_number_id")
        number_or_404(pnid)
        count = data.get("param_count")
        template = sim.add_template(
            pnid,
            need(data, "name"),
            need(data, "language"),
            str(data.get("body", "Hallo {{1}}")),
            int(count) if count is not None else None,
            category=str(data.get("category", "utility")),
            quick_replies=[str(q) for q in data.get("quick_replies", [])],
        )
        return JSONResponse(
            {"name": template.name, "language": template.language, "param_count": template.param_count},
            status_code=201,
        )

    @app.get("/_sim/numbers/{phone_number_id}/messages")
    async def number_messages(phone_number_id: str, request: Request) -> JSONResponse:
        number_or_404(phone_number_id)
        user_id = request.query_params.get("user_id")
        user = user_or_404(user_id) if user_id else None
        return JSONResponse([m.public() for m in sim.business_messages(phone_number_id, user)])

    @app.get("/_sim/users")
    async def list_users() -> JSONResponse:
        return JSONResponse([u.public() for u in sim.users.values()])

    @app.post("/_sim/users")
    async def create_user(request: Request) -> JSONResponse:
        data = await payload(request)
        user = sim.add_user(
            name=need(data, "name"),
            wa_id=data.get("wa_id") or None,
            user_id=data.get("user_id") or None,
            username=data.get("username") or None,
        )
        return JSONResponse(user.public(), status_code=201)

    @app.post("/_sim/users/{user_id}/send")
    async def user_send(user_id: str, request: Request) -> JSONResponse:
        user = user_or_404(user_id)
        data = await payload(request)
        pnid = need(data, "phone_number_id")
        number_or_404(pnid)
        wamid = await sim.patient_send_text(
            user=user, phone_number_id=pnid, text=need(data, "text"), context_id=data.get("context_id")
        )
        return JSONResponse({"wamid": wamid}, status_code=201)

    @app.post("/_sim/users/{user_id}/read")
    async def user_read(user_id: str, request: Request) -> JSONResponse:
        user = user_or_404(user_id)
        data = await payload(request)
        pnid = need(data, "phone_number_id")
        number_or_404(pnid)
        return JSONResponse({"read": await sim.patient_read(user=user, phone_number_id=pnid)})

    @app.get("/_sim/errors")
    async def errors() -> JSONResponse:
        """Synchronous Graph errors answered so far, by code (e.g. how many 130429)."""
        return JSONResponse({str(code): n for code, n in sorted(sim.error_counts.items())})

    @app.get("/_sim/webhooks")
    async def webhooks() -> JSONResponse:
        return JSONResponse(
            [
                {
                    "id": d.id,
                    "phone_number_id": d.phone_number_id,
                    "updates": d.update_count,
                    "state": d.state,
                    "status_codes": d.status_codes,
                    "attempted_at": [a.at.isoformat() for a in d.attempts],
                }
                for d in sim.webhook_log
            ]
        )

    @app.get("/_sim/health")
    async def health() -> JSONResponse:
        return JSONResponse({"ok": True, **sim.log_summary()})


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def run(host: str = "127.0.0.1", port: int = 8090, config: SimulatorConfig | None = None) -> None:
    """Serve a standalone simulator with uvicorn (``pforte simulator``)."""
    import uvicorn

    uvicorn.run(create_simulator_app(config or SimulatorConfig()), host=host, port=port, log_level="info")
