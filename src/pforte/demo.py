"""``pforte demo``: SQLite, a demo organisation, an admin, a WhatsApp number on the built-in simulator.

Two servers in one process: the inbox on ``port`` and the simulated Cloud API with its "patient
phone" page on ``port + 1``. The simulator keeps its state in memory, so the number, template and a
demo patient are registered with it on every start; pforte's own data persists in the data dir.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets

import uvicorn
from sqlalchemy import select

from pforte import migrate
from pforte.app import create_app
from pforte.audit.service import SYSTEM
from pforte.bootstrap import build_services
from pforte.channels import service as channels
from pforte.channels.models import Channel
from pforte.channels.simulator import SimulatorConfig, create_simulator_app
from pforte.config import Settings
from pforte.conversations.models import MessageTemplate
from pforte.crypto import signing
from pforte.orgs import service as orgs
from pforte.privacy import service as privacy
from pforte.privacy import texts as privacy_texts
from pforte.staff import service as staff

DEMO_PNID = "100000000000001"
DEMO_DISPLAY = "+49 30 9999 0000"
TEMPLATES = [
    ("termin_erinnerung", "de", "Guten Tag {{1}}, bitte melden Sie sich bei uns wegen Ihres Termins.", 1),
    ("appointment_reminder", "en", "Hello {{1}}, please get in touch about your appointment.", 1),
]


def _demo_secrets(settings: Settings) -> dict[str, str]:
    """Credentials of the demo, created once and kept (0600) in the data directory."""
    path = settings.data_dir / "demo.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    values = {
        "admin_email": "admin@demo.pforte.test",
        "admin_password": secrets.token_urlsafe(9),
        "access_token": "demo-" + secrets.token_urlsafe(24),
        "app_secret": secrets.token_urlsafe(24),
        "verify_token": secrets.token_urlsafe(16),
    }
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(values, fh)
    return values


async def run_demo(settings: Settings) -> None:
    """Migrate, seed, wire pforte and the simulator to each other, serve both until stopped."""
    sim_port = settings.port + 1
    sim_url = f"http://{settings.host}:{sim_port}"
    graph_url = sim_url
    await asyncio.to_thread(migrate.upgrade, settings.effective_database_url)  # Alembic runs its own loop
    creds = _demo_secrets(settings)
    services = build_services(settings)
    async with services.db.transaction() as session:
        now = services.clock.now()
        org = await orgs.find_by_slug(session=session, slug="demo")
        if org is None:
            org = await orgs.create(
                session=session, keys=services.keys, name="Demo-Klinik", slug="demo", now=now
            )
            admin = await staff.create(
                session=session,
                org_id=org.id,
                email=creds["admin_email"],
                display_name="Demo Admin",
                password=creds["admin_password"],
                role="admin",
                now=now,
            )
            await session.flush()
            # A signing key owned by the admin, so checkpoints and signed exports work from the start.
            await signing.create(
                session, services.keys, org_id=org.id, owner_id=admin.id, now=now, actor=SYSTEM
            )
            for name, lang, body, n in TEMPLATES:
                session.add(
                    MessageTemplate(
                        org_id=org.id, name=name, language=lang, body=body, param_count=n, created_at=now
                    )
                )
            # The demo shows the whole privacy dialogue: notice first, then the consent buttons.
            await privacy.publish_notice(
                session,
                org_id=org.id,
                body_de=privacy_texts.DEFAULT_NOTICE_DE.format(org=org.name),
                body_en=privacy_texts.DEFAULT_NOTICE_EN.format(org=org.name),
                actor=SYSTEM,
                now=now,
            )
        ch = (
            await session.execute(select(Channel).where(Channel.phone_number_id == DEMO_PNID))
        ).scalar_one_or_none()
        if ch is None:
            ch = await channels.add_whatsapp(
                session=session,
                keys=services.keys,
                org=org,
                name="Demo-Station",
                phone_number_id=DEMO_PNID,
                display_phone_number=DEMO_DISPLAY,
                access_token=creds["access_token"],
                app_secret=creds["app_secret"],
                verify_token=creds["verify_token"],
                graph_base_url=graph_url,
                now=now,
            )
        elif ch.graph_base_url != graph_url:
            ch.graph_base_url = graph_url
        channel_id = ch.id
    sim_app = create_simulator_app(SimulatorConfig(public_base_url=sim_url))
    sim = sim_app.state.sim
    sim.add_number(
        phone_number_id=DEMO_PNID,
        display_phone_number=DEMO_DISPLAY,
        access_token=creds["access_token"],
        app_secret=creds["app_secret"],
        webhook_url=f"{settings.base_url}/webhooks/whatsapp/{channel_id}",
        verify_token=creds["verify_token"],
    )
    for name, lang, body, n in TEMPLATES:
        sim.add_template(DEMO_PNID, name, lang, body=body, param_count=n)
    # A fixed BSUID: the simulator forgets its users on restart, pforte must still recognise her.
    sim.add_user(name="Erika Mustermann", wa_id="4915112345678", user_id="DE.4915112345678001")
    pforte_app = create_app(services)
    servers = [
        uvicorn.Server(
            uvicorn.Config(
                pforte_app,
                host=settings.host,
                port=settings.port,
                access_log=False,
                log_config=None,
                lifespan="on",
            )
        ),
        uvicorn.Server(
            uvicorn.Config(
                sim_app, host=settings.host, port=sim_port, access_log=False, log_config=None, lifespan="on"
            )
        ),
    ]
    print(
        "\n  pforte demo is running\n"
        f"  Inbox (staff):          {settings.base_url}/\n"
        f"  Patient phone (sim):    {sim_url}/phone\n"
        f"  Login:                  {creds['admin_email']}  /  {creds['admin_password']}\n"
        f"  Data directory:         {settings.data_dir.resolve()}\n"
        "  Stop with Ctrl+C.\n",
        flush=True,
    )
    await asyncio.gather(*(s.serve() for s in servers))
