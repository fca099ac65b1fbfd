"""Progress bars for passes (rich), on stderr so they pass through doit untouched."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def step_progress(*extra_fields: str) -> Progress:
    """A bar for N steps; ``extra_fields`` (e.g. "loss") are shown after the count."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *[TextColumn(f"{name} {{task.fields[{name}]}}") for name in extra_fields],
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    return Progress(*columns, console=Console(stderr=True))
