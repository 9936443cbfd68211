"""Probe: does an incoherence rotation (QuaRot-style Hadamard rotations folded into the
weights) make SmolLM2-135M's weights easier to quantize with mxc's scalar formats?

Issue 6's 3.25-bit goal (as good as uniform W4A16 g128) is out of reach for every allocation
of the scalar candidates (the exact solver's least KL there is about twice W4's). Rotations
are the usual next lever, so this measures them before any compiler pass is built for them:

* ``r1``: the residual stream turned by one orthogonal Q (hidden 576 = 4·12·12: a Sylvester
  Hadamard of order 4 times two Paley Hadamards of order 12, scaled, with random signs).
  The RMSNorm gains are folded into the linears that read the norm's output (a norm without
  gain commutes with Q), the embedding becomes E·Q, each linear reading the stream W·Q, each
  linear writing to it Qᵀ·W, lm_head (untied from the embedding) W·Q.
* ``r2``: each value head turned by its own 64×64 Hadamard, undone in o_proj's input.
* ``r4``: down_proj's input turned online by a 1536×1536 Hadamard (a float matmul left in the
  graph) and W·H folded into down_proj's weight.

Every variant computes the same function as the float model (its float perplexity is
printed). Each is then compiled with uniform plans (lm_head float) and its perplexity
measured as `benchmarks/frontier.py` does: 8×512 tokens of pydoc text, GPTQ + clipping
search on the last 8×512 tokens, or round to nearest with ``--method rtn``.

    python benchmarks/rotation.py [--variants none r1 r1+r2+r4] [--formats "int4<asym,g128>" ...]
                                  [--method gptq|rtn] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import time
import warnings

import torch

from _results import publish  # benchmarks/, the script's own folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def paley12():
    """A Hadamard matrix of order 12 (Paley's first construction, q = 11)."""
    q = 11
    squares = {(x * x) % q for x in range(1, q)}
    chi = [0] + [1 if i in squares else -1 for i in range(1, q)]
    s = torch.zeros(12, 12, dtype=torch.float64)
    s[0, 1:], s[1:, 0] = 1, -1
    s[1:, 1:] = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    return s + torch.eye(12, dtype=torch.float64)


def hadamard(n: int):
    """A Hadamard matrix of order n = 2^a · 12^b (±1 entries, H Hᵀ = n I)."""
    h, m = torch.ones(1, 1, dtype=torch.float64), n
    while m % 12 == 0:
        h, m = torch.kron(h, paley12()), m // 12
    while m % 2 == 0:  # Sylvester
        h, m = torch.kron(h, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)), m // 2
    if m != 1:
        raise ValueError(f"no Hadamard construction here for order {n}: expected 2^a * 12^b")
    return h


def rotation(n: int, gen):
    """An orthogonal n×n matrix: diag(random signs) · H / √n, float64."""
    h = hadamard(n)
    assert torch.allclose(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    return signs[:, None] * h / math.sqrt(n)


class RotatedInput(torch.nn.Module):
    """A linear whose input is turned by H first: linear(x @ H)."""

    def __init__(self, linear: torch.nn.Linear, h: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("h", h.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.matmul(x, self.h))


def rotate(model, variant: str, seed: int = 0) -> None:
    """Turn a Hugging Face Llama model in place (see the module docstring); same function."""
    gen = torch.Generator().manual_seed(seed)
    parts = set(variant.split("+"))
    if not parts <= {"r1", "r2", "r4"} or "r1" not in parts:
        raise ValueError(f"variant {variant!r}: expected 'none' or r1 with optional +r2 / +r4 (e.g. 'r1+r2+r4')")
    cfg, body = model.config, model.model
    q = rotation(cfg.hidden_size, gen)

    def setw(linear, w):
        linear.weight.copy_(w.to(linear.weight.dtype))

    def fold(norm, linears):
        for lin in linears:
            setw(lin, lin.weight.double() * norm.weight.double()[None, :])
        norm.weight.fill_(1.0)

    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        cfg.tie_word_embeddings = False
        body.embed_tokens.weight.copy_((body.embed_tokens.weight.double() @ q).float())
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        for layer in body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            fold(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
            fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                setw(lin, lin.weight.double() @ q)
            for lin in (attn.o_proj, mlp.down_proj):
                setw(lin, q.T @ lin.weight.double())
            if "r2" in parts:
                r = rotation(head_dim, gen)
                v = attn.v_proj.weight.double().unflatten(0, (-1, head_dim))      # [kv heads, d, in]
                setw(attn.v_proj, torch.einsum("hdk,de->hek", v, r).flatten(0, 1))
                o = attn.o_proj.weight.double().unflatten(1, (-1, head_dim))      # [out, heads, d]
                setw(attn.o_proj, torch.einsum("nhd,de->nhe", o, r).flatten(1))
            if "r4" in parts:
                h = rotation(mlp.down_proj.in_features, gen)
                setw(mlp.down_proj, mlp.down_proj.weight.double() @ h)
                mlp.down_proj = RotatedInput(mlp.down_proj, h)
        fold(body.norm, [model.lm_head])
        setw(model.lm_head, model.lm_head.weight.double() @ q)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["none", "r1", "r1+r2+r4"])
    ap.add_argument("--formats", nargs="+", default=["int4<asym,g128>", "int3<asym,g128>"])
    ap.add_argument("--method", default="gptq", choices=["rtn", "gptq"])
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows of 512 tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="the draw of the rotations' random signs")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args()

    import mxc
    from mxc.calibrate import text_batches

    torch.set_num_threads(args.threads)
    rows = []
    for variant in args.variants:
        model, tok = mxc.models.load_smollm2()
        if variant != "none":
            rotate(model, variant, seed=args.seed)
        calibration = text_batches(tok, n=8, seq_len=512)
        float_ppl = mxc.eval.perplexity(model, tok, windows=args.windows)
        row = {"variant": variant, "float": float_ppl}
        for fmt in args.formats:
            plan = mxc.Plan(rules=(mxc.Rule("lm_head"),), default=mxc.Rule(weight=fmt), name=fmt)
            if args.method == "rtn":
                plan = dataclasses.replace(plan, method="rtn", clip_search=False)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled = mxc.compile(model, plan, calibration=calibration if args.method == "gptq" else None)
            report = compiled.report()
            row[fmt] = mxc.eval.perplexity(compiled, tok, windows=args.windows)
            print(f"{variant} {args.method} {fmt}: perplexity {row[fmt]:.3f}, {len(report.layers)} quantized "
                  f"linears, {report.avg_bits:.3f} bits, {time.perf_counter() - start:.0f} s", flush=True)
        rows.append(row)

    when = datetime.date.today().isoformat()
    lines = [f"## Rotation probe: Hadamard rotations folded into SmolLM2-135M, {args.method} ({when})", "",
             f"{platform.machine()} CPU ({os.cpu_count()} cores), {args.threads} threads, torch {torch.__version__}, "
             f"reference backend. Command: `python benchmarks/rotation.py --variants {' '.join(args.variants)} "
             f"--method {args.method} --threads {args.threads} --seed {args.seed}`. Perplexity over "
             f"{args.windows}×512 tokens; uniform plans, lm_head float; "
             + ("GPTQ + clipping search on 8×512 calibration tokens." if args.method == "gptq" else
                "round to nearest, no clipping search."),
             "", "| rotation | float | " + " | ".join(args.formats) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in args.formats) + " |"]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['float']:.3f} | " + " | ".join(f"{row[f]:.3f}" for f in args.formats)
                     + " |")
    text = "\n".join(lines) + "\n"
    publish(text, write=not args.no_write)


if __name__ == "__main__":
    main()
