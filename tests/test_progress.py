"""core.progress: the one progress bar and the callbacks it hands to library functions."""

from __future__ import annotations

import io

from rich.console import Console

from dvsft.core.progress import progress_bar


def test_counter_advances_its_task_by_one_or_n():
    with progress_bar(enabled=False) as bar:
        advance = bar.counter("items", 10)
        advance()
        advance(3)
        (task,) = bar.tasks
    assert (task.description, task.completed, task.total) == ("items", 4, 10)


def test_position_counts_work_of_an_earlier_run_as_done_not_in_the_rate():
    with progress_bar(enabled=False) as bar:
        update = bar.position("OCR", 0)
        update(7, 12)  # 7 done by an earlier run: the task starts there
        (task,) = bar.tasks
        assert (task.completed, task.total, len(task._progress)) == (7, 12, 0)
        update(9, 12)
    assert task.completed == 9 and [s.completed for s in task._progress] == [2]


def test_a_bar_on_a_file_draws_its_final_state_once_with_the_unit():
    out = io.StringIO()
    with progress_bar(Console(file=out, width=100), unit="pages") as bar:
        bar.counter("rendering", 2)(2)
    text = out.getvalue()
    assert "rendering" in text and "2/2" in text and "pages/s" in text


def test_stages_make_one_task_per_stage_at_its_first_report():
    with progress_bar(enabled=False) as bar:
        advance = bar.stages()
        advance("render", 2, 5)
        advance("perplexity", 1, 3)
        advance("render", 3, 5)
    assert [(t.description, t.completed, t.total) for t in bar.tasks] == [("render", 5, 5), ("perplexity", 1, 3)]
