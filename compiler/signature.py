"""How a compiled model is called: the captured forward's parameters and output structure.

`CallSpec.bind(args, kwargs)` maps a call like the original module's (positional or by
name) onto the graph's tensor inputs, refusing anything that differs from the capture:

    spec.bind((ids,), {})            -> [ids]
    spec.bind((), {"input_ids": ids, "use_cache": True})
    CallError: argument 'use_cache' was captured as False, got True; compile again to change it
"""

from __future__ import annotations

import importlib
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

    def to_dict(self) -> dict:
        """The spec as JSON-ready data (what an artifact's `call_spec.json` holds):

            {"params": ["input_ids", ...], "inputs": ["input_ids"], "constants": {"use_cache": false},
             "outputs": {"kind": "record", "class": "transformers.modeling_outputs:CausalLMOutputWithPast",
                         "keys": ["logits"], "children": [{"kind": "leaf"}]}}

        Constants must be None, bool, int, float or str; outputs may nest tuples, lists, dicts
        with string keys and Hugging Face `ModelOutput`s. Anything else raises ValueError."""
        for name, val in self.constants.items():
            if val is not None and type(val) not in (bool, int, float, str):
                raise ValueError(
                    f"constant argument {name!r} = {val!r} ({type(val).__name__}) cannot be stored as JSON; "
                    "expected None, bool, int, float or str"
                )
        return {
            "params": list(self.params),
            "inputs": list(self.inputs),
            "constants": dict(self.constants),
            "outputs": None if self.out_spec is None else _tree_to_json(self.out_spec),
        }

    @staticmethod
    def from_dict(data: dict) -> "CallSpec":
        """The spec `to_dict` described. A `ModelOutput` is rebuilt as its transformers class,
        imported by qualified name (only from `transformers`, never the model's own code); when
        that class cannot be imported, the output is an `Outputs` with the same fields."""
        known = {"params", "inputs", "constants", "outputs"}
        if not isinstance(data, dict) or set(data) != known:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"call spec: expected an object with keys {sorted(known)}, got {got}")
        outputs = data["outputs"]
        return CallSpec(
            tuple(data["params"]), tuple(data["inputs"]), dict(data["constants"]),
            None if outputs is None else _tree_from_json(outputs),
        )


def _same_constant(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # noqa: BLE001 - objects whose == is not a plain bool
        return a is b


class Outputs(dict):
    """A model's outputs by field name, with attribute access (`out.logits`, `out["logits"]`,
    `out[0]`): what a loaded artifact returns when the output class it was saved with (a
    transformers `ModelOutput`) cannot be imported here."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"outputs have no field {name!r}; fields: {', '.join(self)}") from None

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)


pytree.register_pytree_node(
    Outputs,
    lambda o: (list(o.values()), list(o.keys())),
    lambda values, keys: Outputs(zip(keys, values)),
    serialized_type_name="mxc.signature.Outputs",
)

_CONTAINERS = {tuple: "tuple", list: "list", dict: "dict", type(None): "none"}


def _is_model_output(cls: type) -> bool:
    """True for a subclass of transformers' `ModelOutput` (without importing transformers)."""
    return any(c.__name__ == "ModelOutput" and c.__module__ == "transformers.utils.generic" for c in cls.__mro__)


def _tree_to_json(spec: Any) -> dict:
    """A pytree `TreeSpec` as JSON data: `{"kind": "leaf"}` for a tensor, else the container's
    kind, its keys where it has them and its children."""
    if spec.is_leaf():
        return {"kind": "leaf"}
    children = [_tree_to_json(c) for c in spec.children()]
    kind = _CONTAINERS.get(spec.type)
    if kind in ("tuple", "list", "none"):
        return {"kind": kind, "children": children}
    if kind == "dict" or spec.type is Outputs or _is_model_output(spec.type):
        keys = list(spec.context)
        if not all(isinstance(k, str) for k in keys):
            raise ValueError(f"output {spec.type.__name__} has non-string keys {keys!r}; they cannot be stored as JSON")
        if kind == "dict":
            return {"kind": "dict", "keys": keys, "children": children}
        cls = None if spec.type is Outputs else f"{spec.type.__module__}:{spec.type.__qualname__}"
        return {"kind": "record", "class": cls, "keys": keys, "children": children}
    raise ValueError(
        f"output of type {spec.type.__module__}.{spec.type.__qualname__} cannot be stored; "
        "expected tensors in tuples, lists, dicts or Hugging Face ModelOutputs"
    )


def _tree_from_json(data: dict) -> Any:
    """The `TreeSpec` that `_tree_to_json` described."""
    kind = data["kind"]
    if kind == "leaf":
        return pytree.treespec_leaf()
    children = [_tree_from_json(c) for c in data["children"]]
    if kind in ("tuple", "list", "none"):
        return pytree.TreeSpec({"tuple": tuple, "list": list, "none": type(None)}[kind], None, children)
    if kind == "dict":
        return pytree.TreeSpec(dict, list(data["keys"]), children)
    if kind == "record":
        return pytree.TreeSpec(_record_class(data["class"]), list(data["keys"]), children)
    raise ValueError(f"call spec: unknown output kind {kind!r}; expected leaf, tuple, list, none, dict or record")


def _record_class(name: str | None) -> type:
    """The `ModelOutput` class `module:qualname` names if it is one of transformers' and
    imports here, else `Outputs`. Modules outside `transformers` are never imported."""
    if name is None or not name.startswith("transformers."):
        return Outputs
    module, _, qualname = name.partition(":")
    try:
        cls: Any = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError):
        return Outputs
    return cls if isinstance(cls, type) and _is_model_output(cls) else Outputs
