"""Evaluation of several quantized models: one at a time (``compare`` per model) against one
sweep (``compare_many``), on the embedded SmolLM2-135M-Instruct.

    python bench/eval_joint.py [--n-eval 16] [--ctx 512] [--device cpu] [--out bench/results/eval_joint_cpu.json]

Makes the default run's three int4 g64 models (RTN, LDLQ and YAQA-B need Hessians, so stand-ins
are used: RTN int4 g64 and two RTN int4 models at groups 192 and 32, which cost the same to evaluate),
then times both ways interleaved in one process, so a busy machine slows both alike, and checks
that every number is identical.  About 4 minutes on 2 idle cores at the defaults.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaqa  # noqa: E402
from yaqa import evaluate  # noqa: E402
from yaqa.data import eval_windows  # noqa: E402
from yaqa.nn import set_dense_cache  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-eval", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench/results/eval_joint_cpu.json")
    args = ap.parse_args()

    model, tok = yaqa.load_model(None, dtype="float32", device=args.device)
    ev = eval_windows(tok, "wikitext2-test", args.ctx, args.n_eval)
    models = []
    for group in (64, 192, 32):
        q = copy.deepcopy(model)
        yaqa.quantize(q, None, method="rtn", quantizer="int4", group_size=group,
                      incoherence=True, progress=False)
        set_dense_cache(q, True)
        models.append(q)
    with torch.inference_mode():  # build the dense caches outside the timings
        for m in (model, *models):
            m(input_ids=ev[:1, :8].to(args.device), use_cache=False)

    t = time.perf_counter()
    alone = [evaluate.compare(model, q, ev, batch_size=args.batch_size, progress=False)
             for q in models]
    t_alone = time.perf_counter() - t
    t = time.perf_counter()
    joint = evaluate.compare_many(model, models, ev, batch_size=args.batch_size, progress=False)
    t_joint = time.perf_counter() - t
    identical = alone == joint.results
    out = {"machine": platform.processor() or platform.machine(), "device": args.device,
           "threads": torch.get_num_threads(), "windows": list(ev.shape),
           "per_method_s": round(t_alone, 1), "joint_s": round(t_joint, 1),
           "joint_reference_s": round(joint.reference_seconds, 1),
           "joint_model_s": [round(s, 1) for s in joint.seconds], "identical": identical,
           "results": [r.as_dict() for r in joint.results]}
    print(json.dumps(out, indent=2))
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
