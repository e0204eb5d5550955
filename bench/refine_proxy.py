"""Refinement's effect on the proxy loss, layer by layer, from stored Hessians (no evaluation).

For each chosen linear of SmolLM2 (or ``--model``), bit width and method (LDLQ with H_x, YAQA
with the Sketch factors, shrunk as ``--shrinkage`` says) it rounds once without refinement and
once per ``--refine`` value, and reports the drop of the damped proxy that refinement minimises
(rotated basis, what LDLQ/YAQA minimise), of the undamped proxy that ``round_weight`` reports,
and refinement's time.  Writes bench/results/refine_proxy<tag>.{json,md}.

    python bench/refine_proxy.py --hessians yaqa-out/quality/hessians-B1-... --device cuda \\
        --blocks 0,10,20,29 --refine 8,32
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from yaqa import load_model
from yaqa.hessians.storage import load_hessians
from yaqa.quantize_model import _factors
from yaqa.rounding import round_weight

RESULTS = Path(__file__).resolve().parent / "results"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    import platform

    return (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
            f"threads (torch {torch.__version__})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--hessians", required=True, help="a Sketch-B (or A) Hessian directory")
    ap.add_argument("--blocks", default="0,15,29")
    ap.add_argument("--linears", default="self_attn.q_proj,self_attn.o_proj,mlp.up_proj,"
                                         "mlp.down_proj")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--methods", default="ldlq,yaqa")
    ap.add_argument("--refine", default="8,32")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--shrinkage", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    dev = torch.device(args.device)
    refines = [int(r) for r in args.refine.split(",")]
    model, _ = load_model(args.model)
    blocks = [int(b) for b in args.blocks.split(",")]
    hs = load_hessians(args.hessians, model, blocks=blocks)
    rows = []
    for b in blocks:
        for rel in args.linears.split(","):
            name = f"model.layers.{b}.{rel}"
            W = model.get_submodule(name).weight.detach().to(dev, torch.float32)
            for method in args.methods.split(","):
                H_in, H_out, _, _ = _factors(method, hs, name, args.shrinkage)
                H_in = H_in.to(dev)
                H_out = None if H_out is None else H_out.to(dev)
                for bits in (int(x) for x in args.bits.split(",")):
                    kw = dict(quantizer=f"int{bits}", method=method, incoherence=True,
                              group_size=args.group_size, return_details=True)
                    t = time.perf_counter()
                    base = round_weight(W, H_in, H_out, **kw)
                    t_base = time.perf_counter() - t
                    for r in refines:
                        res = round_weight(W, H_in, H_out, refine=r, **kw)
                        st = res.refine
                        rows.append({"layer": name, "shape": list(W.shape), "method": method,
                                     "bits": bits, "refine": r, "rounds": st.rounds,
                                     "tries": st.tries, "steps": st.changed,
                                     "damped_reduction": st.reduction,
                                     "proxy_reduction": 1 - res.proxy_loss / base.proxy_loss,
                                     "refine_seconds": st.seconds, "round_seconds": t_base})
                        logging.info("%s %s int%d refine %d: damped -%.2f%%, proxy -%.2f%%, "
                                     "%.2f s (rounding %.2f s)", name, method, bits, r,
                                     100 * st.reduction, 100 * rows[-1]["proxy_reduction"],
                                     st.seconds, t_base)
    meta = {"machine": machine(dev), "command": "python bench/refine_proxy.py "
            + " ".join(sys.argv[1:] if argv is None else argv), "hessians": args.hessians,
            "shrinkage": args.shrinkage, "group_size": args.group_size}
    lines = table(rows, meta)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"refine_proxy{args.tag}.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2))
    (RESULTS / f"refine_proxy{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def table(rows: list[dict], meta: dict) -> list[str]:
    lines = ["# Refinement: proxy-loss reduction per layer", "",
             f"- machine: {meta['machine']}", f"- command: `{meta['command']}`",
             f"- Hessians: {meta['hessians']}; YAQA shrinkage {meta['shrinkage']}; int-k "
             f"g{meta['group_size']}, per-layer incoherence", "",
             "damped: the objective refinement and the rounding minimise (damped factors, "
             "rotated basis); proxy: round_weight's undamped proxy.  Reductions relative to the "
             "unrefined rounding of the same layer.", "",
             "| layer | shape | method | bits | refine | rounds (tries) | damped | proxy | "
             "refine s | rounding s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer'].replace('model.layers.', '')} | {r['shape'][0]}x"
                     f"{r['shape'][1]} | {r['method']} | {r['bits']} | {r['refine']} | "
                     f"{r['rounds']} ({r['tries']}) | -{100 * r['damped_reduction']:.2f}% | "
                     f"-{100 * r['proxy_reduction']:.2f}% | {r['refine_seconds']:.2f} | "
                     f"{r['round_seconds']:.2f} |")
    lines += ["", "Means over layers:", "", "| method | bits | refine | damped | proxy | "
              "refine s |", "|---|---|---|---|---|---|"]
    keys = dict.fromkeys((r["method"], r["bits"], r["refine"]) for r in rows)
    for m, b, ref in keys:
        sel = [r for r in rows if (r["method"], r["bits"], r["refine"]) == (m, b, ref)]
        k = len(sel)
        lines.append(f"| {m} | {b} | {ref} | "
                     f"-{100 * sum(r['damped_reduction'] for r in sel) / k:.2f}% | "
                     f"-{100 * sum(r['proxy_reduction'] for r in sel) / k:.2f}% | "
                     f"{sum(r['refine_seconds'] for r in sel) / k:.2f} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
