"""``pforte audit``: verify the chain and its signed checkpoints, sign a checkpoint now."""

from __future__ import annotations

import typer

audit_app = typer.Typer(no_args_is_help=True, help="The audit log: verification and signed checkpoints")
