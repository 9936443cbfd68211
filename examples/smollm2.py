"""Compile the real SmolLM2-135M with a mixed-precision plan on the best backend here, save
the artifact, load it back (no model class, no calibration data), and show the report, the
perplexity on real text and a greedy completion, both from the reloaded artifact.

    python examples/smollm2.py [--plan PRESET|plan.json|float] [--out DIR] [--backend auto]
                               [--prompt TEXT] [--tokens N] [--dump-ir DIR] [--windows N]

The default plan, `examples/smollm2-mixed.json`: int4 weights in groups of 64, int8 per
channel for the sensitive `down_proj` and `v_proj`, an int8 KV cache, lm_head in float. A
quantizing plan runs GPTQ and a clipping search calibrated on real text that the perplexity
windows never see. `--backend auto` picks the Triton backend when a CUDA GPU is present and
the reference backend otherwise.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import mxc  # noqa: E402


def greedy(compiled: mxc.CompiledModel, ids: torch.Tensor, tokens: int) -> torch.Tensor:
    """Greedy decoding with the compiled model (the whole sequence each step: no KV cache yet)."""
    for _ in range(tokens):
        nxt = compiled(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default=str(Path(__file__).with_name("smollm2-mixed.json")),
                    help="a preset name, a plan JSON file, or 'float' (default: examples/smollm2-mixed.json)")
    ap.add_argument("--out", default=None, help="artifact directory (default: a temporary one)")
    ap.add_argument("--backend", default="auto", help="auto, reference, interpret or triton")
    ap.add_argument("--prompt", default="The three primary colors are")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows of 512 tokens")
    ap.add_argument("--dump-ir", default=None, help="write the IR after every pass to this directory")
    args = ap.parse_args()

    plan = None if args.plan == "float" else args.plan
    t0 = time.perf_counter()
    model, tok = mxc.models.load_smollm2()
    t1 = time.perf_counter()
    calibration = tok if plan else None
    built = mxc.compile(model, plan, dump_ir=args.dump_ir, calibration=calibration, backend=args.backend)
    t2 = time.perf_counter()
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="smollm2-mxc-")) / "artifact"
    mxc.save(built, out_dir, tokenizer=tok, overwrite=True)
    del model, built  # from here on only the artifact is used
    compiled = mxc.load(out_dir)
    t3 = time.perf_counter()
    size = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    print(f"loaded SmolLM2-135M in {t1 - t0:.1f} s, compiled in {t2 - t1:.1f} s ({compiled.backend} backend); "
          f"saved to {out_dir} ({size / 2**20:.1f} MiB) and loaded back in {t3 - t2:.1f} s\n")
    if compiled.plan is not None:
        print(compiled.plan.explain())
    print(compiled.report())
    print("\nfirst lines of the IR:")
    print("\n".join(compiled.ir.splitlines()[:4] + ["  ..."] + compiled.ir.splitlines()[-3:]))

    ppl = mxc.eval.perplexity(compiled, tok, windows=args.windows)
    print(f"\nperplexity of the reloaded artifact (pydoc_data.topics, {args.windows}x512 tokens): {ppl:.4f}")

    ids = tok(args.prompt, return_tensors="pt").input_ids
    out = greedy(compiled, ids, args.tokens)
    print(f"\ngreedy completion from the reloaded artifact:\n{tok.decode(out[0], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
