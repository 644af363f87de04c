"""The progress bar the long-running commands show on stderr (shard, predict): count, rate, time left; nothing when
stderr is not a terminal (logs, CI, tests)."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text


class Rate(ProgressColumn):
    def render(self, task):
        return Text(f"{task.speed or 0:,.0f} img/s")


def progress(label: str) -> Progress:
    console = Console(stderr=True)
    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), Rate(), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal)
