"""Progress of long work as a user sees it: a rich bar with an ETA on a terminal, a plain line every
few seconds otherwise (logs, CI, pipes), nothing when switched off."""

from __future__ import annotations

import sys
import time


class Progress:
    """``advance(units)`` towards ``total`` units of work named ``what``; use as a context manager."""

    def __init__(self, what: str, total: float, enabled: bool = True, every_s: float = 10.0, stream=None):
        self.what, self.total, self.done = what, max(float(total), 1e-9), 0.0
        self.stream = stream or sys.stderr
        self.enabled, self.every_s = enabled, every_s
        self.tty = enabled and getattr(self.stream, "isatty", lambda: False)()
        self._bar = self._task = None
        self._t0 = self._last = time.monotonic()

    def __enter__(self) -> Progress:
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, Progress as Bar, TaskProgressColumn, TextColumn, TimeRemainingColumn

            self._bar = Bar(TextColumn(self.what), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                            console=Console(file=self.stream), transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.what, total=self.total)
        return self

    def advance(self, units: float = 1.0, note: str = "") -> None:
        self.done = min(self.total, self.done + units)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, description=f"{self.what} {note}".strip())
            return
        now = time.monotonic()
        if now - self._last >= self.every_s or self.done >= self.total:
            self._last = now
            frac = self.done / self.total
            eta = (now - self._t0) * (1 - frac) / frac if frac > 0 else float("nan")
            left = f", about {eta:.0f} s left" if frac < 1 and eta == eta else ""
            print(f"medfound: {self.what}: {100 * frac:.0f} %{left}{(' (' + note + ')') if note else ''}",
                  file=self.stream, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
