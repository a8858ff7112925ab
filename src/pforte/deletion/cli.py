"""``pforte delete`` commands."""

from __future__ import annotations

import typer

delete_app = typer.Typer(
    no_args_is_help=True, help="Delete messages, attachments, conversations, contacts, organisations"
)
