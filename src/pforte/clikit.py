"""What every ``pforte`` sub-command shares: settings, one-line failures, a composition root."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import typer

from pforte.config import Settings, load_settings
from pforte.errors import PforteError

T = TypeVar("T")


def fail(message: str) -> NoReturn:
    """Print ``pforte: message`` to stderr and exit with status 2."""
    typer.echo(f"pforte: {message}", err=True)
    raise typer.Exit(2)


def settings(**overrides: Any) -> Settings:
    """Settings from the environment, with command-line overrides; a bad value fails in one line."""
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except PforteError as exc:
        fail(exc.message)


def run(settings: Settings, fn: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``fn(services)`` with a fresh composition root (no background workers)."""
    from pforte.bootstrap import build_services

    async def _main() -> T:
        services = build_services(settings.model_copy(update={"run_workers": False}))
        try:
            return await fn(services)
        finally:
            await services.stop()

    try:
        return asyncio.run(_main())
    except PforteError as exc:
        fail(exc.message)
