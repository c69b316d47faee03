"""`dvsft compare`: every method trained and scored on the same embedded data."""

from __future__ import annotations

import typer


def register_compare(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command()
    def compare() -> None:
        """Train every method on the same embedded data and compare them (not built yet)."""
        raise typer.Exit(code=1)
