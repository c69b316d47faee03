"""The one progress display of every long command (rich), on stderr.

``progress_bar()`` shows: what is being done, a bar, done/total, the rate, elapsed time and the time
left. ``unit`` names what is counted (``img/s``, ``steps/s``). It is off (``enabled=False``, or
output that is not a terminal when ``enabled=None``) without changing the caller's code: updates
then do nothing, so a log file gets no control characters.

Library functions report progress through plain callbacks; the bar makes them:
``bar.counter(description, total)`` returns ``advance(n=1)`` (so ``bar.counter`` itself is a
``progress(description, total) -> advance`` factory), and ``bar.position(description, total)``
returns ``update(done, total)`` for work that reports how much is done, where the first report may
include work done by an earlier, resumed run (it does not count in the rate); ``bar.stages()``
returns ``advance(stage, n, total)``, one task per stage, made at the stage's first report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def progress_bar(
    console: Any = None,
    *,
    unit: str = "it",
    enabled: bool | None = True,
    transient: bool = False,
) -> Any:
    """A ``rich.progress.Progress`` with dvsft's columns and callbacks (see the module docstring)."""
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

    class Bar(Progress):
        def counter(self, description: str, total: int | None = None) -> Callable[..., None]:
            task = self.add_task(description, total=total)
            return lambda n=1: self.advance(task, n)

        def position(self, description: str, total: int | None = None) -> Callable[[int, int], None]:
            task = self.add_task(description, total=total)
            started = False

            def update(done: int, total: int) -> None:
                nonlocal started
                if not started:  # what an earlier run did must not count in the rate
                    self.reset(task, total=total, completed=done)
                    started = True
                self.update(task, completed=done)

            return update

        def stages(self) -> Callable[[str, int, int], None]:
            counters: dict[str, Callable[..., None]] = {}

            def advance(stage: str, n: int, total: int) -> None:
                if stage not in counters:
                    counters[stage] = self.counter(stage, total)
                counters[stage](n)

            return advance

    console = console or Console(stderr=True)
    if enabled is None:
        enabled = console.is_terminal
    return Bar(
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
