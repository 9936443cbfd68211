"""What the row kernels (`norm_quant`, `rope_kv`) share: their tiles, the checks every row
kernel spec passes, and the kernel-body source of their outputs.

A row kernel runs one program per block of ROWS rows of D channels; the template supplies
a `_values(...)` call giving the float32 values of channel positions of those rows (the
normed row, the rotated row), and each output stores them: the float result (x's dtype)
and every quantized channel range (`quantize_source.block_source`).
"""

from __future__ import annotations

from ..spec import KernelSpec, Tiles
from .common import TL_DTYPES, TORCH_DTYPES, constants, indent
from .quantize_source import QuantOut, block_source, format_source, grid_source, next_pow2, outputs_table

X_DTYPES = ("f16", "f32")
#: Channels per chunk at most (a [16, 512] float32 tile is 32 registers a thread at 8 warps).
MAX_BLOCK_D = 512
ROWS = 16


def row_tiles(d: int) -> tuple[Tiles, ...]:
    """One configuration for any M: ROWS rows per program, chunks of next_pow2(d) channels
    up to MAX_BLOCK_D (`block_k` is unused by row kernels)."""
    block = min(MAX_BLOCK_D, max(16, next_pow2(d)))
    return (Tiles(max_m=None, block_m=ROWS, block_n=block, block_k=16, num_warps=4 if block <= 256 else 8, num_stages=1),)


def check_row_spec(spec: KernelSpec, family: str, options: tuple[str, ...], flags: tuple[str, ...],
                   needs: str) -> None:
    """Raise ValueError unless `spec` has the shape of a `family` row kernel spec: dims ['d'],
    no layouts or epilogue, an x dtype of X_DTYPES, options among `options` (those in `flags`
    bools), quantized outputs named out0, out1, ..., one tile configuration and an output
    (`needs` says which kinds the template has)."""
    if spec.family != family:
        raise ValueError(f"the {family} template cannot generate a {spec.family!r} kernel")
    dims = {k for k, _ in spec.dims}
    if dims != {"d"}:
        raise ValueError(f"{spec}: a {family} spec has dims ['d'], got {sorted(dims)}")
    if spec.layouts or spec.epilogue:
        raise ValueError(f"{spec}: a {family} spec has no layouts and no epilogue")
    if {k for k, _ in spec.dtypes} != {"x"} or spec.dtype("x") not in X_DTYPES:
        raise ValueError(f"{spec}: a {family} spec has dtypes {{'x': one of {', '.join(X_DTYPES)}}}, got {dict(spec.dtypes)}")
    unknown = sorted({k for k, _ in spec.options} - set(options))
    if unknown:
        raise ValueError(f"{spec}: unknown {family} options {unknown}; expected some of {list(options)}")
    for flag in flags:
        if not isinstance(spec.option(flag, False), bool):
            raise ValueError(f"{spec}: option {flag} must be a bool, got {spec.option(flag)!r}")
    roles = sorted(k for k, _ in spec.formats)
    if roles != sorted(f"out{i}" for i in range(len(roles))):
        raise ValueError(f"{spec}: quantized outputs are named out0, out1, ...; got {roles}")
    if not roles and not spec.option("float_out"):
        raise ValueError(f"{spec}: a {family} kernel needs an output: {needs}")
    if len(spec.tiles) != 1:
        raise ValueError(f"{spec}: a row kernel takes one tile configuration (any M), got {len(spec.tiles)}")


def quant_blocks(outs: list[QuantOut], value: str, block_d: int) -> tuple[list[str], list[str]]:
    """(the kernel-body blocks that quantize and store each output, the kernel's pointer
    arguments for them: q{i}_ptr, s{i}_ptr and z{i}_ptr with a zero point). `value` is the
    `_values(...)` call format (`block_source`)."""
    blocks, args = [], []
    for i, o in enumerate(outs):
        ptrs = {"codes": f"q{i}_ptr", "scale": f"s{i}_ptr"} | ({"zero": f"z{i}_ptr"} if o.has_zero else {})
        args += list(ptrs.values())
        blocks.append(block_source(o, ptrs, value, block_d))
    return blocks, args


def float_block(spec: KernelSpec, value: str, what: str) -> str:
    """The kernel-body block (indented for it) that stores every channel of the rows' values
    into `y_ptr` (x's dtype, contiguous rows of D), in chunks of at most `block_n`; `what`
    is its comment. "" when the spec has no float output."""
    if not spec.option("float_out"):
        return ""
    d = spec.dim("d")
    chunk = min(spec.tiles[0].block_n, next_pow2(d))
    loop = d > chunk
    body = [
        f"ch = ({'c0 + ' if loop else ''}tl.arange(0, {chunk}))[None, :]",
        "cmask = ch < D",
        f"v = {value.format(ch='ch', cmask='cmask', rmask='row_mask[:, None]', r='[:, None]')}",
        f"tl.store(y_ptr + rows[:, None] * D + ch, v.to({TL_DTYPES[spec.dtype('x')]}), mask=row_mask[:, None] & cmask)",
    ]
    lines = [f"# {what}"]
    lines += [f"for c0 in range(0, D, {chunk}):", *["    " + b for b in body]] if loop else body
    return indent("\n".join(lines))


def results_doc(spec: KernelSpec, outs: list[QuantOut], what: str) -> str:
    """The numbered list of what `launch` returns, for its docstring: the float result
    (`what`) when the spec has one, then each quantized output's codes, scale and zero."""
    results = ([f"y ({what}, x's dtype) [..., {spec.dim('d')}]"] if spec.option("float_out") else []) + [
        f"{o.name}: codes {o.codes_dtype} [..., {o.width}], scale float32 [..., {o.n_scales}]"
        + (", zero float32 (zero point codes)" if o.has_zero else "")
        + (" (static: the given scale" + (" and zero" if o.has_zero else "") + ", returned as given)" if o.static else "")
        for o in outs
    ]
    return "\n    ".join(f"{i}. {r}" for i, r in enumerate(results, 1))


def module_fields(spec: KernelSpec, outs: list[QuantOut], items: list[tuple], args: list[str], what: str) -> dict:
    """The `_MODULE` fields every row kernel module has: its name, sizes, constants (`items`),
    the exact quantization helpers of `outs`, the kernel's output pointer arguments `args`,
    the `QUANT_OUTPUTS` table, the launch's dtypes and returns (`what`: the float result)."""
    tiles, x_dt = spec.tiles[0], spec.dtype("x")
    return dict(
        kernel_name=str(spec),
        d=spec.dim("d"),
        rows=tiles.block_m,
        x_name=x_dt.replace("f", "float"),
        constants=constants(items),
        grid=grid_source(),
        formats="\n\n".join(format_source(o) for o in outs) or "# (no quantized output)",
        out_args="".join(f"{a}, " for a in args),
        quant_outputs=outputs_table(outs),
        x_torch=TORCH_DTYPES[x_dt],
        float_out=spec.option("float_out"),
        results=results_doc(spec, outs, what),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
