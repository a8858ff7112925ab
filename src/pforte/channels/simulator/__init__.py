"""A faithful local simulator of the WhatsApp Cloud API (Graph API + webhooks + a patient phone page).

app = create_simulator_app(SimulatorConfig(), clock=FakeClock(), webhook_transport=...)
sim: Simulator = app.state.sim
"""

from pforte.channels.simulator.app import create_simulator_app, run
from pforte.channels.simulator.config import SimulatorConfig
from pforte.channels.simulator.delivery import WebhookAttempt, WebhookDelivery
from pforte.channels.simulator.payloads import GraphError
from pforte.channels.simulator.state import SimMedia, SimMessage, SimNumber, SimTemplate, Simulator, SimUser

__all__ = [
    "GraphError",
    "SimMedia",
    "SimMessage",
    "SimNumber",
    "SimTemplate",
    "SimUser",
    "Simulator",
    "SimulatorConfig",
    "WebhookAttempt",
    "WebhookDelivery",
    "create_simulator_app",
    "run",
]
