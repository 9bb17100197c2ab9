"""Errors and load reports of the data readers.

Every problem with a data file is a `DataError` whose message starts with the file and says what is
wrong with it, so that a user can open that file and fix it. Readers called with ``lenient=True``
skip bad items instead: each skip is counted by reason in a `LoadReport` and emitted as a
`DataWarning`.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field


class DataError(ValueError):
    """A problem with a data file; the message is ``"<path>: <problem>"``."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __str__(self) -> str:
        # Defined here so that subclasses which are also OSErrors keep this message.
        return f"{self.path}: {self.problem}"

    def __reduce__(self):  # picklable across DataLoader worker processes
        return type(self), (self.path, self.problem)


class MissingFileError(DataError, FileNotFoundError):
    """A file or folder that a reader needs does not exist."""


class DataWarning(UserWarning):
    """An item skipped by a lenient reader."""


@dataclass
class LoadReport:
    """What a reader skipped, by reason, and the warnings it emitted.

    `problem` is the one place where readers decide between raising (strict) and skipping
    (lenient), so both modes check exactly the same things.
    """

    source: str
    lenient: bool = False
    skipped: Counter = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)

    def problem(self, reason: str, detail: str, path: str | os.PathLike | None = None) -> None:
        """Raise `DataError` naming `path` (default: the source) or, when lenient, warn and count a skip."""
        error = DataError(self.source if path is None else path, detail)
        if not self.lenient:
            raise error
        self.skipped[reason] += 1
        self.warnings.append(str(error))
        warnings.warn(f"skipped: {error}", DataWarning, stacklevel=3)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())
