"""What every benchmark does with its finished section: print it, and append it to
benchmarks/RESULTS.md unless told not to (`--no-write`)."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def publish(text: str, write: bool = True) -> None:
    """Print `text` and, when `write`, append it to RESULTS.md after a blank line."""
    print(text)
    if write:
        with RESULTS.open("a") as f:
            f.write("\n" + text)
