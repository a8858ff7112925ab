"""``pforte backup`` commands."""

from __future__ import annotations

import typer

backup_app = typer.Typer(no_args_is_help=True, help="Encrypted backups to the controller's age public key")
