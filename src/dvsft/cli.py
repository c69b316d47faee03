"""The `dvsft` command line: each pipeline stage registers its own commands."""

from __future__ import annotations

import typer

from dvsft import __version__

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    help="dvsft: direct vision supervision for multimodal LLMs.",
)
bench_app = typer.Typer(no_args_is_help=True, help="Performance benchmarks (ratios against a baseline in one run).")
app.add_typer(bench_app, name="bench")


def _register_all() -> None:
    # Command modules import heavy libraries (torch, transformers) inside their functions,
    # so `dvsft --help` stays fast.
    from dvsft import demo
    from dvsft.analysis import commands as analysis_commands
    from dvsft.data import commands as data_commands
    from dvsft.evaluation import commands as evaluation_commands
    from dvsft.labels import commands as label_commands
    from dvsft.labels import ocr_commands
    from dvsft.related import commands as related_commands
    from dvsft.training import bench_commands as training_bench_commands
    from dvsft.training import commands as training_commands

    for module in (
        label_commands,
        ocr_commands,
        data_commands,
        training_commands,
        training_bench_commands,
        evaluation_commands,
        analysis_commands,
        related_commands,
        demo,
    ):
        module.register(app, bench_app)


@app.command()
def version() -> None:
    """Print the dvsft version."""
    print(__version__)


_register_all()


if __name__ == "__main__":
    app()
