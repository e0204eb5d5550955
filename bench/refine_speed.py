"""Refinement's cost at real layer shapes: ``round_weight`` with and without ``refine``.

    python bench/refine_speed.py --device cuda                  # Llama-3.1-8B shapes
    python bench/refine_speed.py --device cpu --shapes 576x1536 # SmolLM2 shape

Synthetic factors as in ``bench/rounding.py`` (rank n/2, decaying spectrum), int4 g128 with
incoherence.  Each row: the whole ``round_weight`` call without refinement and with R rounds,
the refinement's own time, batches tried and the relative proxy reduction, and a projection to
Llama-3.1-8B's 224 linears (per-shape counts).  Writes
``bench/results/refine_speed_<device><tag>.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounding import machine, sync, synthetic_factor  # noqa: E402

from yaqa.quantizers import make_quantizer  # noqa: E402
from yaqa.rounding import round_weight  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Linears per shape in Llama-3.1-8B (32 blocks): q/o 4096², k/v 1024×4096, gate/up 14336×4096,
# down 4096×14336.
LLAMA_8B = {"4096x4096": 64, "1024x4096": 64, "14336x4096": 64, "4096x14336": 32}


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=",".join(LLAMA_8B))
    ap.add_argument("--methods", default="ldlq,yaqa")
    ap.add_argument("--refine", default="8,32")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128,
                    help="must divide every shape's input width (64 for SmolLM2's 576)")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    args = ap.parse_args()
    dev = args.device
    q = make_quantizer(f"int{args.bits}", group_size=args.group_size)
    rows = []
    for shape in args.shapes.split(","):
        m, n = (int(v) for v in shape.split("x"))
        gen = torch.Generator().manual_seed(m + 7 * n)
        W = (torch.randn(m, n, generator=gen) * 0.02).to(dev)
        Hi, Ho = synthetic_factor(n, dev, gen), synthetic_factor(m, dev, gen)
        for method in args.methods.split(","):
            def run(r):
                return round_weight(W, Hi, Ho if method == "yaqa" else None, q, method,
                                    incoherence=True, refine=r, return_details=True)
            run(0)  # warm-up
            _, base = timed(lambda: run(0), dev)
            for r in (int(v) for v in args.refine.split(",")):
                res, t = timed(lambda: run(r), dev)
                st = res.refine
                rows.append({"shape": shape, "method": method, "refine": r, "round_s": base,
                             "with_refine_s": t, "refine_s": st.seconds, "tries": st.tries,
                             "rounds": st.rounds, "reduction": st.reduction})
                print(json.dumps(rows[-1]), flush=True)
    lines = [f"# Refinement cost at layer shapes ({dev})", "",
             f"- machine: {machine(dev)}",
             f"- command: `python bench/refine_speed.py {' '.join(sys.argv[1:])}`",
             f"- int{args.bits} g{args.group_size}, incoherence on, synthetic factors (bench/rounding.py)", "",
             "| shape | method | refine | round s | + refine s | refine s | tries | damped proxy |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['method']} | {r['refine']} | {r['round_s']:.2f} | "
                     f"{r['with_refine_s']:.2f} | {r['refine_s']:.2f} | {r['tries']} | "
                     f"{-100 * r['reduction']:.1f}% |")
    if all(s in LLAMA_8B for s in args.shapes.split(",")):
        lines += ["", "Projected to Llama-3.1-8B's 224 linears (per-shape counts):", "",
                  "| method | refine | rounding min | refinement min |", "|---|---|---|---|"]
        for method in args.methods.split(","):
            for r in sorted({x["refine"] for x in rows}):
                sel = [x for x in rows if x["method"] == method and x["refine"] == r]
                rnd = sum(LLAMA_8B[x["shape"]] * x["round_s"] for x in sel) / 60
                ref = sum(LLAMA_8B[x["shape"]] * x["refine_s"] for x in sel) / 60
                lines.append(f"| {method} | {r} | {rnd:.1f} | {ref:.1f} |")
    RESULTS.mkdir(exist_ok=True)
    stem = f"refine_speed_{dev.split(':')[0]}{args.tag}"
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
