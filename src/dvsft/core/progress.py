"""The one progress display of every long command (rich), on stderr.

``progress_bar()`` shows: what is being done, a bar, done/total, the rate, elapsed time and the time
left. ``unit`` names what is counted (``img/s``, ``steps/s``). It is off (``enabled=False``, or
output that is not a terminal when ``enabled=None``) without changing the caller's code: updates
then do nothing, so a log file gets no control characters.
"""

from __future__ import annotations

from typing import Any


def progress_bar(
    console: Any = None,
    *,
    unit: str = "it",
    enabled: bool | None = True,
    transient: bool = False,
) -> Any:
    """A ``rich.progress.Progress`` with dvsft's columns (see the module docstring)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed:.2f} {unit}/s" if task.speed else f"-- {unit}/s")

    console = console or Console(stderr=True)
    if enabled is None:
        enabled = console.is_terminal
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=transient,
    )
