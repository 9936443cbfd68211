"""Run passes by name, in order, with verification, timing and IR dumps.

    result = run_pipeline(graph, ["canonicalize"], verify=True, dump_dir="dumps/")
    result.graph, result.timings        # {"canonicalize": 0.012}

With `dump_dir` (or the `MXC_DUMP_IR` flag) the IR is written after capture as
`00-capture.mxir` and after pass k as `NN-name.mxir`, so a regression is found by diffing
two dumps. With `verify` (or the `MXC_DEBUG` flag) the verifier runs after every pass and a
broken invariant is reported at the pass that broke it; the failing pass's input IR and
the pass list are then written next to the dumps as a reproducer.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..ir import Graph, VerificationError, flags, verify as verify_graph
from .calibrate import calibrate
from .canonicalize import canonicalize
from .fold import fold
from .fuse import fuse
from .layout import layout
from .quantize import quantize
from .reorder import reorder
from .smooth import smooth
from .tune import tune

Pass = Callable[..., Graph]

#: Every pass by name. A pass is `fn(graph, **options) -> graph`.
PASSES: dict[str, Pass] = {
    "canonicalize": canonicalize,
    "calibrate": calibrate,
    "quantize": quantize,
    "tune": tune,
    "smooth": smooth,
    "reorder": reorder,
    "fold": fold,
    "layout": layout,
    "fuse": fuse,
}


class PassError(RuntimeError):
    """A pass failed or left the graph broken; the message names the pass and the reproducer."""


@dataclass
class PipelineResult:
    graph: Graph
    timings: dict[str, float] = field(default_factory=dict)
    dumps: list[Path] = field(default_factory=list)


def dump(graph: Graph, directory: str | os.PathLike, index: int, name: str) -> Path:
    """Write `graph`'s text as `NN-name.mxir` in `directory` (atomically); return the path."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    target = path / f"{index:02d}-{name}.mxir"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(str(graph))
    tmp.replace(target)
    return target


def run_pipeline(
    graph: Graph,
    names: list[str],
    *,
    options: dict[str, dict[str, Any]] | None = None,
    verify: bool | None = None,
    dump_dir: str | os.PathLike | None = None,
    passes: dict[str, Pass] | None = None,
) -> PipelineResult:
    """Run the passes `names` in order on `graph` (see the module docstring)."""
    table = PASSES if passes is None else passes
    unknown = [n for n in names if n not in table]
    if unknown:
        raise PassError(f"unknown pass(es) {unknown}; expected names from {sorted(table)}")
    verify = flags.DEBUG.get() if verify is None else verify
    dump_dir = dump_dir if dump_dir is not None else flags.DUMP_IR.get()
    result = PipelineResult(graph)
    if verify:
        verify_graph(graph)
    if dump_dir:
        result.dumps.append(dump(graph, dump_dir, 0, "capture"))
    for k, name in enumerate(names, start=1):
        start = time.perf_counter()
        try:
            new = table[name](result.graph, **(options or {}).get(name, {}))
            if verify:
                verify_graph(new)
        except (VerificationError, Exception) as e:
            where = _reproducer(result.graph, names[k - 1 :], dump_dir)
            raise PassError(f"pass {name!r} failed on graph @{graph.name}: {e}{where}") from e
        result.timings[name] = time.perf_counter() - start
        result.graph = new
        if dump_dir:
            result.dumps.append(dump(new, dump_dir, k, name))
    return result


def _reproducer(graph: Graph, remaining: list[str], dump_dir: str | os.PathLike | None) -> str:
    if not dump_dir:
        return "\n(set dump_ir= or MXC_DUMP_IR to write a reproducer)"
    path = Path(dump_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "reproducer.mxir").write_text(str(graph))
    (path / "reproducer.passes").write_text("\n".join(remaining) + "\n")
    return f"\nreproducer: {path / 'reproducer.mxir'} with passes {remaining}"
