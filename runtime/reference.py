"""The reference backend: runs any IR graph with PyTorch ops. The oracle for everything else.

    run = ReferenceExecutor(graph)
    outputs = run([ids])            # a list of tensors, one per graph output

Each op has one rule in `IMPLS` written with the same torch ops, in the same order, as the
model code the frontend captured, so an unquantized graph reproduces eager PyTorch exactly.
A `fused` node (the fuse pass) runs the nodes of its region in order, so it gives exactly
what the nodes it groups give.
With `check_shapes=True` (the `MXC_DEBUG` flag) every result is compared with the type its
node declares, which catches a graph whose shape assumptions do not hold for this call.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import sympy
import torch
import torch.nn.functional as F

from ..ir import DType, Graph, Node, Ref, RuntimeDevice, TorchConst, flags
from ..ir.formats import NumberFormat, QTensor
from ..ir.ops import quant_parts
from ..ir.packing import from_codes, unpack
from ..ir.printer import print_node, region_of, value_names
from .inputs import bind_inputs
from .onnx_node import run_onnx_node

Impl = Callable[[list[torch.Tensor], dict[str, Any], "Frame"], Any]
Observer = Callable[[Node, list[torch.Tensor]], "list[torch.Tensor] | None"]


class Frame:
    """What an op rule may need beyond its operands: bound sizes, the device, and the node
    being run (its operand types: `dequantize` of packed codes reads their layout and K)."""

    def __init__(self, sizes: dict[sympy.Symbol, int], device: torch.device, unpacked: dict | None = None):
        self.sizes = sizes
        self.device = device
        self.node: Node | None = None
        #: Packed weight words -> their codes, unpacked once per executor (see `_unpacked`).
        self.unpacked: dict[int, tuple[torch.Tensor, torch.Tensor]] = {} if unpacked is None else unpacked

    def size(self, d: Any) -> int:
        if isinstance(d, sympy.Expr):
            return int(d.xreplace(self.sizes))
        return d

    def attr(self, v: Any, operands: Sequence[torch.Tensor] = ()) -> Any:
        """An attribute value for a torch call: refs, dtypes, sizes and devices resolved."""
        if isinstance(v, Ref):
            return operands[v.index]
        if isinstance(v, tuple):
            return [self.attr(x, operands) for x in v]
        if isinstance(v, dict):
            return {k: self.attr(x, operands) for k, x in v.items()}
        if isinstance(v, DType):
            return v.torch
        if isinstance(v, RuntimeDevice):
            return self.device
        if isinstance(v, TorchConst):
            return v.resolve()
        if isinstance(v, sympy.Expr):
            return self.size(v)
        return v


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, h, t, d] -> [b, heads, t, d], each key/value head repeated for its query group."""
    b, h, t, d = x.shape
    if h == heads:
        return x
    return x[:, :, None, :, :].expand(b, h, heads // h, t, d).reshape(b, heads, t, d)


def _attention(ins: list[torch.Tensor], a: dict, fr: Frame) -> torch.Tensor:
    q, k, v = ins[:3]
    k, v = _repeat_kv(k, q.shape[1]), _repeat_kv(v, q.shape[1])
    mask = ins[3] if len(ins) > 3 else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=a["causal"], scale=a["scale"])


def _rms_norm(ins: list[torch.Tensor], a: dict, fr: Frame) -> torch.Tensor:
    x = ins[0]
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + a["eps"])
    return ins[1] * y if len(ins) > 1 else y


def _layer_norm(ins: list[torch.Tensor], a: dict, fr: Frame) -> torch.Tensor:
    x = ins[0]
    w = ins[1] if len(ins) > 1 else None
    b = ins[2] if len(ins) > 2 else None
    return F.layer_norm(x, (x.shape[-1],), w, b, a["eps"])


def _rope(ins: list[torch.Tensor], a: dict, fr: Frame) -> torch.Tensor:
    x, cos, sin = ins
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _quantize(ins: list[torch.Tensor], a: dict, fr: Frame) -> tuple[torch.Tensor, ...]:
    fmt = a["format"]
    if len(ins) > 1:  # static scales
        given = dict(zip(quant_parts(fmt)[1:], ins[1:]))
        q = fmt.encode(ins[0], given["scale"], given.get("zero"), given.get("global"))
    else:
        q = fmt.quantize(ins[0])
    parts = {"codes": q.codes, "scale": q.scale, "zero": q.zero, "global": q.global_scale}
    return tuple(parts[p] for p in quant_parts(fmt))


def _unpacked(codes: torch.Tensor, operand: int, fmt: NumberFormat, fr: Frame) -> torch.Tensor:
    """Operand `operand` of the node being run, `codes` of `fmt`, as code values: int32 words
    (the layout pass packed them: its type has a layout) are unpacked, else `codes` itself."""
    t = fr.node.inputs[operand].type if fr.node is not None else None
    if t is None or t.layout is None:
        return codes
    hit = fr.unpacked.get(id(codes))
    if hit is not None and hit[0] is codes:  # a weight's words: unpacked on the first call only
        return hit[1]
    out = from_codes(unpack(codes, t.layout, fr.size(t.shape[t.layout.axis])), fmt)
    if fr.node.inputs[operand].node.op in ("const", "input") and not t.free_symbols:
        fr.unpacked[id(codes)] = (codes, out)  # holds `codes`, so its id is not reused
    return out


def _dequantize(ins: list[torch.Tensor], a: dict, fr: Frame) -> torch.Tensor:
    fmt = a["format"]
    parts = dict(zip(quant_parts(fmt), ins))
    codes = _unpacked(parts["codes"], 0, fmt, fr)
    q = QTensor(codes.float(), parts["scale"].float(), parts.get("zero"), parts.get("global"))
    return fmt.dequantize(q).to(a["dtype"].torch)


def _qlinear(ins: list[torch.Tensor], a: dict, fr: Frame) -> torch.Tensor:
    """The integer (or low-bit float) GEMM with scales in the epilogue, as a kernel computes
    it: per block g shared by both operands, `acc_g = Σ_k xq·wq` exactly (float64 holds every
    product sum of 8-bit codes), minus `z_g · Σ_k xq` for a weight zero point; then
    `out = Σ_g acc_g · s_w,g (· s_x,g)`, times the per-token (or per-tensor) activation scale
    and the global scales; + bias. The last block may be shorter than the others."""
    act, wf = a["act"], a["weight"]
    na, nw = len(quant_parts(act)), len(quant_parts(wf))
    xp, wp = dict(zip(quant_parts(act), ins[:na])), dict(zip(quant_parts(wf), ins[na : na + nw]))
    bias = ins[na + nw] if len(ins) > na + nw else None
    xq, wq = xp["codes"].double(), _unpacked(wp["codes"], na, wf, fr).double()
    k = xq.shape[-1]
    bx, bw = act.scaling.block(k), wf.scaling.block(k)
    grouped_x = bx is not None and bx < k
    block = bx if grouped_x else (bw if bw is not None else k)
    nb = -(-k // block)
    pad = nb * block - k
    xb = F.pad(xq, (0, pad)).reshape(*xq.shape[:-1], nb, block)
    wb = F.pad(wq, (0, pad)).reshape(wq.shape[0], nb, block)
    acc = torch.einsum("...gb,ngb->...gn", xb, wb)  # [..., nb, N]
    ws = wp["scale"].double()
    wz = None if wp.get("zero") is None else wp["zero"].double()
    if ws.shape[-1] != nb:  # one weight scale per row or per tensor, several blocks
        ws = ws.expand(wq.shape[0], 1).expand(wq.shape[0], nb)
        wz = None if wz is None else wz.expand(wq.shape[0], 1).expand(wq.shape[0], nb)
    if wz is not None:
        acc = acc - xb.sum(-1)[..., None] * wz.T
    acc = acc * ws.T
    if "global" in wp:
        acc = acc * wp["global"].double()
    sx = xp["scale"].double()
    if grouped_x:
        out = (acc * sx[..., None]).sum(-2)
    else:  # per token [..., 1], or per tensor [1, 1]
        out = acc.sum(-2) * (sx if bx is not None else sx.reshape(()))
    if "global" in xp:
        out = out * xp["global"].double()
    out = out.to(a["dtype"].torch)
    return out + bias if bias is not None else out


def _torch(ins: list[torch.Tensor], a: dict, fr: Frame) -> Any:
    fn = _resolve_target(a["target"])
    return fn(*fr.attr(a["args"], ins), **fr.attr(a.get("kwargs", {}), ins))


_TARGETS: dict[str, Any] = {}


def _resolve_target(name: str) -> Any:
    fn = _TARGETS.get(name)
    if fn is None:
        ns, op, overload = name.split(".", 2) if name.count(".") >= 2 else (*name.split("."), "default")
        fn = getattr(getattr(getattr(torch.ops, ns), op), overload)
        _TARGETS[name] = fn
    return fn


IMPLS: dict[str, Impl] = {
    "linear": lambda ins, a, fr: F.linear(*ins),
    "matmul": lambda ins, a, fr: torch.matmul(*ins),
    "qlinear": _qlinear,
    "embedding": lambda ins, a, fr: F.embedding(ins[0], ins[1]),
    "rms_norm": _rms_norm,
    "layer_norm": _layer_norm,
    "add": lambda ins, a, fr: ins[0] + ins[1],
    "mul": lambda ins, a, fr: ins[0] * ins[1],
    "silu": lambda ins, a, fr: F.silu(ins[0]),
    "relu": lambda ins, a, fr: F.relu(ins[0]),
    "tanh": lambda ins, a, fr: torch.tanh(ins[0]),
    "gelu": lambda ins, a, fr: F.gelu(ins[0], approximate=a["approximate"]),
    "softmax": lambda ins, a, fr: torch.softmax(ins[0], a["axis"]),
    "attention": _attention,
    "rope": _rope,
    "cast": lambda ins, a, fr: ins[0].to(a["dtype"].torch),
    "reshape": lambda ins, a, fr: ins[0].reshape([fr.size(d) for d in a["shape"]]),
    "transpose": lambda ins, a, fr: ins[0].transpose(a["dim0"], a["dim1"]),
    "permute": lambda ins, a, fr: ins[0].permute(a["dims"]),
    "unsqueeze": lambda ins, a, fr: ins[0].unsqueeze(a["axis"]),
    "expand": lambda ins, a, fr: ins[0].expand([fr.size(d) for d in a["shape"]]),
    "slice": lambda ins, a, fr: torch.ops.aten.slice.Tensor(
        ins[0], a["axis"], fr.size(a["start"]), fr.size(a["end"]), fr.size(a["step"])
    ),
    "cat": lambda ins, a, fr: torch.cat(ins, a["axis"]),
    "gather": lambda ins, a, fr: torch.index_select(ins[0], a["axis"], ins[1]),
    "quantize": _quantize,
    "dequantize": _dequantize,
    "torch": _torch,
    "onnx": lambda ins, a, fr: run_onnx_node(ins, a, fr.node, fr.device),
}


class ExecutionError(RuntimeError):
    """A node failed or produced a result that does not match its declared type."""


class ReferenceExecutor:
    """Runs `graph` node by node with torch ops on `device` (default: where the weights are)."""

    def __init__(self, graph: Graph, device: torch.device | str | None = None, check_shapes: bool | None = None):
        self.graph = graph
        weights = graph.used_weights()
        if device is None:
            device = next(iter(weights.values())).device if weights else torch.device("cpu")
        self.device = torch.device(device)
        self.weights = {k: v.to(self.device) for k, v in weights.items()}
        self.check_shapes = flags.DEBUG.get() if check_shapes is None else check_shapes
        self._last_use = self._last_uses()
        # The oracle trades memory for speed here: packed weights are unpacked to codes once
        # (as large as the codes were before the layout pass), not on every call.
        self._unpacked: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        _check_rules(graph.nodes)

    def _last_uses(self) -> dict[int, list[Node]]:
        """For each body position, the nodes whose results are dead after it (frees memory)."""
        last: dict[Node, int] = {}
        for i, node in enumerate(self.graph.nodes):
            for v in node.inputs:
                last[v.node] = i
        keep = {v.node for v in self.graph.outputs}
        out: dict[int, list[Node]] = {}
        for node, i in last.items():
            if node not in keep:
                out.setdefault(i, []).append(node)
        return out

    def __call__(self, inputs: Sequence[torch.Tensor], observer: Observer | None = None) -> list[torch.Tensor]:
        """The graph's outputs for `inputs`; `observer(node, operands)` sees every node's
        operands (in fused regions too) before it runs and may return operands to run it with
        instead."""
        run = self.start(inputs)
        run.advance(len(self.graph.nodes), observer)
        return run.outputs()

    def start(self, inputs: Sequence[torch.Tensor]) -> "Run":
        """A run of the graph on `inputs` that executes nodes only when advanced: calibration
        steps several runs in lockstep, layer by layer (see `Run`)."""
        return Run(self, inputs)

    def _run(
        self, node: Node, operands: list[torch.Tensor], frame: Frame, observer: "Observer | None" = None
    ) -> tuple[torch.Tensor, ...]:
        if node.op == "const":
            return (self.weights[node.get("name")],)
        if node.op == "fused":
            return self._run_region(node, operands, frame, observer)
        try:
            frame.node = node
            got = IMPLS[node.op](operands, node.attr, frame)
        except Exception as e:  # noqa: BLE001 - re-raised with the node named
            raise ExecutionError(f"{self._where(node)}\n  failed: {type(e).__name__}: {e}") from e
        results = tuple(got) if isinstance(got, (tuple, list)) else (got,)
        if self.check_shapes:
            self._check(node, results, frame)
        return results

    def _check(self, node: Node, results: tuple[torch.Tensor, ...], frame: Frame) -> None:
        for t, r in zip(node.types, results):
            want = [frame.size(d) for d in t.shape]
            if list(r.shape) != want or (isinstance(t.dtype, DType) and r.dtype != t.dtype.torch):
                bound = ", ".join(f"{k}={v}" for k, v in frame.sizes.items())
                raise ExecutionError(
                    f"{self._where(node)}\n  produced {r.dtype} {list(r.shape)}, but the IR declares {t} "
                    f"= {want} with {bound}"
                )

    def _run_region(
        self, node: Node, operands: list[torch.Tensor], frame: Frame, observer: "Observer | None" = None
    ) -> tuple[torch.Tensor, ...]:
        """A `fused` node: its region's nodes, in order, on its operands (so it computes what
        the nodes it groups compute, op for op); its results are the region's yields. The
        observer sees the region's nodes too."""
        body = region_of(node)
        env: dict[Node, tuple[torch.Tensor, ...]] = {arg: (t,) for arg, t in zip(body.inputs, operands)}
        for inner in body.nodes:
            inner_operands = [env[v.node][v.index] for v in inner.inputs]
            if observer is not None:
                inner_operands = observer(inner, inner_operands) or inner_operands
            env[inner] = self._run(inner, inner_operands, frame, observer)
        results = tuple(env[v.node][v.index] for v in body.outputs)
        if self.check_shapes:
            self._check(node, results, frame)
        return results

    def _where(self, node: Node) -> str:
        return f"graph @{self.graph.name}: node {_describe(self.graph, node) or repr(node)}"


def _check_rules(nodes: Sequence[Node], region: bool = False) -> None:
    """Refuse, before running, a graph with an op the backend cannot run (also in regions)."""
    for node in nodes:
        if node.op == "fused":
            body = region_of(node)
            if body is None:
                raise ExecutionError(f"the reference backend has no rule for op 'fused' without a region (node {node!r})")
            _check_rules(body.nodes, region=True)
        elif node.op == "const" and region:
            raise ExecutionError(f"a region holds no const: weights are operands of the fused node (node {node!r})")
        elif node.op not in IMPLS and node.op != "const":
            raise ExecutionError(f"the reference backend has no rule for op {node.op!r} (node {node!r})")


def _describe(graph: Graph, node: Node) -> str | None:
    """`node`'s printed line, found in `graph` or in a region of it (which the text then names)."""
    names = value_names(graph)
    if node in names:
        return print_node(node, names)
    for outer in graph.nodes:
        body = region_of(outer)
        if body is not None and (inner := _describe(body, node)) is not None:
            return f"{inner}, in the region of {print_node(outer, names)}"
    return None


class Run:
    """One execution of a graph, node by node: `advance(stop)` runs the nodes before body
    position `stop`; `operands(node)` reads the inputs of the next node while they are live.
    Results are freed after their last use, so memory holds only live values.

        run = executor.start([ids])
        run.advance(i)                 # nodes 0 .. i-1 ran
        x = run.operands(graph.nodes[i])[0]
        run.advance(len(graph.nodes)); run.outputs()
    """

    def __init__(self, executor: ReferenceExecutor, inputs: Sequence[torch.Tensor]):
        self.executor = executor
        self.frame = Frame(bind_inputs(executor.graph, inputs, executor.device), executor.device, executor._unpacked)
        self.env: dict[Node, tuple[torch.Tensor, ...]] = {n: (t,) for n, t in zip(executor.graph.inputs, inputs)}
        self.position = 0

    def operands(self, node: Node) -> list[torch.Tensor]:
        return [self.env[v.node][v.index] for v in node.inputs]

    def fork(self) -> "Run":
        """A run at this run's position holding the same live values (shared, not copied: no
        op writes a tensor in place), to advance on its own, e.g. with an observer that
        changes one node, while this run goes on unchanged (sensitivity analysis).

            run.advance(i); alt = run.fork(); alt.advance(len(nodes), observer)
        """
        other = Run.__new__(Run)
        other.executor, other.frame, other.position = self.executor, self.frame, self.position
        other.env = dict(self.env)
        return other

    def advance(self, stop: int, observer: Observer | None = None, *, grad: bool = False) -> None:
        """Run the nodes up to body position `stop` (exclusive). `grad`: record autograd
        history (an observer can put tensors that require grad in the operands; sensitivity's
        Fisher estimate differentiates the logits through the run); by default none is kept."""
        ex, nodes = self.executor, self.executor.graph.nodes
        with torch.set_grad_enabled(grad):
            for i in range(self.position, stop):
                node = nodes[i]
                operands = self.operands(node)
                if observer is not None:
                    operands = observer(node, operands) or operands
                self.env[node] = ex._run(node, operands, self.frame, observer)
                for dead in ex._last_use.get(i, ()):
                    self.env.pop(dead, None)
        self.position = max(self.position, stop)

    def outputs(self) -> list[torch.Tensor]:
        if self.position < len(self.executor.graph.nodes):
            raise ExecutionError(f"run stopped at node {self.position} of {len(self.executor.graph.nodes)}: no outputs yet")
        return [self.env[v.node][v.index] for v in self.executor.graph.outputs]
