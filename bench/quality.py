"""Quality benchmark: RTN, LDLQ (GPTQ), YAQA-A and YAQA-B on the embedded SmolLM2-135M-Instruct.

Calibration on WikiText-2 validation, evaluation on WikiText-2 test windows (never the
calibration text); the same quantizer and incoherence setting for every row of a bit width.
Writes bench/results/quality.{json,md} and quality_kl.png.

    python bench/quality.py                       # defaults below, CPU or CUDA (auto)
    python bench/quality.py --n-calib 512 --bits 2,3,4 --device cuda
    python bench/quality.py --n-calib 1024 --methods rtn,ldlq,yaqa-b \
        --quantizers trellis2,trellis3,trellis4,mxfp4,nvfp4 --tag _formats --device cuda

Shrinkage sweep (issue 13's table): Hessians collected once per calibration size, every
shrinkage setting quantized from them; writes bench/results/quality_shrinkage<tag>.{json,md}:

    python bench/quality.py --device cuda --bits 4,3 --calib-sizes 32x512,64x256,256x512 \
        --shrinkage off,auto,auto-out --tag _a

    # several label draws per sequence for Sketch B (4x its forward+backward work)
    python bench/quality.py --device cuda --bits 4,3 --calib-sizes 1024x512 \
        --methods ldlq,yaqa-b --label-draws 4 --tag _draws4

    # refinement (±1 code steps after rounding): LDLQ, LDLQ+8, YAQA-B, YAQA-B+8 from one
    # Hessian collection per size
    python bench/quality.py --device cuda --bits 4,3 --calib-sizes 1024x512 --shrinkage auto \
        --refine 0,8 --tag _refine

    # the serving table: incoherence modes x (LDLQ, YAQA-B) at 4 bits, one Hessian collection
    python bench/quality.py --device cuda --n-calib 1024 --bits 4 --methods ldlq,yaqa-b \
        --incoherence-modes per-layer,shared,block,none --tag _incoherence
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

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    series = dict.fromkeys((r["method"], _family(r)) for r in rows if r["method"] != "original")
    # colour = method, line and marker = format, so a dozen series stay tellable apart
    colours = {"rtn": "C0", "ldlq": "C1", "yaqa-a": "C3", "yaqa-b": "C2"}
    styles = {"int": ("-", "o"), "trellis": ("--", "D"), "mxfp4": (":", "s"), "nvfp4": (":", "^")}
    for method, fam in series:
        pts = sorted((r.get("bpw") or r["bits"], r["kl"]) for r in rows
                     if r["method"] == method and _family(r) == fam)
        ls, mk = styles.get(fam, ("-.", "v"))
        ax.plot([b for b, _ in pts], [k for _, k in pts], ls=ls, marker=mk,
                color=colours.get(method), label=f"{method} {fam}")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (codes plus scales)")
    ax.set_ylabel("KL(original || quantized), nats/token")
    ax.set_title("SmolLM2-135M-Instruct, WikiText-2 test")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _family(r: dict) -> str:
    q = r.get("quantizer") or f"int{r['bits']}"
    return "int" if q.startswith("int") else q.rstrip("0123456789") if q.startswith("trellis") \
        else q


def write_outputs(rows: list[dict], metas: list[dict], stem: str) -> list[str]:
    """quality<stem>.json, .md and _kl.png from result rows and the runs that produced them."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"runs": metas, "rows": rows}, indent=2))
    lines = [f"# Quality: {stem}", ""]
    for meta in metas:
        c = meta["config"]
        lines += [f"- machine: {meta['machine']}", f"- command: `{meta['command']}`",
                  f"- calibration: {c['n_calib']} x {c['calib_ctx']} tokens of {c['calib']} "
                  f"(random windows, seed {c.get('seed', 0)}); Hessians: Sketch B (1 pass, "
                  f"{c.get('label_draws', 1)} label draw(s) per sequence), Sketch A "
                  f"({c['power_iters']} power iterations = {2 * c['power_iters']} passes)",
                  f"- evaluation: {c['n_eval']} x {c['eval_ctx']}-token windows of "
                  f"{c['eval_data']}; KL = mean per-token KL(original || quantized), nats",
                  f"- quantizers: {', '.join(c.get('quantizers') or ['int-k'])}; int-k "
                  f"{'symmetric' if c['symmetric'] else 'asymmetric'}, group "
                  f"{c['group_size']}, scales by {c['scale_search']}, tiles {c['block_size']}, "
                  f"sigma {c['sigma']}, incoherence "
                  f"{'on (random Hadamard both sides)' if c['incoherence'] else 'off'}",
                  f"- total time: {meta['total_seconds']:.0f} s"]
        lines += [f"- note: {meta['note']}"] if meta.get("note") else []
        lines += [""]
    lines += ["| method | format | bits/weight | size MB | KL | ppl | top-1 | KL / LDLQ | time s |",
              "|---|---|---|---|---|---|---|---|---|"]

    def num(v, spec):  # rows kept from a run's log lines lack some columns
        return "-" if v is None else format(v, spec)

    def fmt(r):
        return r.get("quantizer") or (f"int{r['bits']}" if r["bits"] else "-")

    ldlq = {fmt(r): r["kl"] for r in rows if r["method"] == "ldlq"}
    for r in rows:
        ratio = f"{r['kl'] / ldlq[fmt(r)]:.3f}" if fmt(r) in ldlq and ldlq[fmt(r)] else "-"
        bpw = f"{r['bpw']:.2f}" if r.get("bpw") else "32"
        lines.append(f"| {r['method']} | {fmt(r)} | {bpw} | {num(r.get('size_mb'), '.1f')} | "
                     f"{r['kl']:.4f} | {num(r.get('ppl'), '.2f')} | {num(r.get('top1'), '.3f')} | "
                     f"{ratio} | {num(r.get('seconds'), '.1f')} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    try:
        plot(rows, RESULTS / f"{stem}_kl.png")
    except ImportError:
        logging.warning("matplotlib not installed; no plot")
    return lines


def merge(paths: list[str], stem: str) -> list[str]:
    """Combine result files of runs on the same data into one table (original row once)."""
    rows, metas = [], []
    for p in paths:
        data = json.loads(Path(p).read_text())
        metas += data.get("runs") or [data["meta"]]
        rows += [r for r in data["rows"] if r["method"] != "original" or not rows]
    order = {m: i for i, m in enumerate(("original", "rtn", "ldlq", "yaqa-a", "yaqa-b"))}
    rows.sort(key=lambda r: (-(r["bits"] or 99), r.get("quantizer") or "",
                             order.get(r["method"], 9)))
    return write_outputs(rows, metas, stem)


def incoherence_table(cfg: RunConfig, args) -> int:
    """KL and perplexity per incoherence mode and method (the compressed-tensors/vLLM variants).

    Every mode runs the pipeline in the same work directory, so the Hessians are collected by
    the first mode and read back from disk by the others.
    """
    t = time.perf_counter()
    rows: list[dict] = []
    for mode in args.incoherence_modes.split(","):
        cfg.incoherence = mode
        cfg.save = False  # checkpoints of every mode would overwrite each other
        cfg.overwrite = True  # each mode's resume state replaces the previous mode's
        for r in map(asdict, run_pipeline(cfg)):
            if r["method"] == "original":
                if not rows:
                    rows.append({**r, "incoherence": "-"})
                continue
            rows.append({**r, "incoherence": mode})
            logging.info("%s %s: KL %.4f ppl %.2f", mode, r["method"], r["kl"], r["ppl"])
    total = time.perf_counter() - t
    cfg.out_dir = str(cfg.out_dir)
    meta = {"machine": machine(), "command": "python bench/quality.py " + " ".join(sys.argv[1:]),
            "config": asdict(cfg), "total_seconds": total}
    stem = f"quality{args.tag}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"runs": [meta], "rows": rows}, indent=2))
    c = meta["config"]
    ref = {(r["method"], r["bits"]): r["kl"] for r in rows if r["incoherence"] == "per-layer"}
    lines = [f"# Quality by incoherence mode: {stem}", "",
             f"- machine: {meta['machine']}", f"- command: `{meta['command']}`",
             f"- calibration: {c['n_calib']} x {c['calib_ctx']} tokens of {c['calib']}; "
             f"evaluation: {c['n_eval']} x {c['eval_ctx']} tokens of {c['eval_data']}",
             f"- quantizer: {'symmetric' if c['symmetric'] else 'asymmetric'} int-k, group "
             f"{c['group_size']}, scales by {c['scale_search']}",
             "- modes: per-layer = random signs per layer (yaqa's runtime only); shared = one "
             "random Hadamard per size (compressed-tensors `random-hadamard`, vLLM dense GEMM); "
             "block = Sylvester blocks (`hadamard`, vLLM's fast kernel); none = plain W4A16_ASYM",
             f"- total time: {total:.0f} s", "",
             "| incoherence | method | bits | KL | ppl | top-1 | KL / per-layer |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        base = ref.get((r["method"], r["bits"]))
        ratio = f"{r['kl'] / base:.3f}" if base else "-"
        lines.append(f"| {r['incoherence']} | {r['method']} | {r['bits'] or '-'} | {r['kl']:.4f} | "
                     f"{r['ppl']:.2f} | {r['top1']:.3f} | {ratio} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--methods", default="rtn,ldlq,yaqa-a,yaqa-b")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--quantizers", default=None,
                    help="comma-separated formats instead of int<bits>, e.g. "
                         "trellis2,trellis3,trellis4,mxfp4,nvfp4,int4")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--scale-search", default="mse")
    ap.add_argument("--no-incoherence", dest="incoherence", action="store_false")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--block-size-out", type=int, default=None,
                    help="YAQA's tile height along the outputs (default: --block-size)")
    ap.add_argument("--sigma", type=float, default=0.01)
    ap.add_argument("--ldlq-block-size", type=int, default=None,
                    help="LDLQ's tile width (default: --block-size; 1 is column-by-column GPTQ)")
    ap.add_argument("--b-power-iters", type=int, default=1)
    ap.add_argument("--label-draws", type=int, default=1,
                    help="Sketch B: label draws per calibration sequence (their mean is each "
                         "sequence's term; costs that many forward+backward passes)")
    ap.add_argument("--n-calib", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--power-iters", type=int, default=2)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--eval-ctx", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0,
                    help="calibration windows, Hessian labels and Hadamard signs (run-to-run noise)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="yaqa-out/quality")
    ap.add_argument("--tag", default="", help="suffix for the result files")
    ap.add_argument("--shrinkage", default="auto",
                    help="YAQA shrinkage setting(s), comma-separated: auto, auto-out, off, or an "
                         "amount in [0, 1]; several only with --calib-sizes")
    ap.add_argument("--refine", default="0", metavar="R[,R...]",
                    help="rounds of ±1 code steps after LDLQ/YAQA rounding (0: off); several "
                         "(e.g. 0,8) only with --calib-sizes: one LDLQ and YAQA-B row each, "
                         "from the same Hessians")
    ap.add_argument("--calib-sizes", default=None, metavar="NxT,...",
                    help="sweep: LDLQ and YAQA-B at each calibration size (sequences x tokens), "
                         "YAQA-B once per --shrinkage setting, Hessians collected once per size")
    ap.add_argument("--incoherence-modes", default=None,
                    help="comma list of per-layer,shared,block,none: one table row per mode and "
                         "method, all from the same stored Hessians")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="only combine earlier result files into quality<tag>.{json,md,png}")
    args = ap.parse_args(argv)
    if args.merge and args.calib_sizes is None and _is_sweep(args.merge[0]):
        print("\n".join(merge_sweeps(args.merge, f"quality_shrinkage{args.tag}")))
        return 0
    if args.merge:
        print("\n".join(merge(args.merge, f"quality{args.tag}")))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    refines = _refines(args.refine)
    if args.calib_sizes:
        return sweep(args)
    if len(refines) > 1:
        raise SystemExit("--refine: several values only with --calib-sizes")

    cfg = RunConfig(model=args.model, methods=tuple(args.methods.split(",")),
                    bits=tuple(int(b) for b in args.bits.split(",")), group_size=args.group_size,
                    quantizers=tuple(args.quantizers.split(",")) if args.quantizers else None,
                    symmetric=args.symmetric, scale_search=args.scale_search,
                    incoherence=args.incoherence, block_size=args.block_size, sigma=args.sigma,
                    ldlq_block_size=args.ldlq_block_size, yaqa_block_size_out=args.block_size_out,
                    sketch_b_power_iters=args.b_power_iters, calib="wikitext2-valid", n_calib=args.n_calib,
                    calib_ctx=args.ctx, power_iters=args.power_iters, eval_data="wikitext2-test",
                    eval_ctx=args.eval_ctx, n_eval=args.n_eval, batch_size=args.batch_size,
                    device=args.device, out_dir=args.out, save=True, progress=False,
                    shrinkage=args.shrinkage, overwrite=True, label_draws=args.label_draws,
                    seed=args.seed, refine=refines[0])
    if args.incoherence_modes:
        return incoherence_table(cfg, args)
    t = time.perf_counter()
    rows = [asdict(r) for r in run_pipeline(cfg)]
    total = time.perf_counter() - t
    table = format_table([type("R", (), r) for r in rows])
    cfg.out_dir = str(cfg.out_dir)

    meta = {"machine": machine(), "command": "python bench/quality.py " + " ".join(sys.argv[1:]),
            "config": asdict(cfg), "total_seconds": total}
    lines = write_outputs(rows, [meta], f"quality{args.tag}")
    print(table)
    print("\n".join(lines))
    return 0


def _sizes(spec: str) -> list[tuple[int, int]]:
    out = []
    for part in spec.split(","):
        n, _, t = part.lower().partition("x")
        if not (n.isdigit() and t.isdigit()):
            raise SystemExit(f"--calib-sizes: expected NxT (e.g. 64x256), got {part!r}")
        out.append((int(n), int(t)))
    return out


def _refines(spec: str) -> list[int]:
    try:
        out = [int(r) for r in spec.split(",") if r.strip()]
    except ValueError:
        raise SystemExit(f"--refine: expected integers like 0 or 0,8, got {spec!r}") from None
    if not out or min(out) < 0:
        raise SystemExit(f"--refine: expected integers >= 0, got {spec!r}")
    return list(dict.fromkeys(out))


def sweep(args) -> int:
    """LDLQ vs YAQA-B per calibration size, refinement and shrinkage setting.

    The first run of a size collects its Hessians into ``--out``; later runs read them back from
    there (LDLQ once per refinement value, YAQA-B once per (refinement, shrinkage)), so each
    size costs one collection.
    """
    settings = [s.strip() for s in args.shrinkage.split(",") if s.strip()]
    refines = _refines(args.refine)
    bits = tuple(int(b) for b in args.bits.split(","))
    t0 = time.perf_counter()
    rows, timings = [], []
    runs = [(ref, shrink, i == 0) for ref in refines for i, shrink in enumerate(settings)]
    for n, ctx in _sizes(args.calib_sizes):
        for ref, shrink, with_ldlq in runs:
            cfg = RunConfig(model=args.model,
                            methods=("ldlq", "yaqa-b") if with_ldlq else ("yaqa-b",),
                            bits=bits, group_size=args.group_size, symmetric=args.symmetric,
                            scale_search=args.scale_search, incoherence=args.incoherence,
                            block_size=args.block_size, sigma=args.sigma, shrinkage=shrink,
                            yaqa_block_size_out=args.block_size_out,
                            ldlq_block_size=args.ldlq_block_size,
                            calib="wikitext2-valid", n_calib=n, calib_ctx=ctx,
                            eval_data="wikitext2-test", eval_ctx=args.eval_ctx,
                            n_eval=args.n_eval, batch_size=args.batch_size, device=args.device,
                            out_dir=args.out, save=False, progress=False,
                            label_draws=args.label_draws, seed=args.seed, refine=ref,
                            # a benchmark recomputes whatever an earlier (killed) run left that
                            # does not match; same-calibration Hessians are still reused
                            overwrite=True)
            t = time.perf_counter()
            for r in run_pipeline(cfg):
                if r.method != "original":
                    yb = r.method == "yaqa-b"
                    rows.append({**asdict(r), "n_calib": n, "ctx": ctx,
                                 "shrinkage": shrink if yb else None,
                                 "label_draws": args.label_draws if yb else None,
                                 "refine": ref})
            timings.append({"n_calib": n, "ctx": ctx, "shrinkage": shrink,
                            "label_draws": args.label_draws, "refine": ref,
                            "seconds": time.perf_counter() - t})
            logging.info("%dx%d refine %d shrinkage %s: %.0f s", n, ctx, ref, shrink,
                         timings[-1]["seconds"])
    meta = {"machine": machine(), "command": "python bench/quality.py " + " ".join(sys.argv[1:]),
            "eval": f"{args.n_eval} x {args.eval_ctx} tokens of wikitext2-test",
            "quantizer": f"int-k g{args.group_size}, scales {args.scale_search}, incoherence "
                         f"{args.incoherence}", "label_draws": args.label_draws, "seed": args.seed,
            "refine": refines,
            "timings": timings,
            "total_seconds": time.perf_counter() - t0}
    lines = sweep_table(rows, [(s, args.label_draws) for s in settings], meta)
    RESULTS.mkdir(exist_ok=True)
    stem = f"quality_shrinkage{args.tag}"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"runs": [meta], "rows": rows}, indent=2))
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _is_sweep(path: str) -> bool:
    rows = json.loads(Path(path).read_text()).get("rows", [])
    return bool(rows) and "n_calib" in rows[0]


def merge_sweeps(paths: list[str], stem: str) -> list[str]:
    """One shrinkage table from several sweep files (e.g. the two GPU commands)."""
    rows, runs = [], []
    for p in paths:
        data = json.loads(Path(p).read_text())
        rows += data["rows"]
        runs += data["runs"]
    settings = list(dict.fromkeys((r["shrinkage"], r.get("label_draws") or 1) for r in rows
                                  if r["shrinkage"] is not None))
    meta = {**runs[0], "command": " ; ".join(r["command"] for r in runs),
            "total_seconds": sum(r["total_seconds"] for r in runs)}
    lines = sweep_table(rows, settings, meta)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"runs": runs, "rows": rows}, indent=2))
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return lines


def sweep_table(rows: list[dict], settings: list[tuple[str, int]], meta: dict) -> list[str]:
    """One line per (size, bits): LDLQ KL, then YAQA-B KL / ratio to LDLQ / mean amounts, one
    column per (shrinkage setting, label draws per sequence)."""
    lines = [f"# YAQA-B vs LDLQ by calibration size and shrinkage", "",
             f"- machine: {meta['machine']}", f"- command: `{meta['command']}`",
             f"- evaluation: {meta['eval']}; quantizer: {meta['quantizer']}",
             f"- total time: {meta['total_seconds']:.0f} s", "",
             "KL(original || quantized) in nats; YAQA-B cells: KL (KL / LDLQ) [mean shrinkage "
             "amount H_in / H_out]; Sketch B with D label draws per sequence where it says "
             "\"D draws\" (else 1).  Rows with refine R > 0: LDLQ and YAQA-B both refined by up "
             "to R rounds of ±1 code steps; their YAQA-B cells add the ratio to the unrefined "
             "LDLQ after a slash.", ""]
    head = "| calibration | bits | refine | LDLQ KL | " + " | ".join(
        f"YAQA-B {s}" + (f", {d} draws" if d != 1 else "") for s, d in settings) + " |"
    lines += [head, "|" + "---|" * (4 + len(settings))]
    keys = sorted({(r["n_calib"], r["ctx"], r["bits"], r.get("refine") or 0) for r in rows},
                  key=lambda k: (k[0] * k[1], -k[2], k[3]))
    for n, ctx, bits, ref in keys:
        at = [r for r in rows if (r["n_calib"], r["ctx"], r["bits"]) == (n, ctx, bits)]
        sel = [r for r in at if (r.get("refine") or 0) == ref]
        ldlq = next((r["kl"] for r in sel if r["method"] == "ldlq"), None)
        plain = next((r["kl"] for r in at if r["method"] == "ldlq"
                      and not r.get("refine")), None)
        cells = []
        for s, d in settings:
            y = next((r for r in sel if r["method"] == "yaqa-b" and r["shrinkage"] == s
                      and (r.get("label_draws") or 1) == d), None)
            if y is None:
                cells.append("-")
                continue
            ratios = ([f"{y['kl'] / ldlq:.3f}"] if ldlq else []) + (
                [f"{y['kl'] / plain:.3f}"] if ref and plain else [])
            cell = f"{y['kl']:.4g}" + (f" ({' / '.join(ratios)})" if ratios else "")
            sh = (y.get("extra") or {}).get("shrinkage")
            if sh and sh.get("mean_out") is not None:
                cell += f" [{sh['mean_in'] or 0:.2f} / {sh['mean_out']:.2f}]"
            cells.append(cell)
        lead = f"| {n} x {ctx} | {bits} | {ref or 'off'} | "
        lines.append(lead + (f"{ldlq:.4g}" if ldlq is not None else "-") + " | "
                     + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
