"""Peer check: llmcompressor's GPTQ on the embedded default model, scored with OUR evaluation.

Issue 5, item 3 asks for one row from an established peer tool's GPTQ at the same format as our
LDLQ rows, as evidence that our LDLQ baseline is as strong as what users already have.  To make
the row comparable, everything except the rounding comes from yaqa: the model (``load_model``),
the calibration tensors (``calibration_windows``, handed to llmcompressor as a pre-tokenized
``datasets.Dataset``), the evaluation windows (``eval_windows``) and the metrics
(``yaqa.evaluate.compare`` against a ``ReferenceCache`` of the original model).

llmcompressor pins its own torch/transformers, so this runs in a separate virtual environment
that CI does not build.  To build it (CPU-only torch is enough; the run uses no GPU):

    python -m venv /tmp/peervenv
    /tmp/peervenv/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch
    /tmp/peervenv/bin/pip install llmcompressor==0.14.0.1      # pulls compressed-tensors, transformers, datasets
    /tmp/peervenv/bin/pip install safetensors accelerate gguf tqdm   # yaqa's other runtime deps
    /tmp/peervenv/bin/pip install --no-deps -e /path/to/yaqa     # --no-deps: keep llmcompressor's pins

Versions the committed results were measured with: torch 2.13.0+cpu, llmcompressor 0.14.0.1,
compressed-tensors 0.19.0, transformers 5.17.0, datasets 5.2.0 (recorded in the JSON too).

Run (from the repository root).  On an idle 2-core CPU a GPTQ row takes ~6 min to quantize
(31 sequential layer steps of ~11 s: calibration pass, GPTQ, propagation pass) plus ~2-3 min to
evaluate, and the reference cache ~4 min once; it roughly doubles when another job shares the
cores.  The reference cache holds 6.4 GB of float32 log-probabilities (exact KL).

    /tmp/peervenv/bin/python bench/peer_gptq.py --bits 4 3
    /tmp/peervenv/bin/python bench/peer_gptq.py --bits 4 3 --methods rtn --out bench/results/peer_gptq_rtn
    /tmp/peervenv/bin/python bench/peer_gptq.py --bits 4 --actorder static --out bench/results/peer_gptq_actorder

Writes ``<out>.json`` and ``<out>.md`` (default ``bench/results/peer_gptq``), rewritten after
every row so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

from yaqa.data import calibration_windows, eval_windows
from yaqa.evaluate import ReferenceCache, compare
from yaqa.models.loading import load_model

log = logging.getLogger("peer_gptq")
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="yaqa load_model argument (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--symmetric", action="store_true", help="symmetric grid (default: asymmetric, as our rows)")
    p.add_argument("--methods", nargs="+", default=["gptq"], choices=["gptq", "rtn"],
                   help="'rtn': llmcompressor's QuantizationModifier with the same scheme (round to "
                        "nearest on the same min-max grid, no calibration), a same-tool sanity row "
                        "showing what GPTQ gains over plain rounding")
    p.add_argument("--actorder", nargs="+", default=["none"], choices=["none", "static", "group"],
                   help="llmcompressor activation ordering; one row per value per bit width. "
                        "'none' is plain GPTQ column order, which is what our LDLQ does")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQModifier dampening_frac")
    p.add_argument("--block-size", type=int, default=128, help="GPTQModifier block_size (lazy-batch width)")
    p.add_argument("--calib", default="wikitext2-valid")
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--eval", dest="eval_source", default="wikitext2-test")
    p.add_argument("--n-eval", type=int, default=64)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pipeline", default="independent",
                   help="oneshot pipeline. The default ('independent', llmcompressor's own default) "
                        "runs GPTQ sequentially: each decoder layer's Hessians are collected from the "
                        "outputs of the already-quantized layers before it, as in the GPTQ paper and "
                        "what llmcompressor users get. 'basic' collects every Hessian from the "
                        "original model in one pass (as yaqa's stored Hessians are) and is ~2x faster")
    p.add_argument("--calib-batch", type=int, default=1, help="oneshot batch_size (does not change the Hessian)")
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "peer_gptq"),
                   help="output prefix: writes <out>.json and <out>.md")
    return p.parse_args(argv)


def config_groups(bits: int, group_size: int, symmetric: bool) -> dict:
    return {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": bits, "type": "int", "symmetric": symmetric,
                    "strategy": "group", "group_size": group_size},
        "input_activations": None, "output_activations": None,
    }}


def rtn_modifier(bits: int, group_size: int, symmetric: bool):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return QuantizationModifier(config_groups=config_groups(bits, group_size, symmetric),
                                ignore=["lm_head"])


def gptq_modifier(bits: int, group_size: int, symmetric: bool, actorder: str, damp: float,
                  block_size: int):
    from llmcompressor.modifiers.quantization import GPTQModifier

    return GPTQModifier(
        config_groups=config_groups(bits, group_size, symmetric),
        ignore=["lm_head"],
        # The modifier's default is a sentinel meaning "static" act-order: it must be set to
        # None explicitly to get plain GPTQ column order.
        actorder=None if actorder == "none" else actorder,
        dampening_frac=damp,
        block_size=block_size,
    )


def run_oneshot(model, tokenizer, calib: torch.Tensor, modifier, batch_size: int, pipeline: str):
    """Quantize ``model`` in place with llmcompressor on exactly our calibration tensors."""
    from datasets import Dataset
    from llmcompressor import oneshot

    # Already tokenized (input_ids column): llmcompressor skips its own tokenization, so the
    # Hessians see the same token windows as our LDLQ rows.
    t0 = time.perf_counter()
    if not modifier.requires_calibration_data:
        # Weight-only RTN: scales come from the weights alone, no data pass needed.
        oneshot(model=model, tokenizer=tokenizer, recipe=modifier)
        return time.perf_counter() - t0
    ds = Dataset.from_dict({"input_ids": calib.tolist(),
                            "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=modifier,
            num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
            shuffle_calibration_samples=False, batch_size=batch_size, pipeline=pipeline)
    return time.perf_counter() - t0


@torch.no_grad()
def extract_int_grid(model, bits: int, stored_on_grid: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """Dequantized weights of every llmcompressor-quantized Linear, after checking they are on
    the int-k grid.

    After ``oneshot`` each module holds the GPTQ output as a float ``weight`` plus
    ``weight_scale``/``weight_zero_point``, and compressed-tensors re-fake-quantizes the weight in
    every forward.  We do not want to evaluate through that wrapper on faith, so: (1) the stored
    weight must equal quantize→dequantize of itself (it is already on the grid), (2) the integer
    codes must lie in the k-bit range, and (3), independently of compressed-tensors' code, each
    group of ``group_size`` weights must hold at most 2^k distinct values.

    (1) holds for GPTQ, which writes its rounded weights back.  llmcompressor's RTN keeps the
    float weight and only fake-quantizes in forward, so there ``stored_on_grid=False`` and the
    evaluated weights are quantize→dequantize of the stored ones, i.e. what its forward uses
    (the caller also compares logits of both models).
    """
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_range

    out, worst_rel, max_distinct, n_modules, codes_lo, codes_hi = {}, 0.0, 0, 0, None, None
    for name, m in model.named_modules():
        scheme = getattr(m, "quantization_scheme", None)
        if scheme is None or scheme.weights is None or not hasattr(m, "weight_scale"):
            continue
        args = scheme.weights
        assert args.num_bits == bits, (name, args.num_bits)
        w = m.weight.detach().float()
        scale, zp = m.weight_scale.detach(), m.weight_zero_point.detach()
        g_idx = getattr(m, "weight_g_idx", None)
        kwargs = {"g_idx": g_idx} if g_idx is not None and "g_idx" in quantize.__code__.co_varnames else {}
        q = quantize(w, scale, zp, args, **kwargs)
        deq = dequantize(q, scale, zp, args, dtype=torch.float32, **kwargs)
        # Relative to the group's step: 0 means the stored weight is exactly a grid point.
        step = scale.float().repeat_interleave(args.group_size, dim=1)[:, : w.shape[1]]
        worst_rel = max(worst_rel, ((w - deq).abs() / step).max().item())
        qmin, qmax = calculate_range(args, w.device)
        lo, hi = q.min().item(), q.max().item()
        assert qmin <= lo and hi <= qmax, (name, lo, hi, qmin, qmax)
        codes_lo = lo if codes_lo is None else min(codes_lo, lo)
        codes_hi = hi if codes_hi is None else max(codes_hi, hi)
        groups = deq.reshape(w.shape[0], -1, args.group_size).sort(dim=-1).values
        distinct = 1 + (groups[..., 1:] != groups[..., :-1]).sum(-1)
        max_distinct = max(max_distinct, int(distinct.max()))
        out[name] = deq
        n_modules += 1
    info = {"modules": n_modules, "max_rel_offgrid": worst_rel,
            "max_distinct_per_group": max_distinct, "codes_range": [codes_lo, codes_hi]}
    if n_modules == 0:
        raise RuntimeError("no quantized modules found after oneshot")
    if max_distinct > 2 ** bits or (stored_on_grid and worst_rel > 1e-3):
        raise RuntimeError(f"weights are not on the int{bits} grid: {info}")
    return out, info


def plain_model(ref, weights: dict[str, torch.Tensor]):
    """A copy of the original with the dequantized weights: an ordinary HF model, no hooks, the
    same thing a loaded int-k checkpoint computes."""
    model = copy.deepcopy(ref)
    mods = dict(model.named_modules())
    for name, w in weights.items():
        mods[name].weight.data.copy_(w.to(mods[name].weight.dtype))
    return model


def environment() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "python": platform.python_version()},
        "versions": {p: version(p) for p in ("torch", "transformers", "llmcompressor",
                                             "compressed-tensors", "datasets")},
        "yaqa_commit": commit,
    }


def write_results(out: Path, meta: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    s = meta["settings"]
    lines = [
        "# Peer check: llmcompressor GPTQ on SmolLM2-135M-Instruct",
        "",
        "llmcompressor's `GPTQModifier` (`oneshot`, CPU), evaluated with yaqa's own code "
        "(`yaqa.evaluate.compare`) on yaqa's windows, so the rows compare directly with our LDLQ rows.",
        "",
        f"- Model: embedded default (`load_model(None)`: SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF, float32)",
        f"- Quantizer: {'symmetric' if s['symmetric'] else 'asymmetric'} int-k, group size {s['group_size']}, "
        f"targets Linear, lm_head (tied embedding) not quantized; min-max scales from the original weights "
        f"(llmcompressor's default observer, fixed before GPTQ runs)",
        f"- GPTQ: dampening_frac {s['damp']}, block_size {s['block_size']}, oneshot pipeline "
        f"`{s.get('pipeline', 'independent')}` ('independent' = llmcompressor's default: layer by layer, "
        f"each layer's Hessians from the outputs of the already-quantized layers before it)",
        f"- Calibration: {s['n_calib']} × {s['ctx']} tokens of {s['calib']} (seed {s['seed']}), "
        f"`calibration_windows` tensors passed as a pre-tokenized `datasets.Dataset`",
        f"- Evaluation: first {s['n_eval']} × {s['ctx']}-token windows of {s['eval']} (`eval_windows`); "
        f"KL(original ‖ quantized) per token in nats, averaged over all positions; perplexity over all targets",
        f"- Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, {meta['machine']['torch_threads']} torch threads",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + f"; yaqa {meta['yaqa_commit']}",
        f"- Command: `{meta['command']}`",
        *(f"- Note: {n}" for n in meta.get("notes", [])),
        "",
        "| method | bits | act-order | KL | KL p99 | perplexity | top-1 agree | quantize s | eval s |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| original | 32 | - | 0 | 0 | {meta['reference']['ppl']:.2f} | 1 | - | - |",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['bits']} | {r['actorder']} | {r['kl']:.4f} | "
                     f"{r['kl_p99']:.3f} | {r['ppl']:.2f} | {r['top1']:.4f} | "
                     f"{r['quantize_s']:.0f} | {r['eval_s']:.0f} |")
    lines += ["", "Grid check per row: stored weight vs quantize→dequantize of itself, in units of the "
              "group's step (0 for GPTQ, which writes its rounded weights back; up to 0.5 for RTN, which "
              "keeps float weights and fake-quantizes them in forward, so the evaluated weights are the "
              "fake-quantized ones); distinct values per group of the evaluated weights; logits of "
              "llmcompressor's own model vs the plain dequantized model that is evaluated:", ""]
    for r in rows:
        g = r["grid_check"]
        lines.append(f"- {r['method']} int{r['bits']} act-order {r['actorder']}: {g['modules']} Linear modules, "
                     f"max off-grid {g['max_rel_offgrid']:.1e} step, max distinct/group "
                     f"{g['max_distinct_per_group']} (≤ {2 ** r['bits']}), codes {g['codes_range']}, "
                     f"max |logit| difference llmcompressor model vs plain dequantized model "
                     f"{r['wrapper_vs_plain_max_logit_diff']:.1e}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    meta = {**environment(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "settings": {"model": args.model or "embedded default (smollm2-135m)", "group_size": args.group_size,
                         "symmetric": args.symmetric, "damp": args.damp, "block_size": args.block_size,
                         "pipeline": args.pipeline, "calib_batch": args.calib_batch,
                         "calib": args.calib, "n_calib": args.n_calib, "eval": args.eval_source,
                         "n_eval": args.n_eval, "ctx": args.ctx, "seed": args.seed,
                         "observer": "minmax (llmcompressor default)", "ignore": ["lm_head"]}}

    ref, tok = load_model(args.model, device="cpu")
    calib = calibration_windows(tok, args.calib, args.n_calib, args.ctx, seed=args.seed)
    evalw = eval_windows(tok, args.eval_source, args.ctx, n=args.n_eval)
    # Full float32 reference log-probs (exact KL); 64 × 512 windows take 6.4 GB of RAM, and they
    # save re-running the original model for every row.
    t0 = time.perf_counter()
    cache = ReferenceCache(ref, evalw, batch_size=args.eval_batch)
    meta["reference"] = {"ppl": None, "cache_s": time.perf_counter() - t0}
    rows: list[dict] = []

    jobs = [(b, m, o) for b in args.bits for m in args.methods
            for o in (args.actorder if m == "gptq" else ["-"])]
    for bits, method, order in jobs:
        log.info("=== %s int%d, group %d, act-order %s ===", method, bits, args.group_size, order)
        model = copy.deepcopy(ref)  # oneshot modifies the model in place
        if method == "gptq":
            mod = gptq_modifier(bits, args.group_size, args.symmetric, order, args.damp,
                                args.block_size)
        else:
            mod = rtn_modifier(bits, args.group_size, args.symmetric)
        quant_s = run_oneshot(model, tok, calib, mod, args.calib_batch, args.pipeline)
        weights, grid = extract_int_grid(model, bits, stored_on_grid=method == "gptq")
        plain = plain_model(ref, weights)
        with torch.inference_mode():
            probe = evalw[:1]
            diff = (model(input_ids=probe, use_cache=False).logits
                    - plain(input_ids=probe, use_cache=False).logits).abs().max().item()
        del model
        t0 = time.perf_counter()
        res = compare(cache, plain)
        eval_s = time.perf_counter() - t0
        meta["reference"]["ppl"] = res.ref_ppl
        row = {"method": f"llmcompressor {method.upper()}", "bits": bits, "actorder": order,
               **res.as_dict(), "quantize_s": quant_s, "eval_s": eval_s,
               "grid_check": grid, "wrapper_vs_plain_max_logit_diff": diff}
        log.info("%s int%d act-order %s: %s", method, bits, order, row)
        rows.append(row)
        write_results(out, meta, rows)
        del plain


if __name__ == "__main__":
    main()
