"""Would allocating formats per block of output rows, instead of per tensor, pay? The fisher
sensitivity (`mxc.sensitivity`, objective "fisher") split by rows, and the exact allocation
solved on it, at uniform plans' sizes.

    python benchmarks/row_blocks.py                          # SmolLM2-135M, 64x512 tokens, blocks of 192 and 64 rows
    python benchmarks/row_blocks.py --blocks 64 --budgets w4a16-g128 --no-write

GPTQ treats the rows of a weight independently (one Hessian, error fed along a row), and so
do the candidates' scales, clipping and outlier split: rows lo..hi of a block in format F
are rows lo..hi of the whole weight quantized in F. So one measurement serves every block
size: per window, the score of a change D restricted to a block is ⟨D[lo:hi], G[lo:hi]⟩,
and a block's error is Σ_windows score² / (2 · positions) as for whole tensors. The blocks
of one tensor are then treated as separate tensors by the same exact solver, which assumes
their errors add up (the cross terms between blocks of one tensor are dropped: the table
reports how much that changes the whole tensors' summed error).

Nothing is compiled: a row-split linear is not something the compiler builds. The figure
is the solver's own prediction (KL per token, nats), per tensor against per block, under
the same byte budget (the allocated weights' bytes of the uniform plan named; gather
indices of outlier candidates are left out of both). It answers whether building the split
is worth it.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import frontier  # noqa: E402
from _results import publish  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sens-windows", type=int, default=64)
    ap.add_argument("--sens-len", type=int, default=512)
    ap.add_argument("--blocks", type=int, nargs="+", default=[192, 64], help="rows per block (the last may be short)")
    ap.add_argument("--budgets", nargs="+", default=["w3a16-g128", "w4a16-g128"], help="uniform plans whose bytes are budgets")
    ap.add_argument("--candidates", nargs="+", default=frontier.CANDIDATES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import torch

    import mxc
    from mxc import sensitivity as S
    from mxc.calibrate import text_batches
    from mxc.passes.allocate import Choice, solve, total_error
    from mxc.runtime.reference import ReferenceExecutor

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tok = mxc.models.load_smollm2()
    n, seq_len = frontier.CALIBRATION
    calibration = text_batches(tok, n=n, seq_len=seq_len)
    scored = text_batches(tok, n=args.sens_windows, seq_len=args.sens_len, skip=n * seq_len)
    graph, batches, _, stats = S._prepare(model, scored, None, calibration, None)
    plan = {t: S.formats_for({"lm_head:weight": [], "weight": args.candidates}, t) for t in S.targets(graph)}
    plan = {t: [c for c in cands if c.fmt is not None] for t, cands in plan.items() if cands}
    order = sorted(plan, key=lambda t: t.index)
    executor = ReferenceExecutor(graph, check_shapes=False)
    weights = S.Weights(graph, stats, "gptq")
    try:
        deltas = S.weight_changes(executor, graph, plan, weights)
    finally:
        weights.close()
    sizes = [0, *args.blocks]  # 0: the whole tensor
    spans = {b: {t: [(lo, min(t.shape[0], lo + (b or t.shape[0]))) for lo in range(0, t.shape[0], b or t.shape[0])]
                 for t in order} for b in sizes}
    squares = {b: {t: torch.zeros(len(plan[t]), len(spans[b][t]), dtype=torch.float64) for t in order} for b in sizes}
    positions = 0
    for count, grads in S.fisher_gradients(executor, graph, batches, order):
        for t, g in grads.items():
            d = deltas[t]
            rows = torch.stack([(d[c].float() * g).sum(-1) for c in range(d.shape[0])]).double()  # [C, N]
            for b in sizes:
                block = torch.stack([rows[:, lo:hi].sum(-1) for lo, hi in spans[b][t]], dim=1)
                squares[b][t] += block * block
        positions += count
    measured_s = time.perf_counter() - start

    def choices(b: int) -> dict:
        out = {}
        for t in order:
            for j, (lo, hi) in enumerate(spans[b][t]):
                name = f"{t.tensor}[{lo}:{hi}]"
                out[name] = []
                for i, c in enumerate(plan[t]):
                    size, bits = S.candidate_size(c, (hi - lo, t.shape[1]))
                    out[name].append(Choice(name, c.fmt, size, bits, (hi - lo) * t.shape[1],
                                            float(squares[b][t][i, j]) / (2 * positions), c.outliers))
        return out

    tables = {b: choices(b) for b in sizes}
    whole = sum(float(squares[0][t].sum()) for t in order)
    lines = []
    for b, ch in tables.items():
        additive = sum(float(squares[b][t].sum()) for t in order) / whole
        cells = []
        for budget in args.budgets:
            fmt = S.Candidate.parse(frontier.UNIFORM[budget])
            limit = sum(S.candidate_size(fmt, t.shape)[0] for t in order)
            t0 = time.perf_counter()
            got = solve(ch, budget_bytes=limit)
            cells.append(f"{total_error(got):.4f} ({time.perf_counter() - t0:.0f} s)")
        lines.append(f"| {'whole tensor' if b == 0 else f'{b} rows'} | {len(ch)} | {additive:.3f} | " + " | ".join(cells) + " |")
    uniform = []
    for budget in args.budgets:  # every weight in the uniform plan's format, where it is a candidate
        key = str(S.Candidate.parse(frontier.UNIFORM[budget]))
        picks = [c for row in tables[0].values() for c in row if str(S.Candidate(c.fmt, c.outliers)) == key]
        uniform.append(f"{sum(c.error for c in picks):.4f}" if picks else "—")
    date = datetime.date.today().isoformat()
    named = " (frontier.py's)" if args.candidates == frontier.CANDIDATES else ""
    text = "\n".join([
        f"## Row-block allocation probe: the fisher sensitivity per block of output rows, SmolLM2-135M ({date})",
        "",
        f"{platform.machine()} CPU ({args.threads} threads), torch {torch.__version__}, reference backend. Command: "
        f"`python benchmarks/row_blocks.py --sens-windows {args.sens_windows} --sens-len {args.sens_len} --blocks "
        f"{' '.join(map(str, args.blocks))} --budgets {' '.join(args.budgets)}`. {len(order)} weights, "
        f"{len(args.candidates)} candidates{named}, GPTQ + clipping search on {n}×{seq_len} calibration tokens, "
        f"scored on {positions} held-out tokens; measured in {measured_s:.0f} s. Predicted KL (nats/token) of the "
        "exact allocation at each uniform plan's bytes of the allocated weights (solve time in brackets); "
        "\"blocks / whole\": the summed error of all candidates split into blocks over the same unsplit (1: the blocks "
        "add up to the tensor).",
        "",
        f"| allocated per | items | blocks / whole | " + " | ".join(f"at {b}'s size" for b in args.budgets) + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in args.budgets) + " |",
        f"| (uniform plan itself) | {len(order)} | | " + " | ".join(uniform) + " |",
        *lines,
        "",
    ])
    publish(text, write=not args.no_write)


if __name__ == "__main__":
    main()
