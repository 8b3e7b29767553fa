"""The one exception type for bad user input.

Anything raised as :class:`InputError` reaches the user as exit code 2 and a single stderr line
``medfound: error: PATH: PROBLEM``; every other exception is a bug (exit code 1).
"""

from __future__ import annotations

import os


class InputError(Exception):
    """A user file or argument that medfound cannot use, with the path it concerns."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(self.message)

    @property
    def message(self) -> str:
        problem = " ".join(str(self.problem).split())  # always one line
        return f"{self.path}: {problem}" if self.path else problem
