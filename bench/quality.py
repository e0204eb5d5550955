"""Quality benchmark: RTN, LDLQ (GPTQ), YAQA-A and YAQA-B on the embedded SmolLM2-135M-Instruct.

Calibration on WikiText-2 validation, evaluation on WikiText-2 test windows (never the
calibration text); the same quantizer and incoherence setting for every row of a bit width.
Writes bench/results/quality.{json,md} and quality_kl.png.

    python bench/quality.py                       # defaults below, CPU or CUDA (auto)
    python bench/quality.py --n-calib 512 --bits 2,3,4 --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from yaqa.pipeline import RunConfig, format_table, run_pipeline

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads " \
           f"(torch {torch.__version__})"


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "original"):
        pts = sorted((r["bits"], r["kl"]) for r in rows if r["method"] == method)
        ax.plot([b for b, _ in pts], [k for _, k in pts], marker="o", label=method)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (int-k, plus group scales)")
    ax.set_ylabel("KL(original || quantized), nats/token")
    ax.set_title("SmolLM2-135M-Instruct, WikiText-2 test")
    ax.set_xticks(sorted({r["bits"] for r in rows if r["bits"]}))
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--methods", default="rtn,ldlq,yaqa-a,yaqa-b")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--scale-search", default="mse")
    ap.add_argument("--no-incoherence", dest="incoherence", action="store_false")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--sigma", type=float, default=0.01)
    ap.add_argument("--ldlq-block-size", type=int, default=None)
    ap.add_argument("--b-power-iters", type=int, default=1)
    ap.add_argument("--n-calib", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--power-iters", type=int, default=2)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--eval-ctx", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="yaqa-out/quality")
    ap.add_argument("--tag", default="", help="suffix for the result files")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    cfg = RunConfig(model=args.model, methods=tuple(args.methods.split(",")),
                    bits=tuple(int(b) for b in args.bits.split(",")), group_size=args.group_size,
                    symmetric=args.symmetric, scale_search=args.scale_search,
                    incoherence=args.incoherence, block_size=args.block_size, sigma=args.sigma,
                    ldlq_block_size=args.ldlq_block_size,
                    sketch_b_power_iters=args.b_power_iters, calib="wikitext2-valid", n_calib=args.n_calib,
                    calib_ctx=args.ctx, power_iters=args.power_iters, eval_data="wikitext2-test",
                    eval_ctx=args.eval_ctx, n_eval=args.n_eval, batch_size=args.batch_size,
                    device=args.device, out_dir=args.out, save=True, progress=False)
    t = time.perf_counter()
    rows = [asdict(r) for r in run_pipeline(cfg)]
    total = time.perf_counter() - t
    table = format_table([type("R", (), r) for r in rows])
    cfg.out_dir = str(cfg.out_dir)

    RESULTS.mkdir(exist_ok=True)
    stem = f"quality{args.tag}"
    meta = {"machine": machine(), "command": "python bench/quality.py " + " ".join(sys.argv[1:]),
            "config": asdict(cfg), "total_seconds": total}
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Quality: {stem}", "", f"- machine: {meta['machine']}",
             f"- command: `{meta['command']}`",
             f"- calibration: {args.n_calib} x {args.ctx} tokens of WikiText-2 validation "
             "(random windows, seed 0); Hessians: Sketch B (1 pass), Sketch A "
             f"({args.power_iters} power iterations)",
             f"- evaluation: {args.n_eval} x {args.eval_ctx}-token windows of WikiText-2 test; "
             "KL = mean per-token KL(original || quantized), nats",
             f"- quantizer: {'symmetric' if args.symmetric else 'asymmetric'} int-k, group "
             f"{args.group_size}, scales by {args.scale_search}, incoherence "
             f"{'on (random Hadamard both sides)' if args.incoherence else 'off'}",
             f"- total time: {total:.0f} s", "",
             "| method | bits | bits/weight | size MB | KL | ppl | top-1 | KL / LDLQ | time s |",
             "|---|---|---|---|---|---|---|---|---|"]
    ldlq = {r["bits"]: r["kl"] for r in rows if r["method"] == "ldlq"}
    for r in rows:
        ratio = f"{r['kl'] / ldlq[r['bits']]:.3f}" if r["bits"] in ldlq and ldlq[r["bits"]] else "-"
        bpw = f"{r['bpw']:.2f}" if r.get("bpw") else "32"
        lines.append(f"| {r['method']} | {r['bits'] or '-'} | {bpw} | {r['size_mb']:.1f} | "
                     f"{r['kl']:.4f} | {r['ppl']:.2f} | {r['top1']:.3f} | {ratio} | "
                     f"{r['seconds']:.1f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    try:
        plot(rows, RESULTS / f"{stem}_kl.png")
    except ImportError:
        logging.warning("matplotlib not installed; no plot")
    print(table)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
