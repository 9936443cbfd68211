"""How a compiled model is called: the captured forward's parameters and output structure.

`CallSpec.bind(args, kwargs)` maps a call like the original module's (positional or by
name) onto the graph's tensor inputs, refusing anything that differs from the capture:

    spec.bind((ids,), {})            -> [ids]
    spec.bind((), {"input_ids": ids, "use_cache": True})
    CallError: argument 'use_cache' was captured as False, got True; compile again to change it
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree


class CallError(TypeError):
    """A compiled model was called with arguments that do not fit its captured signature."""


@dataclass
class CallSpec:
    """`params`: the forward's parameter names in order; `inputs`: the ones that are graph
    inputs (tensors), in graph order; `constants`: the non-tensor arguments fixed at capture;
    `out_spec`: the pytree structure of the outputs (None: a tuple of tensors)."""

    params: tuple[str, ...]
    inputs: tuple[str, ...]
    constants: dict[str, Any] = field(default_factory=dict)
    out_spec: Any = None

    def bind(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The graph's input tensors for a call with `args` and `kwargs`."""
        if len(args) > len(self.params):
            raise CallError(
                f"takes at most {len(self.params)} positional arguments ({', '.join(self.params)}), got {len(args)}"
            )
        given: dict[str, Any] = dict(zip(self.params, args))
        for name, val in kwargs.items():
            if name in given:
                raise CallError(f"got argument {name!r} both by position and by name")
            if name not in self.params and name not in self.constants and name not in self.inputs:
                raise CallError(f"unexpected argument {name!r}; expected one of {', '.join(self.params)}")
            given[name] = val
        for name, val in given.items():
            if name in self.inputs:
                continue
            if name in self.constants:
                if not _same_constant(val, self.constants[name]):
                    raise CallError(
                        f"argument {name!r} was captured as {self.constants[name]!r}, got {val!r}; "
                        "compile again to change it"
                    )
            elif val is not None:
                raise CallError(
                    f"argument {name!r} was not given at capture, so the compiled graph has no input for it; "
                    f"pass it in example_inputs when compiling (captured inputs: {', '.join(self.inputs) or 'none'})"
                )
        missing = [n for n in self.inputs if n not in given]
        if missing:
            raise CallError(
                f"missing input(s) {', '.join(repr(m) for m in missing)}; expected {len(self.inputs)} tensor "
                f"input(s): {', '.join(self.inputs)}"
            )
        return [given[n] for n in self.inputs]

    def unflatten(self, outputs: list[torch.Tensor]) -> Any:
        """The outputs in the captured forward's structure (e.g. a `CausalLMOutputWithPast`)."""
        if self.out_spec is None:
            return outputs[0] if len(outputs) == 1 else tuple(outputs)
        return pytree.tree_unflatten(list(outputs), self.out_spec)


def _same_constant(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # noqa: BLE001 - objects whose == is not a plain bool
        return a is b
