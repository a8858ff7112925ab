"""The WhatsApp Cloud API simulator as its own process, for the load harness.

    .venv/bin/python bench/sim_server.py --port 8090 [--batch 100]

It is ``pforte.channels.simulator.create_simulator_app`` unchanged, plus two read-only bench routes
(single path segment, so they never collide with the Graph routes):

* ``GET /_bench_errors``: ``sim.error_counts``, the synchronous Graph errors answered, by code
  (130429 = throughput limit hit);
* ``GET /_bench_sends?pnid=…``: the simulator's monotonic arrival time of every accepted business
  message of a number (to compute the send rate the provider saw).

The per-recipient pair limit is off (it is not what the outbound scenario measures; 131056 would
otherwise fire once one patient gets more than 45 messages in a burst). Status webhooks of up to
``--batch`` updates share one POST, as Meta does under load.
"""

from __future__ import annotations

import argparse
import logging

import uvicorn
from fastapi import Request
from fastapi.responses import JSONResponse

from pforte.channels.simulator import SimulatorConfig, create_simulator_app


def main() -> None:
    """Serve the simulator until SIGTERM."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8090)
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    app = create_simulator_app(
        SimulatorConfig(public_base_url=base, pair_limit_enabled=False, batch_max=args.batch)
    )
    sim = app.state.sim

    @app.get("/_bench_errors")
    async def errors() -> JSONResponse:
        return JSONResponse({str(k): v for k, v in sim.error_counts.items()})

    @app.get("/_bench_sends")
    async def sends(request: Request) -> JSONResponse:
        pnid = request.query_params.get("pnid")
        return JSONResponse(
            [
                m.created_mono
                for m in sim.messages
                if m.direction == "out" and m.phone_number_id == pnid and m.type != "reaction"
            ]
        )

    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
