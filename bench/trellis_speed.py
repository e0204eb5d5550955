"""Speed of YAQA rounding with the trellis quantizer on Llama-3.1-8B-shaped layers.

Times ``round_weight(..., method="yaqa")`` (random weight, random positive-definite factors,
incoherence on) for a 4096x4096 and a 14336x4096 layer and projects the time of a whole
Llama-3.1-8B (32 blocks x 7 linears = 224: q, o 4096x4096; k, v 1024x4096; gate, up
14336x4096; down 4096x14336) from the measured time per 16x16 tile of each shape class.
Also times the bare Viterbi per tile (batched) and the dequantize path.  Writes
bench/results/trellis_speed<tag>.{json,md} (and copies them to --out-dir when given).

On CUDA with triton installed, ``--check-tiles N`` first runs the Triton and the torch Viterbi on
N random tiles and exits with status 3 unless every path is the same (or, where a path differs,
its squared error equals the torch path's to 1e-6: an exact tie, both optimal); ``--tune`` picks
the Triton kernel's states per chunk / tiles per program / warps on the bare Viterbi; ``--budget-s`` skips a
shape whose predicted time would overrun the budget.

    python bench/trellis_speed.py --device cuda                       # H100: a few minutes
    python bench/trellis_speed.py --device cuda --check-tiles 64 --tune --budget-s 90 --tag _h100_triton
    python bench/trellis_speed.py --device cpu --shapes 64x64 --L 10  # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from yaqa.quantizers import TrellisQuantizer
from yaqa.quantizers import trellis_triton
from yaqa.quantizers.trellis import path_states, viterbi_tailbiting
from yaqa.rounding import round_weight

RESULTS = Path(__file__).resolve().parent / "results"
LLAMA_8B = {"4096x4096": 2, "1024x4096": 2, "14336x4096": 2, "4096x14336": 1}  # per block


def machine(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (torch {torch.__version__})"
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def random_factor(n: int, dev: torch.device, gen: torch.Generator) -> torch.Tensor:
    X = torch.randn(n, n + 64, generator=gen).to(dev)
    return X @ X.T / X.shape[1] + 1e-3 * torch.eye(n, device=dev)


def time_viterbi(q: TrellisQuantizer, tiles: int, dev: torch.device, backend: str,
                 repeat: int = 1) -> dict:
    grid = q.fit(torch.randn(16, 16))
    cb = grid.codebook(dev)
    x = torch.randn(tiles, grid.steps, q.V, device=dev)
    dt = getattr(torch, q.cost_dtype)
    viterbi_tailbiting(x[:1], cb, q.L, q.bits * q.V, dt, backend)  # warm-up (and compile)
    sync(dev)
    t = time.perf_counter()
    for _ in range(repeat):
        viterbi_tailbiting(x, cb, q.L, q.bits * q.V, dt, backend)
    sync(dev)
    s = (time.perf_counter() - t) / repeat
    return {"backend": backend, "tiles": tiles, "seconds": s, "ms_per_tile": 1e3 * s / tiles}


def check_triton(q: TrellisQuantizer, tiles: int, dev: torch.device) -> dict:
    """Triton vs torch Viterbi (tail-biting, float32 costs) on random tiles; raises SystemExit(3)
    unless every path is the same or ties the torch path's squared error to 1e-6."""
    grid = q.fit(torch.randn(16, 16))
    cb = grid.codebook(dev)
    kv = q.bits * q.V
    x = torch.randn(tiles, grid.steps, q.V, generator=torch.Generator().manual_seed(1)).to(dev)
    ref = viterbi_tailbiting(x, cb, q.L, kv, torch.float32, "torch")
    ours = viterbi_tailbiting(x, cb, q.L, kv, torch.float32, "triton")
    same = (ref == ours).all(1)

    def err(steps):
        return (cb.double()[path_states(steps, q.L, kv)] - x.double()).pow(2).sum((1, 2))

    rel = ((err(ours) - err(ref)).abs() / err(ref)).max().item()
    out = {"tiles": tiles, "identical_paths": int(same.sum()), "max_relative_error_gap": rel}
    print(f"check: Triton vs torch Viterbi on {tiles} tiles: {out['identical_paths']} identical "
          f"paths, max relative squared-error gap {rel:.2e}", flush=True)
    if not bool(same.all()) and rel > 1e-6:
        print("check FAILED: the Triton Viterbi differs from the torch Viterbi", flush=True)
        raise SystemExit(3)
    return out


def tune_triton(q: TrellisQuantizer, tiles: int, dev: torch.device) -> dict:
    """Fastest forward-kernel knobs; sets trellis_triton.TUNING.

    A YAQA wavefront on an n x n layer of N tiles a side rounds batches of every size 1..N
    (twice each); the kernel's time for a batch is about max(t_small, t_full * K / N): a few tiles
    leave the GPU idle and cost the latency of one tile's 256 sequential steps.  So each setting
    is timed on a full batch and on 16 tiles, and scored by that sum over K = 1..N.
    """
    best, rows = None, []
    for states, nt, warps in ((2048, 1, 4), (4096, 1, 4), (4096, 1, 8), (8192, 1, 8),
                              (16384, 1, 16), (4096, 2, 8), (8192, 2, 8)):
        trellis_triton.TUNING.update(states=states, tiles_per_program=nt, num_warps=warps)
        full = time_viterbi(q, tiles, dev, "triton", repeat=2)
        small = time_viterbi(q, 16, dev, "triton", repeat=2)
        score = sum(2 * max(small["seconds"], full["seconds"] * k / tiles)
                    for k in range(1, tiles + 1))
        r = {"states": states, "tiles_per_program": nt, "num_warps": warps,
             "ms_per_tile": full["ms_per_tile"], "ms_16_tiles": 1e3 * small["seconds"],
             "wavefront_score_s": score}
        rows.append(r)
        print(f"tune: {states} states per chunk, {nt} tiles/program, {warps} warps: {tiles} tiles "
              f"{r['ms_per_tile']:.4f} ms/tile, 16 tiles {r['ms_16_tiles']:.2f} ms, "
              f"wavefront score {score:.2f} s", flush=True)
        if best is None or score < best["wavefront_score_s"]:
            best = r
    trellis_triton.TUNING.update(states=best["states"], tiles_per_program=best["tiles_per_program"],
                                 num_warps=best["num_warps"])
    return {"best": dict(trellis_triton.TUNING), "trials": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quantizers", default="trellis2",
                    help="comma-separated: trellisK (HYB, V=2) or trellisK-1mad / -3inst")
    ap.add_argument("--shapes", default="4096x4096,14336x4096")
    ap.add_argument("--L", type=int, default=16)
    ap.add_argument("--cost-dtype", default="float32", help="float32 or float16")
    ap.add_argument("--viterbi-tiles", type=int, default=256)
    ap.add_argument("--no-graphs", action="store_true", help="eager Viterbi (no CUDA graphs)")
    ap.add_argument("--viterbi", default="auto", help="auto, torch or triton")
    ap.add_argument("--check-tiles", type=int, default=0,
                    help="first check the Triton Viterbi against torch on this many tiles")
    ap.add_argument("--tune", action="store_true", help="tune the Triton kernel first")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="skip shapes predicted to end after this many seconds (0: no limit)")
    ap.add_argument("--out-dir", default=os.environ.get("OUT", ""),
                    help="also copy the result files here (default: $OUT)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    dev = torch.device(args.device)
    from yaqa.quantizers import make_quantizer

    gen = torch.Generator().manual_seed(0)
    runs = []
    for name in args.quantizers.split(","):
        base = make_quantizer(name)
        if not isinstance(base, TrellisQuantizer):
            raise SystemExit(f"{name} is not a trellis quantizer")
        tl = min(base.tlut_bits, args.L - 2)
        q = TrellisQuantizer(**{**vars(base), "L": args.L, "tlut_bits": tl,
                                "cost_dtype": args.cost_dtype, "cuda_graphs": not args.no_graphs,
                                "viterbi": args.viterbi})
        backend = q.fit(torch.randn(16, 16))._backend(dev, getattr(torch, q.cost_dtype))
        extra = {"backend": backend}
        if args.check_tiles and backend == "triton":
            extra["check"] = check_triton(q, args.check_tiles, dev)
        if args.tune and backend == "triton":
            extra["tuning"] = tune_triton(q, args.viterbi_tiles, dev)
            print(f"tuned: {extra['tuning']['best']}", flush=True)
        # Warm-up: the HYB table, codebooks, CUDA context and kernels (not part of the timing).
        Wd = torch.randn(64, 64, generator=gen).to(dev)
        round_weight(Wd, random_factor(64, dev, gen), random_factor(64, dev, gen), q, "yaqa")
        vit = time_viterbi(q, args.viterbi_tiles, dev, backend)
        print(f"{name}: {backend} Viterbi {vit['tiles']} tiles in {vit['seconds']:.3f} s "
              f"({vit['ms_per_tile']:.4f} ms/tile)", flush=True)
        if backend == "triton":
            extra["torch_viterbi"] = time_viterbi(q, args.viterbi_tiles, dev, "torch")
            print(f"{name}: torch Viterbi {extra['torch_viterbi']['ms_per_tile']:.4f} ms/tile",
                  flush=True)
        per_tile = {}
        for shape in args.shapes.split(","):
            m, n = (int(v) for v in shape.split("x"))
            if args.budget_s and per_tile:
                # Time per tile grows a little with the layer (longer feedback GEMMs): margin 1.5.
                left = args.budget_s - (time.perf_counter() - t_start)
                need = 1.5 * max(per_tile.values()) * m * n / 256 + 10
                if need > left:
                    print(f"{name} {shape}: skipped, predicted {need:.0f} s > {left:.0f} s left",
                          flush=True)
                    continue
            W = torch.randn(m, n, generator=gen).to(dev)
            Hi, Ho = random_factor(n, dev, gen), random_factor(m, dev, gen)
            sync(dev)
            t = time.perf_counter()
            res = round_weight(W, Hi, Ho, q, "yaqa", incoherence=True, return_details=True)
            sync(dev)
            s = time.perf_counter() - t
            t = time.perf_counter()
            res.grid.dequantize(res.codes)
            sync(dev)
            deq = time.perf_counter() - t
            tiles = m * n // 256
            per_tile[shape] = s / tiles
            row = {"quantizer": name, "config": q.config(), "shape": shape, "seconds": s,
                   "tiles": tiles, "ms_per_tile": 1e3 * s / tiles,
                   "proxy_relative": res.proxy_loss_relative, "dequantize_seconds": deq}
            runs.append(row)
            print(f"{name} {shape}: YAQA {s:.1f} s ({row['ms_per_tile']:.3f} ms/tile), "
                  f"relative proxy {res.proxy_loss_relative:.4f}, dequantize {deq:.3f} s",
                  flush=True)
            del W, Hi, Ho, res
        # Projection: each 8B shape class at the measured time per tile of the closest shape
        # (the 14336-row timing for the 14336-sized layers, the 4096x4096 one for the rest).
        big = per_tile.get("14336x4096") or max(per_tile.values())
        small = per_tile.get("4096x4096") or min(per_tile.values())
        total = 0.0
        for shape, count in LLAMA_8B.items():
            m, n = (int(v) for v in shape.split("x"))
            total += 32 * count * (m * n / 256) * (big if 14336 in (m, n) else small)
        runs.append({"quantizer": name, "projection": "llama-3.1-8b 224 linears",
                     "seconds": total, "hours": total / 3600, "viterbi": vit,
                     "measured_shapes": sorted(per_tile), **extra})
        print(f"{name}: projected Llama-3.1-8B (224 linears) {total / 3600:.2f} h", flush=True)

    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": machine(dev),
            "command": "python bench/trellis_speed.py " + " ".join(sys.argv[1:])}
    (RESULTS / f"trellis_speed{args.tag}.json").write_text(json.dumps({"meta": meta, "runs": runs},
                                                                        indent=2))
    lines = [f"# Trellis rounding speed{args.tag}", "", f"- machine: {meta['machine']}",
             f"- command: `{meta['command']}`", "",
             "| quantizer | layer | YAQA s | ms / tile | relative proxy | dequantize s |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        if "shape" in r:
            lines.append(f"| {r['quantizer']} | {r['shape']} | {r['seconds']:.1f} | "
                         f"{r['ms_per_tile']:.3f} | {r['proxy_relative']:.4f} | "
                         f"{r['dequantize_seconds']:.3f} |")
    for r in runs:
        if "projection" in r:
            lines.append(f"\n{r['quantizer']}: projected {r['projection']}: {r['hours']:.2f} h; "
                         f"bare Viterbi {r['viterbi']['ms_per_tile']:.3f} ms/tile "
                         f"({r['viterbi']['tiles']} tiles per batch, {r['backend']} Viterbi)"
                         + (f"; torch Viterbi {r['torch_viterbi']['ms_per_tile']:.3f} ms/tile"
                            if "torch_viterbi" in r else "")
                         + (f"; Triton knobs {r['tuning']['best']}" if "tuning" in r else "")
                         + (f"; check: {r['check']['identical_paths']}/{r['check']['tiles']} "
                            "paths identical to torch's" if "check" in r else "")
                         + ("" if "14336x4096" in r["measured_shapes"] else
                            "; 14336-sized layers projected at the 4096x4096 time per tile"))
    (RESULTS / f"trellis_speed{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.out_dir:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        for ext in ("json", "md"):
            shutil.copy(RESULTS / f"trellis_speed{args.tag}.{ext}", args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
