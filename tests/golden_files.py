"""Golden IR files shared by the pass tests: `golden_before(directory, case, prepare)` reads a
case's input graph, `check_golden(path, text)` compares a pass's output with its file.

`text` must equal the file at `path`; with MXC_UPDATE_GOLDEN=1 the file is written instead
(a deliberate refresh, to be reviewed like code)."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest

from mxc.ir import Graph, parse, verify
from mxc.ir.flags import UPDATE_GOLDEN


def golden_before(directory: Path, case: str, prepare=lambda g: g) -> tuple[Graph, str]:
    """The graph of `directory/case.before.mxir` given weights by `prepare`, verified, and its
    text, which must be in printed form (so the after file diffs against it line by line)."""
    text = (directory / f"{case}.before.mxir").read_text()
    graph = verify(prepare(parse(text)))
    assert str(graph) == text, "the before file is not in printed form (print it with str(parse(text)))"
    return graph, text


def check_golden(path: Path, text: str) -> None:
    """`text` must equal the file at `path`; with MXC_UPDATE_GOLDEN=1 the file is written instead."""
    if UPDATE_GOLDEN.get():
        path.write_text(text)
        return
    if not path.exists():
        pytest.fail(f"golden file {path} is missing; write it with MXC_UPDATE_GOLDEN=1 and review it")
    want = path.read_text()
    if text != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True), str(path), "got"))
        pytest.fail(f"IR differs from golden {path.name} (MXC_UPDATE_GOLDEN=1 rewrites it):\n{diff}")
