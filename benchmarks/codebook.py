"""Probe: would non-uniform weights (a k-means codebook per output row, SqueezeLLM-style) beat
mxc's uniform integer formats on SmolLM2-135M at the same bits?

Issue 6's 3.25-bit goal (as good as uniform W4A16 g128) is out of reach for every allocation
of the uniform candidates; a per-row codebook is one of the usual next formats, so this
measures it before a format, kernel and GPTQ variant are built for it. Every linear but
lm_head is replaced by its quantized weight in float (round to nearest, no GPTQ, no
clipping) and the perplexity measured over 8×512 tokens of pydoc text:

* ``int<b>-g128``: mxc's own ``int<b><asym,g128>`` (`fmt.quantize`, then dequantize).
* ``lut<b>``: each row's 2^b values fitted by 1-D k-means (25 Lloyd steps from the row's
  quantiles), weighted by the input channel's activation second moment on 2×512 calibration
  tokens (the last of the text, as the compile takes them), stored as fp16: b bits per
  weight plus 2^b·16/K for the table.

    python benchmarks/codebook.py [--specs int4-g128 int3-g128 lut3 lut4] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

from _results import publish  # benchmarks/, the script's own folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def kmeans_rows(w: torch.Tensor, bits: int, importance: torch.Tensor, steps: int = 25) -> torch.Tensor:
    """`w` [N, K] with each row's values replaced by the nearest of its 2^bits centroids
    (fp16), fitted by weighted Lloyd steps (`importance` [K] weighs each column)."""
    n, k = w.shape
    c = 2**bits
    cent = torch.quantile(w, torch.linspace(0, 1, c + 2, dtype=w.dtype)[1:-1], dim=1).T.contiguous()  # [N, c]
    weight = importance.to(w.dtype)[None, :].expand(n, k)
    for _ in range(steps):
        idx = (w[:, :, None] - cent[:, None, :]).abs().argmin(-1)
        num = torch.zeros(n, c, dtype=w.dtype).scatter_add_(1, idx, w * weight)
        den = torch.zeros(n, c, dtype=w.dtype).scatter_add_(1, idx, weight)
        cent = torch.where(den > 0, num / den.clamp_min(1e-30), cent)
    cent = cent.half().to(w.dtype)
    return cent.gather(1, (w[:, :, None] - cent[:, None, :]).abs().argmin(-1))


def quantized(spec: str, w: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(the weight as `spec` rounds it, its bits per weight)."""
    from mxc.ir import parse_format

    n, k = w.shape
    if spec.startswith("lut"):
        bits = int(spec[3:])
        return kmeans_rows(w, bits, importance), bits + 2**bits * 16 / k
    if spec.startswith("int") and spec.endswith("-g128"):
        fmt = parse_format(f"int{int(spec[3:-5])}<asym,g128>")
        return fmt.dequantize(fmt.quantize(w), k).to(w.dtype), fmt.effective_bits(k)
    raise ValueError(f"spec {spec!r}: expected int<b>-g128 or lut<b>")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="+", default=["int4-g128", "int3-g128", "lut3", "lut4"])
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows of 512 tokens")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    args = ap.parse_args()

    import mxc
    from mxc.calibrate import text_batches

    torch.set_num_threads(args.threads)
    model, tok = mxc.models.load_smollm2()
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied: stays float
    linears = {p: m for p, m in model.named_modules() if isinstance(m, torch.nn.Linear) and p != "lm_head"}
    second = {p: torch.zeros(m.in_features, dtype=torch.float64) for p, m in linears.items()}

    def record(path):
        def hook(module, inputs):
            x = inputs[0].detach().double()
            second[path].add_(x.reshape(-1, x.shape[-1]).pow(2).sum(0))
        return hook

    hooks = [m.register_forward_pre_hook(record(p)) for p, m in linears.items()]
    with torch.no_grad():
        for ids in text_batches(tok, n=2, seq_len=512):
            model(input_ids=ids[None])
    for h in hooks:
        h.remove()
    original = {p: m.weight.detach().clone() for p, m in linears.items()}
    float_ppl = mxc.eval.perplexity(model, tok, windows=args.windows)
    rows = []
    for spec in args.specs:
        start, bits, numel = time.perf_counter(), 0.0, 0
        with torch.no_grad():
            for p, m in linears.items():
                w, b = quantized(spec, original[p].float(), second[p])
                m.weight.copy_(w)
                bits, numel = bits + b * w.numel(), numel + w.numel()
        ppl = mxc.eval.perplexity(model, tok, windows=args.windows)
        rows.append((spec, bits / numel, ppl))
        print(f"{spec}: {bits / numel:.3f} bits, perplexity {ppl:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    with torch.no_grad():
        for p, m in linears.items():
            m.weight.copy_(original[p])

    when = datetime.date.today().isoformat()
    lines = [f"## Codebook probe: per-row k-means weights against uniform int g128 on SmolLM2-135M ({when})", "",
             f"{platform.machine()} CPU ({os.cpu_count()} cores), {args.threads} threads, torch {torch.__version__}, "
             f"eager torch with the quantized weights in float. Command: `python benchmarks/codebook.py --specs "
             f"{' '.join(args.specs)} --threads {args.threads}`. Round to nearest, no GPTQ; lm_head float; perplexity over "
             f"{args.windows}×512 tokens (float {float_ppl:.3f}).", "",
             "| weights | bits per weight | perplexity |", "| --- | ---: | ---: |"]
    lines += [f"| {spec} | {bits:.3f} | {ppl:.3f} |" for spec, bits, ppl in rows]
    text = "\n".join(lines) + "\n"
    publish(text, write=not args.no_write)


if __name__ == "__main__":
    main()
