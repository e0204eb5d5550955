"""LDLQ's tile width against column-by-column GPTQ (tiles of 1) on stored Hessians, CPU or GPU.

LDLQ feeds each tile's rounding error to the columns still to round; GPTQ does it column by
column.  Same Hessians, quantizer and evaluation windows for every width, so the KL column says
how much the coarser feedback costs.  Default: the embedded SmolLM2 and the recipe of `yaqa run`
(int4 g64, max-abs scales, incoherence on), 16 windows of 512 tokens of WikiText-2 test.

    python bench/ldlq_tiles.py --hessians yaqa-out/hessians-B1-<id> --tiles 1,16
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

import yaqa
from yaqa.data import eval_windows
from yaqa.hessians import load_hessians
from yaqa.models import load_model
from yaqa.recipe import get_recipe

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hessians", required=True, help="a Hessian directory of the model")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    ap.add_argument("--tiles", default="1,16")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tag", default="_cpu")
    args = ap.parse_args()
    model, tok = load_model(args.model, device=args.device)
    hs = load_hessians(args.hessians, model, device=args.device, stream=True)
    ev = eval_windows(tok, "wikitext2-test", ctx=512, n=args.n_eval)
    rows = []
    for tile in (int(t) for t in args.tiles.split(",")):
        q = copy.deepcopy(model)
        t = time.perf_counter()
        yaqa.quantize(q, hs, recipe=get_recipe("ldlq", bits=args.bits, block_size=tile),
                      progress=False)
        seconds = time.perf_counter() - t
        r = yaqa.evaluate.compare(model, q, ev, batch_size=4, progress=False)
        rows.append({"tile": tile, "kl": r.kl, "ppl": r.ppl, "top1": r.top1,
                     "quantize_s": seconds})
        print(rows[-1], flush=True)
        del q
    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda")
               else f"CPU {platform.machine()}, {torch.get_num_threads()} threads")
    meta = {"machine": f"{machine} (torch {torch.__version__})",
            "command": "python bench/ldlq_tiles.py " + " ".join(sys.argv[1:])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"ldlq_tiles{args.tag}.json").write_text(json.dumps({**meta, "rows": rows},
                                                                   indent=1))
    lines = [f"# LDLQ tile width against column-by-column GPTQ ({args.tag.lstrip('_')})", "",
             f"- machine: {meta['machine']}", f"- command: `{meta['command']}`",
             f"- Hessians: {args.hessians} (LDLQ uses their H_x)",
             f"- int{args.bits} g64 asymmetric, max-abs scales, incoherence on; "
             f"{args.n_eval} x 512 windows of WikiText-2 test", "",
             "| tile | KL | ppl | top-1 | quantize s |", "|---|---|---|---|---|"]
    lines += [f"| {r['tile']} | {r['kl']:.4f} | {r['ppl']:.2f} | {r['top1']:.3f} | "
              f"{r['quantize_s']:.1f} |" for r in rows]
    (RESULTS / f"ldlq_tiles{args.tag}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
