"""``pforte keys`` commands."""

from __future__ import annotations

import typer

keys_app = typer.Typer(no_args_is_help=True, help="Key-encryption keys: status and rotation")
