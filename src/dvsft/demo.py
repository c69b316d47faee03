"""`dvsft demo`: the embedded default experiment."""

from __future__ import annotations

import typer


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    @app.command()
    def demo() -> None:
        """Run the embedded DV-SFT vs SFT experiment (CPU, minutes)."""
        raise typer.Exit(code=_not_built())


def _not_built() -> int:
    print("dvsft demo is not built yet.")
    return 1
