"""Does bf16 in the Sketch-B statistics move the final KL?  SmolLM2-135M on CPU.

Collects Sketch B once per precision mode on the same calibration windows (bf16 levels are
emulated exactly on CPU: operands rounded to bf16, products summed in fp32, as tensor cores do),
compares each mode's factors with the "full" (fp32) ones (relative Frobenius error per factor),
then rounds a fresh copy of the model with each (YAQA int4 g64, shrinkage auto) and reports
KL against the unquantized model on held-out windows.

    python bench/stats_precision.py --n-seqs 32 --ctx 256 --modes full bf16
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import yaqa
from yaqa.data import calibration_windows, eval_windows, find_wikitext2
from yaqa.models import get_adapter

RESULTS = Path(__file__).parent / "results"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-seqs", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--eval-seqs", type=int, default=16)
    ap.add_argument("--eval-ctx", type=int, default=512)
    ap.add_argument("--modes", nargs="+", default=["full", "bf16"])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64, help="int4 group (divides 576, 1536)")
    ap.add_argument("--blocks", type=lambda v: [int(x) for x in v.split(",")], default=None,
                    help="collect only these decoder blocks (the others round against identity "
                         "factors, the same in every mode): a cheaper comparison on CPU")
    ap.add_argument("--tag", default="_cpu")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    model, tok = yaqa.load_model(None)
    wt = find_wikitext2()
    calib = calibration_windows(tok, wt / "wiki.valid.tokens", args.n_seqs, args.ctx, seed=0,
                                model=model, progress=False)
    evals = eval_windows(tok, wt / "wiki.test.raw", args.eval_ctx, args.eval_seqs)
    hs, secs = {}, {}
    for mode in args.modes:
        t = time.perf_counter()
        hs[mode] = yaqa.collect_hessians(model, calib, sketch="B", precision=mode,
                                         batch_size=args.batch_size, blocks=args.blocks,
                                         progress=False)
        secs[mode] = time.perf_counter() - t
        print(f"{mode}: collected in {secs[mode]:.0f} s", flush=True)
    ref_mode = args.modes[0]
    identity = {name: SimpleNamespace(H_in=torch.eye(mod.in_features), H_x=None, shrinkage=None,
                                      H_out=torch.eye(mod.out_features))
                for name, _, mod in get_adapter(model).named_linears(model)
                if name not in hs[ref_mode]}
    out = {"machine": platform.node(), "torch": torch.__version__,
           "command": "python bench/stats_precision.py " + " ".join(sys.argv[1:]),
           "calibration": f"{args.n_seqs} x {args.ctx} WikiText-2 validation windows, seed 0",
           "eval": f"{args.eval_seqs} x {args.eval_ctx} WikiText-2 test windows",
           "blocks": args.blocks or "all",
           "collect_seconds": secs, "modes": {}}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"stats_precision{args.tag}.json"
    for mode in args.modes:
        row = out["modes"].setdefault(mode, {})
        if mode != ref_mode:
            errs = {k: [rel(getattr(hs[mode][n], k), getattr(hs[ref_mode][n], k))
                        for n in hs[mode]] for k in ("H_in", "H_out", "H_x")}
            row["factor_rel_err"] = {k: {"median": statistics.median(v), "max": max(v)}
                                     for k, v in errs.items()}
            a = [hs[mode][n].shrinkage["out"] - hs[ref_mode][n].shrinkage["out"] for n in hs[mode]]
            row["shrink_out_max_abs_diff"] = max(abs(x) for x in a)
            print(mode, "factors:", json.dumps(row), flush=True)
    path.write_text(json.dumps(out, indent=1))  # the factor errors survive a failed rounding
    for mode in args.modes:
        row = out["modes"].setdefault(mode, {})
        q = copy.deepcopy(model)
        yaqa.quantize(q, {**identity, **hs[mode]}, method="yaqa", quantizer="int4",
                      group_size=args.group_size, refine=0, progress=False)
        r = yaqa.evaluate.compare(model, q, evals, batch_size=4, progress=False)
        row.update(kl=r.kl, ppl=r.ppl, ref_ppl=r.ref_ppl, top1=r.top1)
        print(mode, json.dumps(row), flush=True)
        del q
        path.write_text(json.dumps(out, indent=1))  # after every mode: partial runs keep rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
