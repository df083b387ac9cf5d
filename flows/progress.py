"""Progress bars with images per second (rich, which Prefect already brings)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _ImagesPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:>7.0f} img/s" if speed else "      - img/s")


@contextmanager
def image_progress(
    description: str, total: int, enabled: bool = True
) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)``; the bar shows images done, images/s and time left."""
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        _ImagesPerSecond(), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=not enabled,
    )
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
