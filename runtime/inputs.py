"""Check a call's tensors against a graph's inputs and bind its size symbols.

    bind_inputs(graph, [ids], device)  ->  {b: 2, s: 7}

Errors name the argument, what was expected and what came:

    InputError: argument 'input_ids' dim 1 (s): expected a size in [1, 512], got 600
"""

from __future__ import annotations

from typing import Sequence

import sympy
import torch

from ..ir import DType, Graph, sym


class InputError(ValueError):
    """A call's inputs do not fit the compiled graph."""


def bind_inputs(graph: Graph, inputs: Sequence[torch.Tensor], device: torch.device) -> dict[sympy.Symbol, int]:
    """The size of every symbol, from the inputs' shapes; checks count, rank, dtype, device, ranges."""
    if len(inputs) != len(graph.inputs):
        names = ", ".join(graph.input_names)
        raise InputError(f"graph @{graph.name} takes {len(graph.inputs)} input(s) ({names}), got {len(inputs)}")
    sizes: dict[sympy.Symbol, int] = {}
    derived: list[tuple[str, int, sympy.Expr, int]] = []
    for node, x in zip(graph.inputs, inputs):
        name, t = node.get("name"), node.types[0]
        if not isinstance(x, torch.Tensor):
            raise InputError(f"argument {name!r}: expected a tensor {t}, got {type(x).__name__}")
        if x.dim() != t.rank:
            raise InputError(f"argument {name!r}: expected rank {t.rank} ({t}), got rank {x.dim()} {list(x.shape)}")
        if isinstance(t.dtype, DType) and x.dtype != t.dtype.torch:
            raise InputError(f"argument {name!r}: expected dtype {t.dtype} ({t.dtype.torch}), got {x.dtype}")
        if x.device.type != device.type:
            raise InputError(f"argument {name!r}: expected a tensor on {device}, got one on {x.device}")
        for axis, (d, n) in enumerate(zip(t.shape, x.shape)):
            if isinstance(d, int):
                if d != n:
                    raise InputError(f"argument {name!r} dim {axis}: expected size {d}, got {n}")
            elif isinstance(d, sympy.Symbol) and d not in sizes:
                sizes[d] = int(n)
            else:
                derived.append((name, axis, d, int(n)))
    for name, axis, d, n in derived:
        want = sympy.sympify(d.xreplace(sizes))
        if not want.is_Integer or int(want) != n:
            raise InputError(f"argument {name!r} dim {axis} ({d}): expected {want}, got {n}")
    for r in graph.dims:
        n = sizes.get(sym(r.name))
        if n is not None and n not in r:
            where = next(
                (f"argument {nd.get('name')!r} dim {i} ({r.name})" for nd in graph.inputs
                 for i, d in enumerate(nd.types[0].shape) if d == sym(r.name)),
                r.name,
            )
            hi = "oo" if r.hi is None else r.hi
            raise InputError(f"{where}: expected a size in [{r.lo}, {hi}], got {n}")
    return sizes
