"""Errors that are the user's to fix. The CLI prints them as one line, without a traceback."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class VerticalError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a pack: where it is and what is wrong."""

    file: Path | str
    message: str
    line: int | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = str(self.file)
        if self.line is not None:
            where += f":{self.line}"
        if self.field:
            where += f": {self.field}"
        return f"{where}: {self.message}"


class PackInvalid(VerticalError):
    """A pack with one or more problems; `problems` lists every one of them."""

    def __init__(self, pack: str, problems: list[Problem]):
        self.pack = pack
        self.problems = problems
        first = problems[0] if problems else "no details"
        more = f" (and {len(problems) - 1} more; run `vertical packs validate {pack}`)" if len(problems) > 1 else ""
        super().__init__(f"{first}{more}")
