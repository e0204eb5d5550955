"""What one NVFP4 global scale per vLLM-fused group (q/k/v, gate/up) costs, on SmolLM2-135M.

vLLM serves a fused layer with one global scale, so yaqa gives each fused group the scale of its
largest member (the default); ``--per-layer-global-scale`` keeps one per linear (today's
alternative, which vLLM cannot serve).  This quantizes the embedded SmolLM2-135M-Instruct both ways
and compares KL(original || quantized), perplexity and top-1 agreement on WikiText-2 test windows,
per incoherence mode (the servable ones: none, shared, block; per-layer for reference).
Writes bench/results/nvfp4_shared_scale<tag>.{json,md}.

    python bench/nvfp4_shared_scale.py --device cpu --n-eval 8 --tag _cpu         # RTN, minutes
    python bench/nvfp4_shared_scale.py --device cuda --n-eval 64 --n-calib 1024 \
        --methods rtn,ldlq,yaqa-b --tag _h100                                     # H100
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch

import yaqa
from yaqa import evaluate
from yaqa.data import calibration_windows, eval_windows, find_wikitext2

RESULTS = Path(__file__).resolve().parent / "results"
MODES = {"none": False, "per-layer": True, "shared": "shared", "block": "block"}


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads "
            f"(torch {torch.__version__})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", default="rtn", help="comma-separated: rtn, ldlq, yaqa-b")
    ap.add_argument("--modes", default="none,shared,block,per-layer")
    ap.add_argument("--scale-search", default="maxabs", choices=("maxabs", "mse"))
    ap.add_argument("--n-eval", type=int, default=8)
    ap.add_argument("--eval-ctx", type=int, default=512)
    ap.add_argument("--n-calib", type=int, default=64)
    ap.add_argument("--calib-ctx", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t_start = time.perf_counter()

    ref, tok = yaqa.load_model(None, device=args.device)
    wt = find_wikitext2()
    ev = eval_windows(tok, "wikitext2-test", args.eval_ctx, n=args.n_eval)
    cache = evaluate.ReferenceCache(ref, ev, batch_size=args.batch_size, dtype=torch.float16,
                                    progress=False)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    hessians = None
    if any(m != "rtn" for m in methods):
        calib = calibration_windows(tok, "wikitext2-valid", args.n_calib, args.calib_ctx, seed=0)
        hessians = yaqa.collect_hessians(ref, calib, sketch="B", batch_size=args.batch_size,
                                         progress=False)
    rows = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        for method in methods:
            for fused in (False, True):
                model = copy.deepcopy(ref)
                t = time.perf_counter()
                yaqa.quantize(model, hessians if method != "rtn" else None, method=method,
                              quantizer="nvfp4", scale_search=args.scale_search,
                              incoherence=MODES[mode], fused_global_scale=fused,
                              progress=False)
                secs = time.perf_counter() - t
                r = evaluate.compare(cache, model, batch_size=args.batch_size, progress=False)
                rows.append({"incoherence": mode, "method": method,
                             "global_scale": "fused" if fused else "per-layer",
                             "kl": r.kl, "kl_p99": r.kl_p99, "ppl": r.ppl, "ref_ppl": r.ref_ppl,
                             "top1": r.top1, "seconds": secs,
                             "global_scales": _global_scales(model)})
                print(f"{mode:9s} {method:7s} {rows[-1]['global_scale']:9s} KL {r.kl:.4f} "
                      f"ppl {r.ppl:.2f} top1 {r.top1:.3f} ({secs:.1f} s)", flush=True)
                del model
    command = "python bench/nvfp4_shared_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"nvfp4_shared_scale{args.tag}"
    meta = {"machine": machine(), "command": command, "eval": f"{args.n_eval} x {args.eval_ctx} "
            f"tokens of wikitext2-test ({wt})", "scale_search": args.scale_search,
            "calibration": f"{args.n_calib} x {args.calib_ctx} wikitext2-valid, Sketch B"
            if hessians is not None else None, "seconds": time.perf_counter() - t_start}
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out / f"{name}.md").write_text(markdown(meta, rows))
    print(f"wrote {out / name}.md")
    return 0


def _global_scales(model) -> dict:
    """Distinct global scales per block and how much the fused ones exceed the smallest member's
    own scale would need (min / max over each q/k/v and gate/up group)."""
    spread = []
    for layer in model.model.layers:
        for group in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")),
                      (layer.mlp, ("gate_proj", "up_proj"))):
            g = [getattr(group[0], n).grid_global_scale.item() for n in group[1]]
            spread.append(max(g) / min(g))
    return {"groups": len(spread), "groups_with_one_scale": sum(s == 1.0 for s in spread),
            "max_over_min_mean": sum(spread) / len(spread)}


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = ["# NVFP4: one global scale per vLLM-fused group vs one per layer", ""]
    lines += [f"- machine: {meta['machine']}", f"- command: `{meta['command']}`",
              f"- evaluation: {meta['eval']}; KL = mean per-token KL(original || quantized), nats",
              f"- block scales: {meta['scale_search']}"]
    if meta["calibration"]:
        lines.append(f"- calibration (LDLQ/YAQA): {meta['calibration']}")
    lines += [f"- total time: {meta['seconds']:.0f} s", "",
              "| incoherence | method | global scale | KL | KL p99 | ppl | top-1 | KL fused / per-layer "
              "| q/k/v, gate/up groups with one scale |",
              "|---|---|---|---|---|---|---|---|---|"]
    base = {(r["incoherence"], r["method"]): r["kl"] for r in rows if r["global_scale"] == "per-layer"}
    for r in rows:
        ratio = r["kl"] / base[(r["incoherence"], r["method"])] \
            if (r["incoherence"], r["method"]) in base else float("nan")
        gs = r["global_scales"]
        lines.append(f"| {r['incoherence']} | {r['method']} | {r['global_scale']} | {r['kl']:.4f} | "
                     f"{r['kl_p99']:.3f} | {r['ppl']:.2f} | {r['top1']:.3f} | {ratio:.3f} | "
                     f"{gs['groups_with_one_scale']}/{gs['groups']} |")
    lines.append(f"\nreference perplexity: {rows[0]['ref_ppl']:.2f}" if rows else "")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
