"""A progress bar for long work: rich on a terminal, a plain line every few seconds otherwise
(logs of CI jobs and Slurm batch runs)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _Bar:
    def __init__(
        self, progress: Progress | None, task: int | None, label: str, total: int, silent: bool = False
    ) -> None:
        self.progress, self.task, self.label, self.total, self.silent = progress, task, label, total, silent
        self.last_print = 0.0

    def update(self, completed: int, **fields: float) -> None:
        if self.silent:
            return
        text = self._fields(fields)
        if self.progress is not None:
            self.progress.update(self.task, completed=completed, fields=text)
        elif time.monotonic() - self.last_print > 10 or completed == self.total:
            self.last_print = time.monotonic()
            print(f"{self.label} {completed}/{self.total} {text}", flush=True)

    def log(self, message: str) -> None:
        if self.silent:
            return
        if self.progress is not None:
            self.progress.console.print(message)
        else:
            print(message, flush=True)

    @staticmethod
    def _fields(fields: dict[str, float]) -> str:
        parts = []
        if "loss" in fields:
            parts.append(f"loss {fields['loss']:.3f}")
        if fields.get("tokens_per_s"):
            parts.append(f"{fields['tokens_per_s']:,.0f} tok/s")
        if fields.get("mfu"):
            parts.append(f"MFU {fields['mfu']:.1%}")
        return "  ".join(parts)


@contextmanager
def progress_bar(label: str, total: int, completed: int = 0, enabled: bool = True) -> Iterator[_Bar]:
    """A bar on a terminal, periodic lines otherwise; nothing at all when not enabled (other ranks)."""
    if not enabled:
        yield _Bar(None, None, label, total, silent=True)
        return
    if not sys.stdout.isatty():
        yield _Bar(None, None, label, total)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[fields]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(),
        transient=False,
    )
    with progress:
        task = progress.add_task(label, total=total, completed=completed, fields="")
        yield _Bar(progress, task, label, total)
