"""``pforte compliance report``: the DSK catalog row by row, from this instance's own state."""

from __future__ import annotations

import typer

compliance_app = typer.Typer(no_args_is_help=True, help="The DSK compliance report")
