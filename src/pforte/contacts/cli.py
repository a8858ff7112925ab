"""``pforte contact`` commands."""

from __future__ import annotations

import typer

contact_app = typer.Typer(no_args_is_help=True, help="Patients (contacts): data-subject export")
