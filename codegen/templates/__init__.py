"""Parameterised Triton templates, one module per kernel family.

Each template module has `check(spec)` (raise ValueError naming what it cannot generate)
and `render(spec) -> str` (the module source of the spec's kernels and `launch`, without
the header the emitter adds). `TEMPLATES` maps a family to its module."""

from __future__ import annotations

from types import ModuleType

from . import dequant_gemm
from . import qgemm
from . import norm_quant, rope_kv
from . import attention

#: Kernel family -> template module. Families listed in `mxc.codegen.spec.FAMILIES` but not
#: here have no template yet; `template` names them in its error.
TEMPLATES: dict[str, ModuleType] = {dequant_gemm.FAMILY: dequant_gemm, qgemm.FAMILY: qgemm}
TEMPLATES.update({norm_quant.FAMILY: norm_quant, rope_kv.FAMILY: rope_kv})
TEMPLATES[attention.FAMILY] = attention


def template(family: str) -> ModuleType:
    """The template module of kernel `family`; ValueError names the families that have one."""
    try:
        return TEMPLATES[family]
    except KeyError:
        raise ValueError(
            f"no Triton template for kernel family {family!r} yet; templates exist for {', '.join(TEMPLATES)}"
        ) from None
