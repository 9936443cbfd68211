"""layout: pack every quantized weight into int32 words in the layout its kernel reads.

Every `const` whose type is a number format and which is read only as codes — by `dequantize`
(its first operand) or by `qlinear` (its weight codes, the fold pass's quantized GEMM) — is
packed: its tensor in `graph.weights` (codes as int8 / uint8 / float16 values, as the
quantize pass stores them) is replaced, under the same name, by int32 words (`mxc.ir.packing`:
a dense little-endian bit stream along the reduction axis K, ceil(bits·K/32) words per row,
widths 3, 5, 6, 7 straddling word boundaries), and the const's type gets the layout:

    Before: %5 = const() {name="m.fc.weight"} : int3<asym,g32>[64, 72]
            %8 = dequantize(%5, %6, %7) {format=int3<asym,g32>, dtype=f32} : f32[64, 72]
    After:  %5 = const() {name="m.fc.weight"} : int3<asym,g32>[64, 72] packed<bits=3,word=i32,axis=1>
            %8 = dequantize(%5, %6, %7) {format=int3<asym,g32>, dtype=f32} : f32[64, 72]
            (graph.weights["m.fc.weight"]: uint8 [64, 72] -> int32 [64, 7])

Scales, zero points and global scales stay as they are. Each packed weight is recorded in
`graph.meta["layout"][name] = {"layout": "packed<...>", "bytes": packed bytes}` (the report's
byte counts use it). Activation codes (`quantize` results) are values computed at run time
and are not packed here; an already packed const is left alone, so the pass is a fixed point
and returns the same graph when nothing changes.

Preserves: the function, bit for bit — every `dequantize` reads exactly the codes it read
before (integer codes and float bit patterns are exact), so it yields the same values.
"""

from __future__ import annotations

from ..ir import FloatFormat, Graph, IntFormat, Layout, Node, TensorType
from ..ir.ops import quant_parts
from ..ir.packing import WORD_BITS, pack, to_codes

#: The kernel families a quantized weight can feed, and what each reads.
FAMILIES = {
    "dequant_gemm": "weight-only dequant GEMM/GEMV: every reader is a linear's weight operand",
    "dequant": "any other reader of the dequantized tensor (an embedding table, a matmul operand)",
    "qgemm": "the integer / low-bit float GEMM of quantized activations and weights (`qlinear`)",
}


def _reads_codes(reader: Node, node: Node) -> bool:
    """Whether `reader` reads `node` only as the codes of a quantized tensor: the first
    operand of a `dequantize`, or the weight codes of a `qlinear`."""
    if reader.op == "dequantize":
        return all(v.node is not node for v in reader.inputs[1:])
    if reader.op == "qlinear":
        na = len(quant_parts(reader.get("act")))
        return [i for i, v in enumerate(reader.inputs) if v.node is node] == [na]
    return False


def kernel_family(readers: list[Node], users: dict[Node, list[Node]]) -> str:
    """The family of kernel that will read a weight through `readers` (its `dequantize`s or
    `qlinear`s; see `FAMILIES`)."""
    if readers and all(r.op == "qlinear" for r in readers):
        return "qgemm"
    dequantizes = [r for r in readers if r.op == "dequantize"]
    if len(dequantizes) != len(readers):
        return "dequant"
    pairs = [(d, u) for d in dequantizes for u in users.get(d, [])]
    if pairs and all(u.op == "linear" and u.inputs[1].node is d and u.inputs[0].node is not d for d, u in pairs):
        return "dequant_gemm"
    return "dequant"


def choose_layout(t: TensorType, family: str, word: str = "i32") -> Layout:
    """The layout codes of type `t` are packed in for a kernel of `family`.

    All families today read codes packed along K (the last axis, the reduction axis of a
    [N, K] weight) in the natural order: the dequant GEMM/GEMV templates unpack a run of K
    with shifts and masks, and rows pack independently. This is where a tensor-core (mma)
    dequant GEMM would get its own rule once fusion and codegen choose it for a shape class
    (large symbolic M): int4 codes interleaved `order=(0, 2, 4, 6, 1, 3, 5, 7)` (8-bit:
    `(0, 2, 1, 3)`) so that one shift-and-mask yields the fragment's element pairs, and
    `tile=(BLOCK_N, BLOCK_K·bits/32)` so that each program's weight tile is one contiguous
    load. The family key would then be, e.g., "mma_gemm" and carry the tile sizes.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown kernel family {family!r}; expected one of {', '.join(FAMILIES)}")
    return Layout(bits=t.dtype.bits, axis=t.rank - 1, word=word)


def layout(graph: Graph, *, word: str = "i32") -> Graph:
    """Pack the quantized weights of `graph` (see the module docstring); returns `graph` if
    there is nothing to pack. `word`: the storage word (only "i32")."""
    if word not in WORD_BITS:
        raise ValueError(f"layout: unknown storage word {word!r}; expected one of {', '.join(WORD_BITS)}")
    users = graph.users()
    outputs = {v.node for v in graph.outputs}
    weights = dict(graph.weights)
    record: dict[str, dict] = {}

    def packable(node: Node) -> bool:
        t = node.types[0]
        if node.op != "const" or not isinstance(t.dtype, (IntFormat, FloatFormat)) or t.layout is not None:
            return False
        readers = users.get(node, [])
        return bool(readers) and node not in outputs and all(_reads_codes(r, node) for r in readers)

    def apply(node: Node) -> Node | None:
        if not packable(node):
            return None
        name, t = node.get("name"), node.types[0]
        if name not in graph.weights:
            raise ValueError(f"layout: weight {name!r} ({t}) has no tensor in graph.weights; the pass packs weight values")
        lay = choose_layout(t, kernel_family(users[node], users), word)
        try:
            words = pack(to_codes(graph.weights[name], t.dtype), lay)
        except (TypeError, ValueError) as e:
            raise ValueError(f"layout: weight {name!r} ({t}) cannot be packed: {e}") from None
        weights[name] = words
        record[name] = {"layout": str(lay), "bytes": words.numel() * words.element_size()}
        return node.replace(types=[TensorType(t.shape, t.dtype, lay)])

    out = graph.rewrite(apply)
    if out is graph:
        return graph
    out = out.replace(weights=weights)
    out.meta["layout"] = {**graph.meta.get("layout", {}), **record}
    return out
