"""Progress on stderr for long commands: one Rich bar (off when stderr is not a terminal)."""

from __future__ import annotations

from persres.cli.app import err


def bar(label: str, unit: str, *fields: str):
    """label, bar, done/total, unit, extra `fields`, speed, ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:.2f} {unit}/s" if task.speed else "")

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit), *map(TextColumn, fields),
                    Speed(), TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal)


class BarReporter:
    """A `persres.eval.runs.Reporter` drawn as one bar: a description, done/total, elapsed, ETA."""

    def __init__(self, label: str, unit: str, enabled: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn(f"[bold]{label}[/] {{task.description}}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=err, disable=not enabled or not err.is_terminal)
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        self.task = self.progress.add_task("", total=None)
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def start(self, total: int) -> None:
        self.progress.update(self.task, total=total)

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)

    def describe(self, text: str) -> None:
        self.progress.update(self.task, description=text[:60])


class StatusReporter:
    """A `persres.eval.runs.Reporter` drawn as one spinner line saying what runs now."""

    def __init__(self, text: str):
        self.status = err.status(text)

    def __enter__(self):
        self.status.__enter__()
        return self

    def __exit__(self, *exc):
        return self.status.__exit__(*exc)

    def start(self, total: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def describe(self, text: str) -> None:
        self.status.update(text)
