"""``pforte export conversation`` and ``pforte verify-export``: signed conversation exports."""

from __future__ import annotations

import typer

export_app = typer.Typer(no_args_is_help=True, help="Signed conversation exports")


def verify_export() -> None:
    """Check a signed conversation export: signature, key state, every file's hash, completeness."""
    raise typer.Exit(2)
