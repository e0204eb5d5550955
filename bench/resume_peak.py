"""Peak GPU memory of a collection resumed in a new command, against the same collection in one.

A Llama-3.1-8B-shaped model cut to ``--layers`` decoder blocks (random bf16 weights), Sketch B
in ``--blocks-per-pass`` groups with the boundary cache in host memory, as the 32-layer scale
run (bench/scale.py) plans it. Three child processes, one command each:

1. ``full``: the whole collection at once (and the memory plan for it);
2. ``interrupted``: the same into a second directory, stopped by SIGINT (the path of
   ``bench/scale.py --budget-s``: checkpoint, then stop) after ``--stop-after`` micro-batches of
   the lowest group, so that its host-memory cache dies with the process;
3. ``resumed``: the same command again, which finishes from the checkpoint.

Prints and writes (``bench/results/resume_peak{tag}.{md,json}``) the three peaks
(``torch.cuda.max_memory_allocated``), the plan's estimate and whether the resumed factors equal
the one-command factors.

    python bench/resume_peak.py --device cuda            # about 2 minutes on an H100
    python bench/resume_peak.py --tiny                   # CPU check (peaks: live tensor bytes)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import scale  # noqa: E402  (the model, data and results helpers of the scale run)

from yaqa.hessians import HessianCollector, run_collection  # noqa: E402
from yaqa.plan import (GiB, CollectionRequest, LiveTensorBytes, ModelShape,  # noqa: E402
                       device_budget, make_plan)

RESULT = "RESULT "


def _model_args(args) -> argparse.Namespace:
    return argparse.Namespace(tiny=args.tiny, ctx=args.ctx, seed=args.seed, device=args.device)


def _stop_after(group: list[int], n: int) -> None:
    """SIGINT to ourselves once ``group`` has run ``n`` micro-batches: the collection saves a
    checkpoint after the micro-batch in flight and stops, as at the end of a timed command."""
    real, seen = HessianCollector.step, []

    def step(self, *a, **k):
        if self.blocks == group and self.kind is not None:
            seen.append(1)
            if len(seen) == n:
                os.kill(os.getpid(), signal.SIGINT)
        return real(self, *a, **k)

    HessianCollector.step = step


def child(args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    margs = _model_args(args)
    cfg = scale.config(margs, args.layers)
    model = scale.build_model(margs, args.layers)
    ids = scale.calibration(argparse.Namespace(seed=args.seed, n_seqs=args.n_seqs, ctx=args.ctx),
                            model.config.vocab_size)
    req = CollectionRequest(sketch="B", n_seqs=args.n_seqs, ctx=args.ctx,
                            batch_size=args.batch_size, collect_hx=False)
    plan = make_plan(ModelShape.from_config(cfg), req, budget_bytes=device_budget(args.device),
                     device=args.device, blocks_per_pass=args.blocks_per_pass,
                     boundary_cache="memory", host_bytes=1 << 50)
    if args.phase == "interrupted":
        _stop_after(plan.groups[0], args.stop_after)
    cuda = args.device.startswith("cuda")
    live = None if cuda else LiveTensorBytes(list(model.parameters()))
    if live is not None:
        live.__enter__()
    t = time.perf_counter()
    finished = True
    try:
        run_collection(model, ids, args.work / args.phase_dir, sketch="B",
                       batch_size=args.batch_size, blocks_per_pass=args.blocks_per_pass,
                       collect_hx=False, storage_dtype="bfloat16", boundary_cache="memory",
                       checkpoint_interval_s=1e9, progress=False)
    except KeyboardInterrupt:
        finished = False
    finally:
        if live is not None:
            live.__exit__(None, None, None)
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if cuda else live.peak_bytes
    print(RESULT + json.dumps({
        "phase": args.phase, "finished": finished, "seconds": time.perf_counter() - t,
        "peak_gib": peak / GiB, "plan_peak_gib": plan.collection_peak_bytes / GiB,
        "plan_terms_gib": {k: v / GiB for k, v in plan.collection_terms.items()},
        "groups": plan.groups}), flush=True)


def _run_child(args, phase: str, phase_dir: str) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--phase-dir", phase_dir,
           "--work", str(args.work), "--device", args.device, "--layers", str(args.layers),
           "--n-seqs", str(args.n_seqs), "--ctx", str(args.ctx),
           "--batch-size", str(args.batch_size), "--blocks-per-pass", str(args.blocks_per_pass),
           "--stop-after", str(args.stop_after), "--seed", str(args.seed)]
    if args.tiny:
        cmd.append("--tiny")
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(RESULT)]
    if out.returncode != 0 or not lines:
        sys.stderr.write(out.stdout[-4000:] + out.stderr[-8000:])
        raise SystemExit(f"phase {phase} failed (exit {out.returncode})")
    res = json.loads(lines[-1][len(RESULT):])
    res["command_seconds"] = time.perf_counter() - t
    res["recomputed"] = [ln.split("recomputing", 1)[1].strip() for ln in out.stderr.splitlines()
                         if "recomputing the loss gradient" in ln]
    return res


def _compare(a: Path, b: Path, device: str) -> dict:
    """Whether every stored factor of ``b`` equals ``a``'s, and the largest relative gap."""
    from safetensors.torch import load_file

    files = sorted(p.name for p in a.glob("block_*.safetensors"))
    same, worst = True, 0.0
    for name in files:
        x, y = load_file(str(a / name), device=device), load_file(str(b / name), device=device)
        for k in x:
            same &= bool(torch.equal(x[k], y[k]))
            d = (x[k].float() - y[k].float()).norm() / x[k].float().norm().clamp_min(1e-30)
            worst = max(worst, float(d))
    return {"blocks": len(files), "bit_identical": same, "max_rel_frobenius_gap": worst}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="the scale run's tiny model (CPU check)")
    ap.add_argument("--layers", type=int, default=None, help="default 8 (tiny: 6)")
    ap.add_argument("--n-seqs", type=int, default=None, help="default 256 (tiny: 8)")
    ap.add_argument("--ctx", type=int, default=None, help="default 2048 (tiny: 128)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--blocks-per-pass", type=int, default=None, help="default 3 (tiny: 2)")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="micro-batches of the lowest group before the interruption "
                         "(default: an eighth of them)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/yaqa-resume-peak"),
                    help="the two Hessian stores (about 25 GB at the defaults; removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the stores in --work")
    ap.add_argument("--tag", default="")
    ap.add_argument("--copy-to", type=Path, default=None, help="also write the results here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phase", choices=["full", "interrupted", "resumed"], default=None,
                    help=argparse.SUPPRESS)
    ap.add_argument("--phase-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    # tiny: activations well above the accumulators, as at 8B (the old resume exceeded there)
    args.layers = args.layers or (6 if args.tiny else 8)
    args.n_seqs = args.n_seqs or (8 if args.tiny else 256)
    args.ctx = args.ctx or (128 if args.tiny else 2048)
    args.blocks_per_pass = args.blocks_per_pass or (2 if args.tiny else 3)
    n_mb = -(-args.n_seqs // args.batch_size)
    args.stop_after = args.stop_after or max(1, n_mb // 8)
    if args.phase is not None:
        child(args)
        return 0
    if args.tiny and "tiny" not in args.tag:
        args.tag += "_tiny"
    if args.device.startswith("cuda") and not args.tag:
        args.tag = "_h100" if "H100" in torch.cuda.get_device_name() else "_cuda"
    shutil.rmtree(args.work, ignore_errors=True)
    runs = {"full": _run_child(args, "full", "one"),
            "interrupted": _run_child(args, "interrupted", "two")}
    if runs["interrupted"]["finished"]:
        raise SystemExit("the interrupted command finished before its stop: lower --stop-after")
    runs["resumed"] = _run_child(args, "resumed", "two")
    if not runs["resumed"]["finished"]:
        raise SystemExit("the resumed command did not finish")
    cmp = _compare(args.work / "one", args.work / "two", args.device)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    full, res = runs["full"], runs["resumed"]
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    peak = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else \
        "live tensor bytes (LiveTensorBytes)"
    unit, scale_ = ("MiB", 1024.0) if args.tiny else ("GiB", 1.0)
    lines = [f"# Resumed collection peak (bench/resume_peak.py{args.tag})", "",
             f"Machine: {platform.node()}, {dev}, torch {torch.__version__}, yaqa at "
             f"{scale._git_commit()}",
             f"Command: `python bench/resume_peak.py {' '.join(sys.argv[1:])}`",
             f"Model: {'tiny' if args.tiny else 'Llama-3.1-8B'}-shaped, {args.layers} layers, "
             f"random bf16 weights; Sketch B on {args.n_seqs} x {args.ctx} tokens, batch "
             f"{args.batch_size}, groups {full['groups']}, boundary cache in host memory; the "
             f"interrupted command stopped after {args.stop_after} micro-batches of the lowest "
             f"group. Peak: {peak}, model construction included.", "",
             f"| command | finished | seconds | peak {unit} | plan {unit} |",
             "| --- | --- | ---: | ---: | ---: |"]
    for k, r in runs.items():
        lines.append(f"| {k} | {r['finished']} | {r['seconds']:.1f} | "
                     f"{r['peak_gib'] * scale_:.2f} | {r['plan_peak_gib'] * scale_:.2f} |")
    ok = res["peak_gib"] <= full["peak_gib"] * 1.01
    lines += ["", f"Resumed peak {'<=' if ok else '>'} one-command peak: "
                  f"{res['peak_gib'] * scale_:.2f} vs {full['peak_gib'] * scale_:.2f} {unit} "
                  f"(plan {full['plan_peak_gib'] * scale_:.2f}).",
              f"Recomputed in the resumed command: {'; '.join(res['recomputed']) or 'nothing'}.",
              f"Factors of the resumed run vs the one-command run ({cmp['blocks']} blocks): "
              f"bit-identical {cmp['bit_identical']}, largest relative Frobenius gap "
              f"{cmp['max_rel_frobenius_gap']:.2e}."]
    text = "\n".join(lines) + "\n"
    print(text)
    payload = json.dumps({"runs": runs, "factors": cmp, "resumed_within_one_command": ok},
                         indent=1)
    for d in [scale.RESULTS] + ([args.copy_to] if args.copy_to else []):
        d.mkdir(parents=True, exist_ok=True)
        (d / f"resume_peak{args.tag}.md").write_text(text)
        (d / f"resume_peak{args.tag}.json").write_text(payload)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
