"""What the app does once at start-up in a server process."""

from __future__ import annotations

import gc

from pforte.app import GC_GEN0_THRESHOLD, create_app
from pforte.bootstrap import build_services


async def test_a_server_process_freezes_what_start_up_built_and_an_embedded_app_does_not(settings):
    services = build_services(settings)
    gc.unfreeze()
    before = gc.get_threshold()
    try:
        embedded = create_app(services, manage_lifespan=False)
        async with embedded.router.lifespan_context(embedded):
            assert gc.get_freeze_count() == 0
            assert gc.get_threshold() == before
        server = create_app(services, manage_lifespan=False, server_gc=True)
        async with server.router.lifespan_context(server):
            assert gc.get_freeze_count() > 10_000  # modules, metadata, settings: all start-up built
            assert gc.get_threshold() == (GC_GEN0_THRESHOLD, *before[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        await services.stop()
