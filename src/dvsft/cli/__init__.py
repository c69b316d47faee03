"""The `dvsft` command line: each pipeline stage registers its own commands.

A user error (bad input, a missing file, an invalid option value: ``ValueError`` and ``OSError``) ends the
command with one ``error: ...`` line on stderr and exit code 2; ``dvsft --debug COMMAND`` shows the
traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Any

import typer

from dvsft import __version__
from dvsft.core.accel import name_deepspeed_cpu

USER_ERRORS = (ValueError, OSError)
_state = {"debug": False}


class App(typer.Typer):
    """``typer.Typer`` that turns user errors into one clear line (see the module docstring)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _state["debug"] = False  # set by the --debug option (main)
        name_deepspeed_cpu()  # in this process and the ones it starts, before any library imports DeepSpeed
        try:
            return super().__call__(*args, **kwargs)
        except USER_ERRORS as err:
            if _state["debug"]:
                raise
            print(f"error: {one_line(err)} (dvsft --debug ... shows the traceback)", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)


def one_line(err: BaseException) -> str:
    """The error's message on one line (its type where the message is empty)."""
    text = " ".join(str(err).split())
    if isinstance(err, OSError) and getattr(err, "filename", None) and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return text or type(err).__name__


app = App(
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
    from dvsft.cli import bench, data, eval, experiments, labels, lens, ocr, related, train

    for module in (labels, ocr, data, train, bench, eval, lens, related, experiments):
        module.register(app, bench_app)


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error.")) -> None:
    """dvsft: direct vision supervision for multimodal LLMs."""
    _state["debug"] = debug


def debug_enabled() -> bool:
    """Whether ``--debug`` was given: commands that catch errors themselves re-raise them then."""
    return _state["debug"]


@app.command()
def version() -> None:
    """Print the dvsft version."""
    print(__version__)


_register_all()
