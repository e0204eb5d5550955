"""Issue 13 experiment: Sketch-B factors combined with Sketch A's, or shrunk towards other targets.

One calibration set, Sketch B and Sketch A collected once each; every variant is YAQA rounding
of the same linears from a different pair of factors, evaluated against the original in one
joint sweep per bit width. Writes bench/results/combine<tag>.{json,md}.

    python bench/combine.py --device cuda --calib 1024x512 --bits 4,3 --mix 0.25,0.5 --tag _h100

Variants (H' = H / mean diagonal, so mixes weigh both sketches alike):
- ldlq: H_x alone; b-auto: Sketch B with its Ledoit–Wolf shrinkage (the default);
- a: Sketch A as collected;
- ab<a>: (1 − a)·B' + a·A' for both factors, B after its own shrinkage;
- b-diag: H_out shrunk towards its own diagonal (Ledoit–Wolf amount for that target), H_in as auto;
- b-to-a: each B factor shrunk towards A's (Ledoit–Wolf amounts for that target).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def unit(h: torch.Tensor) -> torch.Tensor:
    return h / torch.diagonal(h).mean().clamp_min(torch.finfo(h.dtype).tiny)


def variants(hb, ha, mixes: list[float]) -> dict[str, dict]:
    """{variant: {layer: LayerHessian}} from Sketch B's and Sketch A's factors."""
    from yaqa.hessians.shrinkage import Shrinkage, ledoit_wolf_amount, shrink, shrink_layer
    from yaqa.hessians.storage import LayerHessian

    def lh(b, H_in, H_out, H_x=None):
        return LayerHessian(b.name, H_in, H_out, H_x, b.n_seqs, b.n_tokens, "B", 1)

    out: dict[str, dict] = {"ldlq": {}, "b-auto": {}, "a": {}, "b-diag": {}, "b-to-a": {}}
    out.update({f"ab{m:g}": {} for m in mixes})
    amounts: dict[str, list] = {k: [] for k in out}
    auto = Shrinkage.parse("auto")
    for name in hb:
        b, a = hb[name], ha[name]
        est = b.shrinkage
        out["ldlq"][name] = b
        out["b-auto"][name] = b
        out["a"][name] = lh(b, a.H_in, a.H_out)
        Bi, Bo, _, _ = shrink_layer(b.H_in, b.H_out, b.H_x, est, auto)
        for m in mixes:
            out[f"ab{m:g}"][name] = lh(b, (1 - m) * unit(Bi) + m * unit(a.H_in),
                                       (1 - m) * unit(Bo) + m * unit(a.H_out))
        mean_sq, n = float(est["mean_sq"]), int(est["n_seqs"])
        d_out = torch.diag(torch.diagonal(b.H_out))
        a_diag = ledoit_wolf_amount(b.H_out, d_out, mean_sq, n)
        out["b-diag"][name] = lh(b, Bi, shrink(b.H_out, d_out, a_diag))
        a_in = ledoit_wolf_amount(b.H_in, a.H_in, mean_sq, n)
        a_out = ledoit_wolf_amount(b.H_out, a.H_out, mean_sq, n)
        out["b-to-a"][name] = lh(b, shrink(b.H_in, a.H_in, a_in), shrink(b.H_out, a.H_out, a_out))
        amounts["b-auto"].append((est["in"], est["out"]))
        amounts["b-diag"].append((est["in"], a_diag))
        amounts["b-to-a"].append((a_in, a_out))
    out["_amounts"] = {k: [sum(x) / len(x) for x in zip(*v)] for k, v in amounts.items() if v}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--calib", default="1024x512", metavar="NxT")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--mix", default="0.25,0.5")
    ap.add_argument("--power-iters", type=int, default=2, help="Sketch A's ALS steps")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="yaqa-out/combine")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import yaqa
    from yaqa import evaluate
    from yaqa.models import load_model
    from yaqa.nn import set_dense_cache
    from yaqa.pipeline import Calibration, collect_for, evaluation_windows
    from yaqa.recipe import get_recipe

    n, ctx = (int(v) for v in args.calib.lower().split("x"))
    mixes = [float(m) for m in args.mix.split(",") if m]
    t0 = time.perf_counter()
    model, tok = load_model(None, device=args.device)
    calib = Calibration("wikitext2-valid", n, ctx, 0).load(tok, model)
    ev = evaluation_windows(tok, model, "wikitext2-test", 512, args.n_eval)
    out = Path(args.out)
    hb = collect_for(model, get_recipe("yaqa-b"), calib, out / "hb", batch_size=args.batch_size,
                     overwrite=True, progress=False)
    ha = collect_for(model, get_recipe("yaqa-a", power_iters=args.power_iters), calib,
                     out / "ha", batch_size=args.batch_size, overwrite=True, progress=False)
    hb = {k: hb[k] for k in hb}
    ha = {k: ha[k] for k in ha}
    t_coll = time.perf_counter() - t0
    vs = variants(hb, ha, mixes)
    amounts = vs.pop("_amounts")
    rows = []
    for bits in (int(b) for b in args.bits.split(",")):
        models, names = [], []
        for vname, hs in vs.items():
            q = copy.deepcopy(model)
            yaqa.quantize(q, hs, method="ldlq" if vname == "ldlq" else "yaqa",
                          quantizer=f"int{bits}", group_size=args.group_size, scale_search="mse",
                          incoherence=True, shrinkage="auto" if vname == "b-auto" else "off",
                          refine=0, progress=False)  # like for like: no device default
            set_dense_cache(q, True)
            models.append(q)
            names.append(vname)
        res = evaluate.compare_many(model, models, ev, batch_size=args.batch_size, progress=False)
        ldlq = res.results[0].kl
        for vname, r in zip(names, res.results):
            rows.append({"bits": bits, "variant": vname, "kl": r.kl, "ratio": r.kl / ldlq,
                         "amounts": amounts.get(vname)})
            logging.info("int%d %s: KL %.5f (%.3f)", bits, vname, r.kl, r.kl / ldlq)
        del models
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    meta = {"machine": dev, "torch": torch.__version__,
            "command": "python bench/combine.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "calibration": f"{n} x {ctx} wikitext2-valid", "eval": f"{args.n_eval} x 512 wikitext2-test",
            "collect_seconds": t_coll, "total_seconds": time.perf_counter() - t0}
    RESULTS.mkdir(exist_ok=True)
    stem = f"combine{args.tag}"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Sketch B combined with Sketch A / other shrinkage targets ({stem})", "",
             *(f"- {k}: {v}" for k, v in meta.items()), "",
             "YAQA int-k g64, MSE scales, incoherence on. KL / LDLQ in brackets; [mean amounts "
             "H_in / H_out] where estimated.", "",
             "| bits | variant | KL | KL / LDLQ | amounts |", "|---|---|---|---|---|"]
    for r in rows:
        am = "" if not r["amounts"] else f"{r['amounts'][0]:.2f} / {r['amounts'][1]:.2f}"
        lines.append(f"| {r['bits']} | {r['variant']} | {r['kl']:.5f} | {r['ratio']:.3f} | {am} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
