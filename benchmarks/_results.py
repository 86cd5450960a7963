"""What every benchmark does last: write its results file, with the command that made it, and print it."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


def command_line() -> str:
    """This run's command as it was typed (``python benchmarks/NAME.py ARGS``), to quote in the results."""
    return shlex.join(["python", *sys.argv])


def write_results(out: Path, lines: list[str]) -> None:
    """Write ``lines`` joined by newlines to ``out`` (its folder made if missing), then print them."""
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
