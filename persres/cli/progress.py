"""Progress on stderr for long commands: one Rich bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import time

from persres.cli.root import err


class LineProgress:
    """What `bar` gives where stderr is not a terminal (a log, a pipe, CI): one plain line per
    tenth of the work done and at least one a minute, so a long run is never silent."""

    EVERY_S = 60.0

    def __init__(self, label: str, unit: str):
        self.label, self.unit = label, unit
        self.tasks: dict[int, dict] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        self.tasks[len(self.tasks)] = {"total": total, "done": 0, "fields": fields, "t0": time.monotonic(),
                                       "said_at": time.monotonic(), "tenth": 0}
        return len(self.tasks) - 1

    def update(self, task: int, completed: float | None = None, advance: float = 0, total: float | None = None, **fields) -> None:
        t = self.tasks[task]
        if total is not None:
            t["total"] = total
        t["fields"].update(fields)
        t["done"] = (t["done"] if completed is None else completed) + advance
        tenth = int(10 * t["done"] / t["total"]) if t["total"] else 0
        now = time.monotonic()
        if tenth > t["tenth"] or now - t["said_at"] >= self.EVERY_S:
            t["tenth"], t["said_at"] = max(tenth, t["tenth"]), now
            extra = " ".join(f"{k} {v}" for k, v in t["fields"].items() if v not in ("", None))
            total = f"/{t['total']:g}" if t["total"] else ""
            err.print(f"{self.label} {t['done']:g}{total} {self.unit} {extra} ({now - t['t0']:.0f} s)".replace("  ", " "),
                      markup=False, highlight=False, soft_wrap=True)

    def advance(self, task: int, n: float = 1) -> None:
        self.update(task, advance=n)

    def refresh(self) -> None:
        pass


def bar(label: str, unit: str, *fields: str):
    """label, bar, done/total, unit, extra `fields`, speed, ETA; `LineProgress` where stderr is not a terminal."""
    if not err.is_terminal:
        return LineProgress(label, unit)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Speed(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:.2f} {unit}/s" if task.speed else "")

    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit), *map(TextColumn, fields),
                    Speed(), TimeRemainingColumn(), console=err, transient=True)


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
