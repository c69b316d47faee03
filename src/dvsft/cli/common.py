"""What the command modules share: list options, option dataclasses and the one way a command stops on an error."""

from __future__ import annotations

import sys
from dataclasses import fields
from typing import Any, NoReturn, TypeVar

import typer

T = TypeVar("T")


def split_list(value: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (a comma-separated option)."""
    return [v.strip() for v in value.split(",") if v.strip()]


def fail(message: object, console: Any = None, code: int = 2) -> NoReturn:
    """Print ``error: MESSAGE`` (on stderr unless ``console`` is given) and exit with ``code``.

    An exception is written as the app writes the errors no command caught (:func:`dvsft.cli.one_line`).
    Called while an exception is handled and ``dvsft --debug`` was given, it re-raises that exception.
    """
    from rich.console import Console
    from rich.markup import escape

    from dvsft.cli import debug_enabled, one_line

    if debug_enabled() and sys.exc_info()[0] is not None:
        raise  # noqa: PLE0704 - --debug: the traceback of the error being handled
    text = one_line(message) if isinstance(message, BaseException) else str(message)
    console = console or Console(stderr=True, soft_wrap=True)
    console.print(f"[red]error:[/red] {escape(text)}", soft_wrap=True)  # one line, however narrow the terminal
    raise typer.Exit(code)


def from_params(cls: type[T], params: dict[str, Any], **overrides: Any) -> T:
    """The dataclass ``cls`` from a command's options of the same names (``ctx.params``; ``overrides`` win)."""
    return cls(**{f.name: params[f.name] for f in fields(cls) if f.name in params} | overrides)  # type: ignore[arg-type]
