"""Two saved sensitivity measurements of one model, compared: the Spearman rank correlation of
their errors over the (tensor, candidate) pairs both hold, overall and per candidate, and
the ratio of their summed errors per candidate.

    python benchmarks/compare_sensitivity.py benchmarks/out/sensitivity-smollm2-gptq-fisher-heldout-64x512.json \\
        benchmarks/out/sensitivity-smollm2-gptq-heldout-2x512.json

The files are what `benchmarks/frontier.py` saves (`Sensitivity.to_dict`): e.g. the objective
"fisher" (the KL to second order) against the KL measured directly (`--objective kl`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first", type=Path)
    ap.add_argument("second", type=Path)
    args = ap.parse_args()

    from mxc import sensitivity

    a, b = (sensitivity.Sensitivity.from_dict(json.loads(p.read_text())) for p in (args.first, args.second))
    pairs: dict[str, list[tuple[float, float]]] = {}
    for tensor in sorted(set(a) & set(b)):
        theirs = {str(sensitivity.Candidate(c.fmt, c.outliers)): c.error for c in b[tensor]}
        for c in a[tensor]:
            key = str(sensitivity.Candidate(c.fmt, c.outliers))
            if c.fmt is not None and key in theirs:
                pairs.setdefault(key, []).append((c.error, theirs[key]))
    if not pairs:
        raise SystemExit(f"{args.first} and {args.second} share no (tensor, candidate) pair")
    every = [p for rows in pairs.values() for p in rows]
    print(f"{args.first.name}: {a.describe()}")
    print(f"{args.second.name}: {b.describe()}")
    print(f"{len(every)} pairs over {len(set(a) & set(b))} tensors: Spearman "
          f"{sensitivity.spearman([x for x, _ in every], [y for _, y in every]):.3f}")
    print("| candidate | tensors | Spearman | summed error, first / second |")
    print("| --- | ---: | ---: | ---: |")
    for key, rows in pairs.items():
        ratio = sum(x for x, _ in rows) / sum(y for _, y in rows)
        print(f"| {key} | {len(rows)} | {sensitivity.spearman([x for x, _ in rows], [y for _, y in rows]):.3f} | "
              f"{ratio:.3f} |")


if __name__ == "__main__":
    main()
