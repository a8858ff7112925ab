"""``pforte retention`` commands."""

from __future__ import annotations

import typer

retention_app = typer.Typer(no_args_is_help=True, help="Retention rules, holds and the sweeper")
