"""`dvsft prepare`: convert public dataset layouts into word records with conversations."""

from __future__ import annotations

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Add `prepare` to the app."""
